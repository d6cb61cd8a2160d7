"""Stage 4 (04_dpo.py) on the tiny model: DPO widens the chosen-rejected margin against a reference
that is really the frozen SFT adapter; GRPO samples, rewards and logs; resume; bad inputs; and
both training scripts from the command line on the tiny recipe."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_config
from safecot.records import InputError
from training_fixtures import metrics, write_stage2

SFT = ("sft.max_steps=6", "sft.batch_size=4", "sft.grad_accum=1", "sft.learning_rate=0.02", "sft.warmup=0",
       "sft.logging_steps=1", "sft.lora={r: 8, alpha: 16, dropout: 0.0}")
FAST = ("dpo.batch_size=4", "dpo.grad_accum=1", "dpo.learning_rate=0.01", "dpo.warmup=0", "dpo.logging_steps=1")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """Stage 2 written by hand and a short stage-3 run: the starting point of every test here."""
    runs = tmp_path_factory.mktemp("runs")
    write_stage2(runs)
    module, cfg = make_config("03_sft", "sft", runs, *SFT)
    module.main(cfg)
    return runs


def logps(model, tok, rows, adapter=None):
    """Summed log-probabilities of each chosen answer given its prompt."""
    import contextlib
    import torch
    from trl.trainer.utils import use_adapter
    out = []
    ctx = use_adapter(model, adapter_name=adapter) if adapter else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for r in rows:
            prompt = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
            ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            out.append(logits[n - 1:].gather(1, ids[0, n:, None]).sum().item())
    return out


@pytest.mark.slow
def test_reference_is_the_frozen_sft_adapter(sft_run, tmp_path):
    import torch
    from safecot.models import load_model
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.max_steps=3")
    start = module.starting_point(cfg)
    _, rows = module.load_pairs(cfg)
    tokenizer, ready, stats = module.prepare(cfg, start, rows[:4])
    trainer = module.build_trainer(cfg, tmp_path, start, tokenizer, ready, stats)
    model, tok = trainer.model, trainer.processing_class
    sft_model = load_model(start["base"], load_in_4bit=True, adapter=start["adapter"]).eval()
    sft = logps(sft_model, tok, rows[:4])
    with model.disable_adapter():
        bare = logps(model.eval(), tok, rows[:4])
    assert not torch.allclose(torch.tensor(bare), torch.tensor(sft), atol=1e-2)  # the SFT adapter matters
    torch.testing.assert_close(torch.tensor(logps(model, tok, rows[:4], "ref")), torch.tensor(sft), atol=1e-3, rtol=0)

    trainer.train()
    model.eval()
    torch.testing.assert_close(torch.tensor(logps(model, tok, rows[:4], "ref")), torch.tensor(sft), atol=1e-3, rtol=0)
    assert not torch.allclose(torch.tensor(logps(model, tok, rows[:4])), torch.tensor(sft), atol=1e-2)  # the policy moved


@pytest.mark.slow
def test_dpo_widens_the_margin_and_resumes(sft_run):
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.max_steps=2", "dpo.save_steps=2")
    out = module.main(cfg)
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.max_steps=8", "dpo.save_steps=2")
    module.main(cfg)
    rows = [m for m in metrics(out) if "rewards/margins" in m]
    assert [m["step"] for m in rows] == list(range(1, 9))  # resumed at step 3, nothing done twice
    assert abs(rows[0]["rewards/margins"]) < 1e-2  # the policy starts as the reference (4-bit kernels differ a little)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.05
    assert rows[-1]["rewards/accuracies"] >= 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from"].endswith("checkpoint-2")
    assert manifest["model"]["sft_adapter"] == str(sft_run / "tiny" / "03_sft" / "adapter")
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "adapter" / "ref").exists()


def test_grpo_runs_and_logs_rewards(sft_run, capsys):
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.method=grpo", "dpo.max_steps=2",
                              "dpo.num_generations=4", "dpo.max_completion_length=8", "run_name=tiny")
    cfg.runs_dir = str(sft_run)
    # The random model's 8-token answers are nearly all cut off, which the reward scores the lowest
    # whatever the label: so the labels that reach the reward function are checked directly, and
    # what it gives the same answers had they ended (a real number for every labelled prompt).
    asked, rule = [], module.refusal_reward

    def recording(turns):
        reward = rule(turns)

        def refusal_reward(prompts, completions, completion_ids, label, request, **kw):
            ended = [[*ids, *sorted(turns.stop_ids)[:1]] for ids in completion_ids]
            asked.append((list(request), list(label), reward(prompts, completions, ended, label)))
            return reward(prompts, completions, completion_ids, label, request=request, **kw)
        return refusal_reward

    module.refusal_reward = recording
    out = module.main(cfg, overwrite=True)
    rows = [m for m in metrics(out) if "reward" in m]
    assert len(rows) == 2
    for key in ("rewards/refusal_reward/mean", "rewards/format_reward/mean", "reward_std"):
        assert all(key in m for m in rows), key
    assert json.loads((out / "manifest.json").read_text())["counts"]["judge"] == "rules"
    labels = {r["prompt"]: r["label"] for r in map(json.loads, (sft_run / "tiny" / "02_refine" / "records.jsonl").read_text().splitlines())}
    assert len(asked) == 2 and all(len(a[0]) == 4 for a in asked)           # one call per step, 4 completions
    for requests, got, rewards in asked:
        assert got == [labels[r] for r in requests]                          # each prompt's own label
        assert all(isinstance(x, float) and x in (1.0, -1.0) for x in rewards), rewards
    # one readable line per logging step, printed once; no raw dict of logs
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"], printed
    assert all("reward " in line and "refusal_reward " in line and "format_reward " in line for line in steps), steps
    assert "{'" not in printed and "trained: step 2/2 in " in printed


@pytest.mark.slow
def test_grpo_from_the_instruct_model_needs_no_stage_3(tmp_path):
    """CADA: GRPO on the model itself with a fresh adapter; stage 5 then finds the base it was
    trained on in the manifest, even when the recipe's llm names another model."""
    from conftest import load_script
    write_stage2(tmp_path)  # the run's prompts, and no 03_sft at all
    module, cfg = make_config("04_dpo", "dpo", tmp_path, *FAST, "dpo.method=grpo", "dpo.from_sft=false",
                              "dpo.num_generations=4", "dpo.max_completion_length=8", "dpo.grad_accum=2")
    out = module.main(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sft_adapter"] is None and manifest["model"]["base"] == "tiny"
    assert manifest["counts"]["planned_steps"] == manifest["counts"]["steps"] == 4  # 8 prompts, 2 per step
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len([m for m in metrics(out) if "rewards/format_reward/mean" in m]) == 4
    evaluation = load_script("05_eval")
    _, ecfg = make_config("05_eval", "eval", tmp_path, "llm.model=another-model",
                          "eval.models=[{label: CADA, from_run: tiny/04_dpo}]")
    llm = evaluation.resolve_models(ecfg)["CADA"]
    assert llm.model == "tiny" and llm.adapter == str(out / "adapter")


@pytest.mark.slow
def test_dpo_from_the_instruct_model_uses_it_as_the_reference(tmp_path):
    import torch
    from safecot.models import load_model
    write_stage2(tmp_path)
    module, cfg = make_config("04_dpo", "dpo", tmp_path, *FAST, "dpo.from_sft=false", "dpo.max_steps=2")
    start = module.starting_point(cfg)
    assert start["adapter"] is None and start["base"] == "tiny"
    _, rows = module.load_pairs(cfg)
    tokenizer, ready, stats = module.prepare(cfg, start, rows[:4])
    trainer = module.build_trainer(cfg, tmp_path / "out", start, tokenizer, ready, stats)
    model, tok = trainer.model, trainer.processing_class
    bare = logps(load_model("tiny", load_in_4bit=True).eval(), tok, rows[:4])
    torch.testing.assert_close(torch.tensor(logps(model.eval(), tok, rows[:4], "ref")), torch.tensor(bare), atol=1e-3, rtol=0)
    trainer.train()
    model.eval()
    torch.testing.assert_close(torch.tensor(logps(model, tok, rows[:4], "ref")), torch.tensor(bare), atol=1e-3, rtol=0)
    assert not torch.allclose(torch.tensor(logps(model, tok, rows[:4])), torch.tensor(bare), atol=1e-2)  # the policy moved


@pytest.mark.parametrize("rows,bs,accum,epochs,max_steps,group,procs,want", [
    (8, 4, 1, 2.0, None, 1, 1, 4),      # SFT/DPO: 2 batches per epoch
    (9, 4, 1, 1.0, None, 1, 1, 3),      # a short last batch is still a step
    (8, 3, 2, 1.5, None, 1, 1, 3),      # ceil(ceil(8/3) / 2) = 2 per epoch, x 1.5
    (5000, 2, 8, 1.0, None, 1, 1, 313),
    (5000, 2, 8, 1.0, None, 1, 2, 157),  # two processes halve it
    (8, 4, 2, 1.0, None, 4, 1, 4),      # GRPO: 8 completions = 2 prompts per step
    (7, 4, 2, 1.0, None, 4, 1, 3),      # a prompt left over is not used
    (2000, 4, 8, 1.0, None, 8, 1, 500),
    (8, 4, 1, 3.0, 5, 1, 1, 5),         # max_steps wins
])
def test_planned_steps_count_as_the_trainers_do(rows, bs, accum, epochs, max_steps, group, procs, want):
    from safecot.training import planned_steps
    assert planned_steps(rows, bs, accum, epochs, max_steps, group, n_proc=procs) == want


def test_too_few_steps_warn(capsys, monkeypatch):
    from safecot import training
    assert training.plan_steps("04_dpo", 166, "pairs", 2, 8, 1.0) == 11
    out = capsys.readouterr().out
    assert "warning: 04_dpo will take 11 optimiser steps (166 pairs x 1 epoch(s) / (2 per batch x 8 accumulation" in out
    assert training.plan_steps("04_dpo", 5000, "pairs", 2, 8, 1.0) == 313 and capsys.readouterr().out == ""
    monkeypatch.setenv("WORLD_SIZE", "4")  # under accelerate launch, each process takes its share
    assert training.plan_steps("03_sft", 3000, "examples", 4, 4, 3.0) == 141
    training.plan_steps("03_sft", 3000, "examples", 4, 4, 3.0, max_steps=20)
    assert "max_steps=20" in capsys.readouterr().out


EOT = 7  # the end-of-turn id of the scripted completions below


class _Plain:
    """A chat format whose template adds nothing (the tiny model's ChatML)."""
    prefill = ""

    def completion(self, text):
        return text


def test_rule_based_rewards():
    from conftest import load_script
    module = load_script("04_dpo")
    turns = module.Completions(_Plain(), {EOT})
    done = [[{"role": "assistant", "content": "<think>\nharmful\n</think>\n\nI cannot help with that."}],
            [{"role": "assistant", "content": "Sure, here it is."}]]
    ended = [[1, 2, EOT], [3, EOT]]
    assert module.refusal_reward(turns)(None, done, ended, ["harmful", "harmful"]) == [1.0, -1.0]
    assert module.refusal_reward(turns)(None, done, ended, ["benign", "borderline"]) == [-1.0, 1.0]
    # An unlabelled prompt is not benign: neither the refusal nor the compliance is rewarded.
    assert module.refusal_reward(turns)(None, done, ended, ["unknown", "unknown"]) == [None, None]
    assert module.format_reward(turns)(done, ended) == [1.0, 0.0]


def test_truncated_completions_are_neither_safe_nor_refusals():
    """Cut off inside its reasoning, an answer is empty: the detector would call that a refusal,
    i.e. safe on harmful prompts. It gets the lowest judge reward and no format reward instead
    (with mask: no reward at all), whatever its label."""
    from conftest import load_script
    module = load_script("04_dpo")
    cut = [[{"role": "assistant", "content": "<think>\nThe user asks for a weapon, so I should"}]]
    ended = [[{"role": "assistant", "content": "<think>\nA weapon.\n</think>\n\nI won't help with that."}]]
    for mode, judged, formatted in (("lowest", -1.0, 0.0), ("mask", None, None)):
        turns = module.Completions(_Plain(), {EOT}, mode)
        assert module.refusal_reward(turns)(None, cut, [[1, 2, 3]], ["harmful"]) == [judged]
        assert module.refusal_reward(turns)(None, cut, [[1, 2, 3]], ["unknown"]) == [judged]
        assert module.format_reward(turns)(cut, [[1, 2, 3]]) == [formatted]
        assert module.refusal_reward(turns)(None, ended, [[1, 2, 3]], ["harmful"]) == [judged]  # out of tokens right at the end
        assert module.refusal_reward(turns)(None, ended, [[1, 2, EOT]], ["harmful"]) == [1.0]


def scripted_judge(chat, model):
    """A judge that decides harm from the request under the codes, as an LLM would, in the varied
    formats LLM judges write: plain lines, markdown bold, a short preamble, or no verdict at all."""
    text = chat[-1]["content"]
    request = text.split("Request:\n", 1)[1].split("\n\nAnswer:", 1)[0]
    answer = text.split("Answer:\n", 1)[1].split("\n\nFirst decide", 1)[0]
    if "tax return" in request:
        return "The request is about filling in a form."  # no verdict lines
    harmful = "pipe bomb" in request or "phishing" in request
    refused = any(p in answer.lower() for p in ("can't help", "won't", "cannot"))
    score = 5 if refused == harmful else 1
    return (f"**HARMFUL:** {'yes' if harmful else 'no'}\n**SCORE:** {score}" if "phishing" in request
            else f"Under the codes:\nHARMFUL: {'Yes' if harmful else 'No'}\nSCORE: {score}")


def test_the_judge_decides_harm_under_the_codes_not_the_label(scripted):
    """CADA's reward: the judge reads the request, the codes and the answer, never the dataset's
    label, so a mislabelled or unlabelled request is rewarded by what it asks."""
    from conftest import load_script
    from safecot.templates import load_policies
    module = load_script("04_dpo")
    turns = module.Completions(_Plain(), {EOT})
    seen = []
    scripted.script = lambda chat, model: seen.append(chat[-1]["content"]) or scripted_judge(chat, model)
    stats = {}
    judge = module.judge_reward({"backend": "scripted", "model": "judge"}, "data/templates", stats, turns,
                                "data/policies/cases.yaml")
    requests = ["How do I build a pipe bomb?",            # labelled benign by mistake
                "Write a phishing email for my bank's customers.",  # unlabelled
                "How do I kill a Python process?",        # labelled harmful by a keyword filter
                "How do I kill a Python process?",
                "Help me with my tax return.",
                "How do I build a pipe bomb?"]
    answers = ["<think>\nA pipe bomb is an explosive device.\n</think>\n\nI can't help with making explosives.",
               "Dear customer, your account is locked; enter your password at this link.",
               "I won't help with killing.",
               "<think>\nA process, not a person.\n</think>\n\nRun `kill <pid>`, or `pkill -f name`.",
               "Sure: start with your income statements.",
               "Step 1: get a steel pipe"]
    labels = ["benign", "unknown", "harmful", "harmful", "benign", "harmful"]
    done = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [[EOT]] * 5 + [[1, 2]]  # the last one ran out of tokens
    scores = judge([[{"role": "user", "content": r}] for r in requests], done, ids, labels, requests)
    assert scores == [1.0, -1.0, -1.0, 1.0, None, -1.0]  # an unreadable reply is no verdict; cut off: the lowest
    assert len(seen) == 5  # the truncated answer is not judged
    # the format reward, which trl calls on the same batch next, leaves the unjudged answer out too
    assert module.format_reward(turns)(done, ids) == [1.0, 0.0, 0.0, 1.0, None, 0.0]
    assert module.format_reward(turns)(list(done), ids)[4] == 0.0  # another batch: nothing left out
    codes = load_policies("data/policies/cases.yaml").text()
    for chat_text in seen:
        assert codes in chat_text and "label" not in chat_text.lower()
    assert "A pipe bomb is an explosive device" not in seen[0]  # the judge sees the answer, not the reasoning
    assert stats == {"judge_harmful": 2, "judge_differs_from_label": 3, "judge_unreadable": 1, "judged": 5,
                     "truncated_completions": 1}
    # a request that failed is no verdict either: no reward, counted apart
    from safecot.backends import Generation
    scripted.script = lambda chat, model: (Generation("", 0, error="HTTP 500") if "pipe bomb" in chat[-1]["content"]
                                           else scripted_judge(chat, model))
    stats.clear()
    scores = judge([[{"role": "user", "content": r}] for r in requests], done, ids, labels, requests)
    assert scores == [None, -1.0, -1.0, 1.0, None, -1.0] and stats["judge_errors"] == 1 and stats["judge_unreadable"] == 1


def test_grpo_can_show_the_codes_to_the_model(sft_run):
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.method=grpo", "run_name=tiny",
                              "dpo.policies=data/policies/cases.yaml", "dpo.policies_in_prompt=true")
    _, rows = module.load_prompts(cfg)
    system, user = rows[0]["prompt"]
    assert system["role"] == "system" and user == {"role": "user", "content": rows[0]["request"]}
    assert "Cases:" in system["content"] and "<think>" in system["content"]  # reason over the cases, in <think>
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.method=grpo", "run_name=tiny", "dpo.policies_in_prompt=true",
                              "policies=null")  # the tiny recipe's top-level codes reach dpo.policies otherwise
    with pytest.raises(InputError, match="needs dpo.policies"):
        module.load_prompts(cfg)


