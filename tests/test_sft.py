"""Stage 3 (03_sft.py) on the tiny model: it learns, masks all but the assistant's tokens, resumes
from its checkpoint, keeps LoRA gradients right after generation, and refuses bad inputs clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_config
from safecot.records import InputError
from training_fixtures import metrics, write_stage2

FAST = ("sft.batch_size=4", "sft.grad_accum=1", "sft.learning_rate=0.02", "sft.logging_steps=1",
        "sft.warmup=0", "sft.lora={r: 8, alpha: 16, dropout: 0.0}")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """An SFT run stopped after 3 steps (as if interrupted), then rerun with a budget of 12."""
    runs = tmp_path_factory.mktemp("runs")
    write_stage2(runs)
    module, cfg = make_config("03_sft", "sft", runs, *FAST, "sft.max_steps=3", "sft.save_steps=3")
    out = module.main(cfg)
    first = metrics(out)
    with (out / "metrics.jsonl").open("a") as f:  # as if killed after logging steps past the checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.9}) + "\n" + '{"step": 5, "lo')
    module, cfg = make_config("03_sft", "sft", runs, *FAST, "sft.max_steps=12", "sft.save_steps=3")
    module.main(cfg)
    return out, first


@pytest.mark.slow
def test_sft_lowers_the_loss_on_a_set_it_can_memorise(resumed_run):
    out, _ = resumed_run
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses
    assert all("tokens_per_s" in m or m["step"] in (1, 4) for m in metrics(out) if "loss" in m)
    assert all(m["peak_mem_gib"] > 0 for m in metrics(out))


@pytest.mark.slow
def test_sft_resumes_from_its_checkpoint(resumed_run):
    out, first = resumed_run
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, 13))  # steps 1-3 from the first session, 4-12 from the second, none twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["sessions"] == 2
    assert manifest["resumed_from"].endswith("checkpoint-3") and manifest["counts"]["steps"] == 12
    assert manifest["counts"]["planned_steps"] == 12
    assert [m["step"] for m in first if "loss" in m] == [1, 2, 3]


@pytest.mark.slow
def test_sft_writes_adapter_tokenizer_and_manifest(resumed_run):
    out, _ = resumed_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["base"] == "tiny" and manifest["model"]["adapter"] == str(out / "adapter")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "tokenizer_config.json").is_file()
    assert not (out / "adapter" / "ref").exists()
    assert manifest["inputs"]["sft"]["rows"] == 8


def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path):
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, *FAST, "sft.max_steps=1")
    _, rows = module.load_examples(cfg)
    multi = {"id": "multi", "messages": [
        {"role": "system", "content": "Be safe."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Item 3?"},
        {"role": "assistant", "content": "<think>\nsafe\n</think>\n\nYes."}]}
    from datasets import Dataset
    tok, _, tokenised, counts = module.tokenize(cfg, rows + [multi])
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "assistant_masks")} for r in tokenised])
    trainer = module.build_trainer(cfg, tmp_path / "out", tok, dataset)
    assert counts["truncated"] == 0
    for row, ex in zip(rows + [multi], trainer.train_dataset):
        # The template's own {% generation %} markers (the tiny template has them) are the oracle.
        want = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        assert ex["input_ids"] == want["input_ids"]
        assert [int(label != -100) for label in ex["labels"]] == want["assistant_masks"]
        learnt = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100])
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert learnt == "".join(t + "<|im_end|>" for t in turns)  # content and end-of-turn, nothing else
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert ((batch["labels"] != -100) <= (batch["attention_mask"] == 1)).all()  # padding is never learnt


def test_mask_for_a_template_without_generation_markers(tiny_model_dir):
    """Mistral-style template, no markers: the generic prefix rendering still finds each turn."""
    from safecot.chat import ChatFormat
    from safecot.models import load_tokenizer
    tok = load_tokenizer("tiny")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A one"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two"}]
    enc = ChatFormat(tok, "tiny", template).tokenize(msgs)
    learnt = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert learnt == " A one<|im_end|> A two<|im_end|>"


def grads_around_generate(guard: bool):
    """LoRA gradients of one batch before and after a no-grad model.generate() call."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from safecot import training
    from safecot.models import load_tokenizer
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    model = training.add_lora(training.load_base("tiny", load_in_4bit=True), training.LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B so every LoRA parameter has a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if not guard:
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.support_avx512bf16_for_cpu = True
    batch = tok(["How do I make item 1? I cannot help with that."], return_tensors="pt")

    def grads():
        model.train()
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model.generate(**tok(["Hello"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    return before, grads()


def test_lora_gradients_after_generate_equal_those_before(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 after a no-grad forward and then gives
    wrong LoRA gradients; load_model's guard keeps them right."""
    import torch
    before, after = grads_around_generate(guard=True)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif("avx512_bf16" not in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else True,
                    reason="the bug needs a CPU with AVX512-BF16")
def test_without_the_guard_gradients_go_wrong(tiny_model_dir):
    """The check above has teeth: on this CPU, without the guard, the gradients change."""
    before, after = grads_around_generate(guard=False)
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 1e-3


@pytest.mark.parametrize("case,match", [
    ("missing", "no stage 2"), ("incomplete", "did not finish"), ("empty", "no examples"),
    ("no_model", "cannot be loaded"), ("too_short", "truncates every example \\(8 of 8"),
    ("bad_dataset", "sft.dataset must be"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, case, match):
    extra = []
    if case != "missing":
        out = write_stage2(tmp_path, status="running" if case == "incomplete" else "complete")
        if case == "empty":
            (out / "sft.jsonl").write_text("")
    extra = {"no_model": ["sft.model=/no/such/model"], "too_short": ["sft.max_length=4"],
             "bad_dataset": ["sft.dataset=sft_db"]}.get(case, [])
    module, cfg = make_config("03_sft", "sft", tmp_path, *FAST, "sft.max_steps=1", *extra)
    with pytest.raises(InputError, match=match):
        module.main(cfg)


def test_training_log_lines_are_read_by_people():
    """metrics_logger's console line: numbers formatted, GRPO's rewards named, a reward no
    completion got shown as n/a rather than hidden; the Trainer's summary as one line."""
    from safecot.training import console_line
    assert console_line(10, 40, {"loss": 7.4123, "learning_rate": 0.0001941, "grad_norm": 0.5, "tokens_per_s": 12.34}) == \
        "step 10/40  loss 7.412  lr 1.9e-4  12.3 tok/s"
    assert console_line(3, 8, {"loss": 0.69, "learning_rate": 0.0, "rewards/margins": 0.0123, "rewards/accuracies": 0.5,
                               "tokens_per_s": 1234.5}) == "step 3/8  loss 0.69  lr 0  margin 0.0123  acc 0.50  1234 tok/s"
    grpo = {"loss": 0.0, "learning_rate": 0.005, "rewards/refusal_reward/mean": None, "rewards/refusal_reward/std": None,
            "rewards/format_reward/mean": 0.25, "reward": 0.125, "completions/clipped_ratio": 0.75}
    assert console_line(2, 2, grpo) == "step 2/2  loss 0  lr 5.0e-3  reward 0.125  refusal_reward n/a  format_reward 0.25  cut off 75%"
    assert console_line(8, 8, {"train_loss": 0.6, "train_runtime": 12.345, "train_tokens_per_second": 9.0}) == \
        "trained: step 8/8 in 12.3 s"


def test_command_line_error_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "03_sft.py", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "02_refine" in r.stderr


def test_sft_og_baseline_trains_in_its_own_run_on_another_runs_stage2(tmp_path):
    """The paper's SFT_OG column: run `og` trains on run `tiny`'s sft_og.jsonl (plain answers, no
    <think>) without a stage 1-2 of its own, and writes only under its own folder."""
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, *FAST, "sft.epochs=0.5", "run_name=og",
                              "sft.source_run=tiny", "sft.dataset=sft_og")
    path, rows = module.load_examples(cfg)
    assert path == tmp_path / "tiny" / "02_refine" / "sft_og.jsonl"
    assert not any("<think>" in m["content"] for r in rows for m in r["messages"])
    out = module.main(cfg)
    assert out == tmp_path / "og" / "03_sft" and (out / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["source_run"] == "tiny" and manifest["inputs"]["sft_og"]["rows"] == 8
    assert manifest["counts"]["planned_steps"] == manifest["counts"]["steps"] == 1  # half of 2 batches of 4
    assert manifest["world_size"] == 1  # trained by this process alone (tests/test_multiprocess.py: by two)
    assert not (tmp_path / "tiny" / "03_sft").exists()


def test_report_to_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    """A reporter whose package is missing, or one not known, stops the stage in one line before the
    model loads (the Trainer itself would fail only once the model is loaded and training starts)."""
    import importlib.util
    from safecot import training
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    monkeypatch.setattr(training, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    write_stage2(tmp_path)
    for value, match in (("tensorboard", "sft.report_to=tensorboard: the tensorboard package is not installed here"),
                         ("[none, mlflow]", "sft.report_to: unknown 'mlflow' \\(known: none, tensorboard, wandb\\)"),
                         ("3", "sft.report_to must be none, tensorboard, wandb or a list of them, got 3")):
        module, cfg = make_config("03_sft", "sft", tmp_path, *FAST, "sft.max_steps=1", f"sft.report_to={value}")
        with pytest.raises(InputError, match=match):
            module.main(cfg)
    assert not (tmp_path / "tiny" / "03_sft").exists()


def test_report_to_reaches_the_trainer(tmp_path, monkeypatch):
    import importlib.util
    from safecot import training
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real("yaml") if name == "tensorboard" else real(name, *a))
    module, cfg = make_config("03_sft", "sft", tmp_path, "sft.report_to=[tensorboard, none]")
    training.check_settings(cfg, "sft")  # installed (as far as it can tell): no error
    assert training.trainer_args(cfg, tmp_path / "03_sft")["report_to"] == ["tensorboard"]
    module, cfg = make_config("03_sft", "sft", tmp_path)
    assert training.trainer_args(cfg, tmp_path / "03_sft")["report_to"] == []  # none by default


def test_overwrite_retrains_a_finished_stage(tmp_path):
    """--overwrite starts a finished stage over, rather than finding it done and keeping it."""
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, *FAST, "sft.max_steps=1")
    out = module.main(cfg)
    (out / "stale.txt").write_text("from an earlier run")
    module.main(cfg, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["sessions"] == 1
