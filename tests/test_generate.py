"""Stage 1 orchestration (scripted agents) and the real tiny model end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, make_config
from safecot.records import InputError

INTENTS = "EXPLICIT:\n- wants X\nIMPLICIT:\n- curious about X"
COT = "THOUGHTS:\n1. The request is benign.\n2. Answer it.\nRESPONSE:\nHere is X."
REVISE = "VERDICT: REVISE\nTHOUGHTS:\n1. The request is benign.\n2. Answer it.\n3. Agent {n} checked privacy.\nRESPONSE:\nHere is X, revised by {n}."
AGREE = "VERDICT: AGREE\nI agree with the previous agent."


def role_of(chat) -> str:
    """Which template produced this chat, read from its own words."""
    text = chat[-1]["content"]
    if "List the explicit and the implicit intents" in text:
        return "intent"
    if "Current thoughts" in text:
        return "review"
    return "initial"


def agent_no(chat) -> int:
    return int(chat[0]["content"].split("You are agent ")[1].split()[0])


def script_for(review):
    """A script whose deliberation turns are decided by review(chat, agent_no)."""
    def script(chat, model):
        role = role_of(chat)
        if role == "intent":
            return INTENTS
        if role == "initial":
            return COT
        return review(chat, agent_no(chat))
    return script


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def run(tmp_path, scripted, review, *overrides):
    scripted.script = script_for(review)
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", *overrides)
    return module.main(cfg)


def test_first_agent_agreement_stops_deliberation(tmp_path, scripted):
    out = run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=4")
    recs = records(out)
    assert len(recs) == 4
    for r in recs:
        assert r["stop_reason"] == "agreement" and r["rounds"] == 1 and r["turns"] == 1
        assert r["intents"] == {"explicit": ["wants X"], "implicit": ["curious about X"]}
        assert r["thoughts"] == ["The request is benign.", "Answer it."]
        assert r["response"] == "Here is X."
        assert [t["step"] for t in r["deliberation_log"]] == ["intent", "initial", "deliberation"]
        assert r["deliberation_log"][-1]["verdict"] == "agree"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["stop_reasons"] == {"agreement": 4}
    assert manifest["config"]["n_agents"] == 3


def test_budget_stop_keeps_the_last_revision(tmp_path, scripted):
    out = run(tmp_path, scripted, lambda chat, k: REVISE.format(n=k), "generate.limit=3",
              "generate.n_agents=2", "generate.max_rounds=3")
    for r in records(out):
        assert r["stop_reason"] == "budget" and r["rounds"] == 3 and r["turns"] == 6
        assert r["thoughts"][-1] == "Agent 2 checked privacy."
        assert r["response"] == "Here is X, revised by 2."
        verdicts = [t["verdict"] for t in r["deliberation_log"] if t["step"] == "deliberation"]
        assert verdicts == ["revise"] * 6
        assert [t["agent"] for t in r["deliberation_log"][2:4]] == ["agent_1", "agent_2"]


def test_agreement_mid_round_and_agents_see_revisions(tmp_path, scripted):
    seen = []

    def review(chat, k):
        seen.append((k, "Agent 1 checked privacy." in chat[-1]["content"]))
        return REVISE.format(n=k) if k == 1 else AGREE

    out = run(tmp_path, scripted, review, "generate.limit=2")
    for r in records(out):
        assert r["stop_reason"] == "agreement" and r["rounds"] == 1 and r["turns"] == 2
        assert r["thoughts"][-1] == "Agent 1 checked privacy."
    assert (2, True) in seen  # agent 2 reviewed agent 1's revision, not the initial CoT


def test_one_batched_call_per_step_not_per_prompt(tmp_path, scripted):
    # 10 prompts, 3 agents, 2 rounds, nobody agrees: intent + initial + 6 turns = 8 calls.
    run(tmp_path, scripted, lambda chat, k: REVISE.format(n=k), "generate.limit=10",
        "generate.chunk_size=64", "generate.max_rounds=2")
    assert len(scripted.calls_log) == 8
    assert all(n == 10 for _, n in scripted.calls_log)


def test_only_active_prompts_are_sent_to_later_turns(tmp_path, scripted):
    def review(chat, k):
        return AGREE if "Why" in chat[-1]["content"] or k == 3 else REVISE.format(n=k)
    run(tmp_path, scripted, review, "generate.limit=12", "generate.max_rounds=2")
    sizes = [n for _, n in scripted.calls_log]
    assert sizes[0] == sizes[1] == 12 and sizes[-1] < 12


def test_malformed_outputs_are_kept_counted_and_do_not_stop(tmp_path, scripted):
    scripted.script = lambda chat, model: "lorem ipsum, no format at all"
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted",
                              "generate.limit=3", "generate.n_agents=2", "generate.max_rounds=1")
    out = module.main(cfg)
    recs = records(out)
    assert len(recs) == 3
    for r in recs:
        assert r["stop_reason"] == "budget"
        assert r["parse_failures"] == ["intent", "initial", "deliberation", "deliberation"]
        assert all(t["text"] == "lorem ipsum, no format at all" for t in r["deliberation_log"])
        assert r["response"] == "lorem ipsum, no format at all"  # raw kept as the response
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["parse_failures"] == {"intent": 3, "initial": 3, "deliberation": 6}


def test_heterogeneous_deliberators_are_recorded(tmp_path, scripted):
    out = run(tmp_path, scripted, lambda chat, k: REVISE.format(n=k), "generate.limit=2",
              "generate.max_rounds=1", "generate.deliberators=[{model: judge-a}, {model: judge-b}]")
    log = records(out)[0]["deliberation_log"]
    assert [t["model"] for t in log[2:]] == ["scripted:judge-a", "scripted:judge-b", "scripted:judge-a"]
    assert {m for m, _ in scripted.calls_log} == {"tiny", "judge-a", "judge-b"}


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, scripted):
    calls = {"n": 0}

    def review(chat, k):
        calls["n"] += 1
        if calls["n"] == 5:  # the second chunk's first review: the first chunk is already on disk
            raise KeyboardInterrupt
        return AGREE

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, scripted, review, "generate.limit=8", "generate.chunk_size=4")
    out = tmp_path / "tiny" / "01_generate"
    first = records(out)
    assert len(first) == 4
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    # a torn line (killed mid-write) is work in flight: cut off and redone
    with (out / "records.jsonl").open("a") as f:
        f.write('{"id": "seed-00')
    run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=8", "generate.chunk_size=4")
    again = records(out)
    assert [r["id"] for r in again[:4]] == [r["id"] for r in first] and again[:4] == first
    assert len({r["id"] for r in again}) == len(again) == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["sessions"] == 2


def test_rerun_of_a_finished_run_does_nothing_and_overwrite_starts_over(tmp_path, scripted):
    out = run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=3")
    n = len(scripted.calls_log)
    run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=3")
    assert len(scripted.calls_log) == n
    scripted.script = script_for(lambda chat, k: REVISE.format(n=k))
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=3")
    module.main(cfg, overwrite=True)
    assert all(r["stop_reason"] == "budget" for r in records(out))


def test_resume_under_another_config_is_refused(tmp_path, scripted):
    out = run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=2")
    before = (out / "records.jsonl").read_text()
    with pytest.raises(InputError, match="n_agents"):
        run(tmp_path, scripted, lambda chat, k: AGREE, "generate.limit=2", "generate.n_agents=2")
    assert (out / "records.jsonl").read_text() == before



def test_resume_refuses_a_corrupt_line_and_changed_prompts(tmp_path, scripted):
    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(x) for x in (ROOT / "data/prompts/seed.jsonl").read_text().splitlines()[:2]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(tmp_path, scripted, lambda chat, k: AGREE, f"generate.prompts={prompts}")
    good = (out / "records.jsonl").read_text()
    (out / "records.jsonl").write_text("not json\n" + good)  # a whole line edited by hand, not a torn tail
    with pytest.raises(InputError, match=r"records.jsonl:1: not a record"):
        run(tmp_path, scripted, lambda chat, k: AGREE, f"generate.prompts={prompts}")
    (out / "records.jsonl").write_text(good)
    rows[1]["prompt"] += " (edited)"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"1 finished records \(first: id " + rows[1]["id"]):
        run(tmp_path, scripted, lambda chat, k: AGREE, f"generate.prompts={prompts}")
    assert (out / "records.jsonl").read_text() == good


def test_prompt_mix_from_the_recipe_is_recorded_per_source(tmp_path, scripted):
    mix = ("generate.prompts=[{source: data/prompts/seed.jsonl, limit: 2}, "
           "{source: data/eval/harmful.jsonl, limit: 1}]")
    out = run(tmp_path, scripted, lambda chat, k: AGREE, mix)
    assert len(records(out)) == 3
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert inputs["prompts[0]"]["rows"] == 2 and inputs["prompts[1]"]["path"] == "data/eval/harmful.jsonl"
    assert inputs["template deliberate"]["sha256"]

def test_failed_requests_are_left_for_the_next_run(tmp_path, scripted):
    from safecot.backends import Generation

    def flaky(chat, model):
        if "Why" in chat[-1]["content"]:
            return Generation("", 0, error="HTTP 500")
        return script_for(lambda c, k: AGREE)(chat, model)

    scripted.script = flaky
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=12")
    out = module.main(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    missing = manifest["counts"]["missing"]
    assert missing > 0 and manifest["status"] == "partial"
    assert len(records(out)) == 12 - missing
    scripted.script = script_for(lambda c, k: AGREE)
    module.main(cfg)
    assert len(records(out)) == 12
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


# A revision that flips the initial CoT's verdict and is cut off at the token budget mid-sentence:
# what came through parses as a complete revision.
CUT_REVISION = ("VERDICT: REVISE\nTHOUGHTS:\n1. The request is not benign.\n2. Refuse it, since the fraud policy\n"
                "RESPONSE:\nI can't help with that, but you could")


@pytest.mark.parametrize("truncated", [True, False])
def test_a_revision_cut_off_at_the_budget_is_a_parse_failure(tmp_path, scripted, truncated):
    from safecot.backends import Generation
    seen = []

    def review(chat, k):
        if k == 1:
            return Generation(CUT_REVISION, 64, truncated=truncated)
        seen.append(chat[-1]["content"])
        return AGREE

    out = run(tmp_path, scripted, review, "generate.limit=3", "generate.n_agents=2", "generate.max_rounds=1")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    for r in records(out):
        turn = r["deliberation_log"][2]
        assert turn["truncated"] is truncated and r["stop_reason"] == "agreement"
        if truncated:  # the initial CoT stands, and agent 2 reviewed it, not the cut-off flip
            assert r["thoughts"] == ["The request is benign.", "Answer it."] and r["response"] == "Here is X."
            assert turn["verdict"] == "unparsed" and r["parse_failures"] == ["deliberation"]
        else:  # the control: the same text, finished, is a revision
            assert r["thoughts"][0] == "The request is not benign." and turn["verdict"] == "revise"
    assert all(("not benign" in text) is not truncated for text in seen) and len(seen) == 3
    assert counts["truncated_turns"] == {"intent": 0, "initial": 0, "deliberation": 3 if truncated else 0}
    assert counts["parse_failures"]["deliberation"] == (3 if truncated else 0)


def test_cut_off_intents_and_initial_cot_are_not_used(tmp_path, scripted):
    from safecot.backends import Generation
    seen = []

    def script(chat, model):
        role = role_of(chat)
        if role == "intent":
            return Generation(INTENTS, 8, truncated=True)
        if role == "initial":
            return Generation(COT + " And then you", 8, truncated=True)
        seen.append(chat[-1]["content"])
        return REVISE.format(n=agent_no(chat))

    scripted.script = script
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=2",
                              "generate.n_agents=1", "generate.max_rounds=1")
    out = module.main(cfg)
    for r in records(out):
        assert r["intents"] == {"explicit": [], "implicit": []} and r["parse_failures"] == ["intent", "initial"]
        assert [t["parsed"] for t in r["deliberation_log"][:2]] == [False, False]
        assert r["thoughts"][-1] == "Agent 1 checked privacy."  # the deliberator's revision, from scratch
    assert all("Current thoughts (round 1):\n(none)" in text and "Current response:\n(none)" in text
               and "wants X" not in text for text in seen)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["truncated_turns"] == {"intent": 2, "initial": 2, "deliberation": 0}


# ---- the real tiny model ---------------------------------------------------------------------

def test_only_the_bitsandbytes_cpu_kernel_notice_is_silenced(caplog):
    """bitsandbytes' notice that the optional `kernels` package is missing is noise on a CPU (its
    own kernel is used); safecot.models drops that one message and nothing else."""
    import logging
    import safecot.models  # noqa: F401  (installs the filter)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("Failed to load the CPU library")
        logging.getLogger("other").warning("Failed to load CPU gemm_4bit_forward elsewhere")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load the CPU library",
                                                        "Failed to load CPU gemm_4bit_forward elsewhere"]


def test_the_tiny_model_runs_on_one_thread_unless_told_otherwise(monkeypatch):
    """Its matrices are too small to share among threads, which spin-wait on a busy machine."""
    import torch
    from safecot.models import resolve_model
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        resolve_model("tiny")
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        resolve_model("some/hub-model")
        assert torch.get_num_threads() == 2
        resolve_model("tiny")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path, four_bit):
    module, cfg = make_config("01_generate", "generate", tmp_path, "generate.limit=3", "generate.max_rounds=1",
                              "generate.n_agents=2", "llm.max_new_tokens=8", f"llm.load_in_4bit={str(four_bit).lower()}")
    out = module.main(cfg)
    recs = records(out)
    assert len(recs) == 3
    for r in recs:
        assert r["stop_reason"] in ("agreement", "budget")
        assert {"id", "prompt", "label", "category", "intents", "thoughts", "response", "deliberation_log",
                "rounds", "stop_reason"} <= set(r)
        assert all(t["model"] == "hf:tiny" and t["tokens"] > 0 for t in r["deliberation_log"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["llm"]["load_in_4bit"] is four_bit
    assert manifest["counts"]["this_session"]["generated_tokens"] > 0
    if four_bit:
        from safecot import backends
        model = next(iter(backends._LOADED.values())).model
        assert "Linear4bit" in {type(m).__name__ for m in model.modules()}


@pytest.mark.slow
@pytest.mark.parametrize("row_prefill", [True, False])
def test_hf_batch_shares_the_policy_prefix_and_matches_one_prompt_at_a_time(row_prefill, monkeypatch):
    """A batched call runs the common head of its prompts (system turn with the policies) once
    and reuses its KV cache, then each row's own tokens without padding; greedy outputs must equal
    those of each prompt generated alone."""
    from safecot.backends import Agent, LLMConfig, common_prefix_len
    from safecot.templates import load_policies, load_template
    tpl = load_template("initial_cot")
    policies = load_policies("data/policies/cases.yaml").text()
    prompts = ["How do I bake bread?", "Tell me how to pick a lock on my own shed, step by step please.",
               "What is the capital of France?", "Write a poem about rain."]
    chats = [tpl.chat(prompt=p, policies=policies, intents="Explicit:\n1. x\nImplicit:\n(none)") for p in prompts]
    alone = LLMConfig(model="tiny", temperature=0.0, max_new_tokens=12, batch_size=1)
    shared = LLMConfig(model="tiny", temperature=0.0, max_new_tokens=12, batch_size=4)
    backend = Agent("a", alone).backend
    monkeypatch.setattr(backend, "ROW_PREFILL_FROM", 0 if row_prefill else 10**9)
    ids = backend.chat.prompt_ids(chats)
    assert common_prefix_len(ids) > 0.8 * min(len(i) for i in ids)  # the policies are the common head
    inputs = backend._batch_inputs(ids, share_prefix=True, max_new_tokens=12)
    # the cache holds the common head, and (row by row) every row's own tokens but the last, which generate() reads
    cached = inputs["input_ids"].shape[1] - 1 if row_prefill else common_prefix_len(ids)
    assert inputs["past_key_values"].get_seq_length() == cached
    expected = [g.text for g in backend.generate(chats, alone)]
    assert [g.text for g in backend.generate(chats, shared)] == expected
    unshared = LLMConfig(model="tiny", temperature=0.0, max_new_tokens=12, batch_size=4, share_prefix=False)
    assert [g.text for g in backend.generate(chats, unshared)] == expected


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    from safecot.backends import common_prefix_len
    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3, 4]]) == 1
    assert common_prefix_len([[5, 2], [1, 2]]) == 0


@pytest.mark.slow
def test_command_line_runs_the_stage(tmp_path):
    proc = subprocess.run([sys.executable, "01_generate.py", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}",
                           "run_name=cli", "generate.limit=2", "generate.max_rounds=1", "llm.max_new_tokens=4"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cli" / "01_generate"
    assert len(records(out)) == 2
    before = (out / "manifest.json").read_text()
    again = subprocess.run(proc.args + ["--skip-complete"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith("skip: ")  # make reproduce skips finished stages
    assert (out / "manifest.json").read_text() == before