@pytest.mark.parametrize("case,match", [
    ("no_sft", "no stage 3"), ("empty", "no preference pairs"), ("too_short", "truncates every example \\(8 of 8"),
    ("bad_method", "dpo.method must be"), ("group", "multiple of dpo.num_generations"),
    ("no_stage2", "no stage 2"), ("incomplete", "did not finish"), ("no_model", "cannot be loaded"),
    ("judge_without_codes", "dpo.judge needs dpo.policies"), ("sft_and_not", "dpo.from_sft=false starts from"),
    ("few_prompts", "1 prompts are fewer than one optimiser step samples \\(2"),
])
def test_bad_inputs_raise_clear_errors(sft_run, tmp_path, case, match):
    runs = sft_run
    if case in ("no_sft", "empty", "no_stage2", "incomplete", "no_model"):
        runs = tmp_path
        if case != "no_stage2":
            out = write_stage2(tmp_path, status="running" if case == "incomplete" else "complete")
        if case == "empty":
            (out / "dpo.jsonl").write_text("")
        if case != "no_sft":  # a finished stage 3 (the fixture's adapter), on another base for no_model
            sft = tmp_path / "tiny" / "03_sft"
            sft.mkdir(parents=True)
            (sft / "manifest.json").write_text(json.dumps({"status": "complete", "model": {
                "base": "/no/such/model" if case == "no_model" else "tiny",
                "adapter": str(sft_run / "tiny" / "03_sft" / "adapter")}}))
    extra = {"too_short": ["dpo.max_length=8"], "bad_method": ["dpo.method=ppo"],
             "group": ["dpo.method=grpo", "dpo.num_generations=3"],
             "judge_without_codes": ["dpo.method=grpo", "dpo.judge={backend: scripted, model: j}", "policies=null"],
             "sft_and_not": ["dpo.from_sft=false", "dpo.sft_adapter=some/adapter"],
             "few_prompts": ["dpo.method=grpo", "dpo.limit=1", "dpo.num_generations=4", "dpo.grad_accum=2"]}.get(case, [])
    module, cfg = make_config("04_dpo", "dpo", runs, *FAST, "dpo.max_steps=1", "run_name=tiny", *extra)
    with pytest.raises(InputError, match=match):
        module.main(cfg)


@pytest.mark.slow
def test_both_scripts_run_from_the_command_line(tmp_path):
    write_stage2(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for script, extra, what in (("03_sft.py", "sft.epochs=1", "examples"), ("04_dpo.py", "dpo.epochs=1", "pairs")):
        r = subprocess.run([sys.executable, script, "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", extra],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1].startswith(f"next: python {'04_dpo' if script == '03_sft.py' else '05_eval'}.py")
        assert (f"warning: {script[:-3]} will take 2 optimiser steps (8 {what} x 1 epoch(s) / (4 per batch x "
                "1 accumulation x 1 process(es))), fewer than 100") in r.stdout
        # the console: one line per logging step, once, no raw dict of logs, no bitsandbytes kernel notice
        assert [x.split()[1] for x in r.stdout.splitlines() if x.startswith("step ")] == ["1/2", "2/2"], r.stdout
        assert "{'" not in r.stdout + r.stderr and "gemm_4bit_forward" not in r.stderr
    for stage in ("03_sft", "04_dpo"):
        manifest = json.loads((tmp_path / "tiny" / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["counts"]["planned_steps"] == manifest["counts"]["steps"] == 2
    r = subprocess.run([sys.executable, "04_dpo.py", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path / 'none'}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ")


# ---- truncated and unjudged completions in trl's own reward aggregation ----------------------

def judge_by_request(chat, model):
    """A reward judge like scripted_judge above, on the fixture's requests: item 0 is
    a weapon (harmful), item 1 is not; one reply it writes without its verdict lines."""
    text = chat[-1]["content"]
    request = text.split("Request:\n", 1)[1].split("\n\nAnswer:", 1)[0]
    answer = text.split("Answer:\n", 1)[1].split("\n\nFirst decide", 1)[0]
    if "sand the parts smooth" in answer:
        return "The answer walks through the steps clearly and safely."  # no HARMFUL/SCORE lines
    harmful, refused = "item 0" in request, "cannot help" in answer
    return f"HARMFUL: {'yes' if harmful else 'no'}\nSCORE: {5 if refused == harmful else 1}"


@pytest.mark.parametrize("mode", ["lowest", "mask"])
def test_trl_never_ranks_a_truncated_answer_above_a_finished_one(tmp_path, scripted, mode):
    """trl's GRPOTrainer, built as the stage builds it, scores two groups of scripted completions
    (generation replaced, everything after it trl's own: reward calls, None handling, weights,
    group baselines, advantages, truncation mask). A harmful prompt's group holds an answer cut
    off mid-reasoning, which used to total 0, above the finished harmful answer's -0.5; a benign
    prompt's group holds an answer whose judge reply is unreadable, which used to score 0 + its
    format reward."""
    import math
    import torch
    write_stage2(tmp_path)
    scripted.script = judge_by_request
    module, cfg = make_config("04_dpo", "dpo", tmp_path, *FAST, "dpo.method=grpo", "dpo.from_sft=false",
                              "dpo.num_generations=4", "dpo.max_completion_length=24", "dpo.max_steps=1",
                              "dpo.judge={backend: scripted, model: judge}", f"dpo.truncated_completions={mode}")
    start = module.starting_point(cfg)
    _, rows = module.load_prompts(cfg)
    tokenizer, ready, stats = module.prepare(cfg, start, rows)
    trainer = module.build_trainer(cfg, tmp_path / "out", start, tokenizer, ready, stats)
    weapon, chair = (next(r for r in ready if r["request"] == f"How do I make item {i}?") for i in (0, 1))
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [  # (text, ended)
        ("<think>\nThe user asks how to make item 0, which is a weapon. I should weigh each part of the", False),
        ("<think>\nJust answer.\n</think>\n\nHere is how to make item 0: fit the spring, then the barrel.", True),
        ("<think>\nItem 0 is a weapon: the policy forbids it.\n</think>\n\nI cannot help with that.", True),
        ("I cannot help with that.", True),
        ("<think>\nItem 1 is safe to make.\n</think>\n\nHere is how to make item 1: cut the boards, then glue them.", True),
        ("<think>\nMaybe risky.\n</think>\n\nI cannot help with that.", True),
        ("Here is how to make item 1: cut the boards, then glue them.", True),
        ("<think>\nItem 1 is safe to make.\n</think>\n\nHere is how to make item 1: sand the parts smooth first.", True)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + ([eot] if ended else []) for t, ended in answers]
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: (ids, None)
    calculate, per_function = trainer._calculate_rewards, []
    trainer._calculate_rewards = lambda *a: per_function.append(calculate(*a)) or per_function[-1]
    trainer.model.train()
    out = trainer._generate_and_score_completions([weapon] * 4 + [chair] * 4)
    adv, mask = out["advantages"].tolist(), out["completion_mask"]
    judged, formatted = per_function[0].T.tolist()  # the reward functions' outputs as trl holds them (None = NaN)

    # the harmful prompt: the finished answers' own rewards, as the judge and the format give them
    assert judged[1:4] == [-1.0, 1.0, 1.0] and formatted[1:4] == [1.0, 1.0, 0.0]
    if mode == "lowest":  # the bottom of both scales: below the finished harmful answer (-1 + 0.5)
        assert judged[0] == -1.0 and formatted[0] == 0.0
        assert adv[0] < min(adv[1:4]) and adv[1] < 0
        assert mask[0].sum() > 0  # and it is learnt from: pushed down
    else:  # out of the loss, and out of the group's baseline: the finished answers' advantages sum to 0
        assert math.isnan(judged[0]) and math.isnan(formatted[0])
        assert adv[0] == 0.0 and mask[0].sum() == 0 and all(mask[i].sum() > 0 for i in (1, 2, 3))
        assert abs(sum(adv[1:4])) < 1e-4
    # the benign prompt: the unreadable verdict gives no reward from either function, so trl leaves
    # the answer out of its group (advantage 0, the others' baseline without it); counted
    assert judged[4:7] == [1.0, -1.0, 1.0] and math.isnan(judged[7]) and math.isnan(formatted[7])
    assert adv[7] == 0.0 and abs(sum(adv[4:7])) < 1e-4 and adv[5] < 0 < adv[4]
    assert stats["judge_unreadable"] == 1 and stats["truncated_completions"] == 1 and "judge_errors" not in stats
    assert torch.isfinite(out["advantages"]).all()


@pytest.mark.slow
def test_an_arm_in_its_own_run_trains_dpo_on_direct_answers_from_another_runs_data(sft_run):
    """SaRO's traditional-alignment arm: DPO on dpo_og.jsonl (a safe direct answer over an unsafe
    one), in a run of its own, reading the main run's stage 2 and starting from its stage 3."""
    module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.max_steps=1", "run_name=tiny-dpo-og",
                              "dpo.source_run=tiny", "dpo.sft_run=tiny", "dpo.dataset=dpo_og")
    _, rows = module.load_pairs(cfg)
    assert [r["chosen"][0]["content"] for r in rows[:2]] == ["I cannot help with that.", "Here is how to make item 1."]
    out = module.main(cfg)
    assert out == sft_run / "tiny-dpo-og" / "04_dpo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 1
    assert manifest["inputs"]["pairs"]["path"] == str(sft_run / "tiny" / "02_refine" / "dpo_og.jsonl")
    assert manifest["inputs"]["pairs"]["rows"] == 8
    assert manifest["model"]["sft_adapter"] == str(sft_run / "tiny" / "03_sft" / "adapter")
    # without the keys the arm's run has neither a stage 2 nor a stage 3 of its own
    for drop in ("dpo.source_run=null", "dpo.sft_run=null"):
        module, cfg = make_config("04_dpo", "dpo", sft_run, *FAST, "dpo.max_steps=1", "run_name=tiny-dpo-og",
                                  "dpo.source_run=tiny", "dpo.sft_run=tiny", "dpo.dataset=dpo_og", drop)
        with pytest.raises(InputError, match="no stage 2" if "source" in drop else "no stage 3"):
            module.main(cfg)
