"""Stages 3 and 4 trained by two processes on a CPU (gloo), launched as a user would with the shipped
configs/accelerate/ddp.yaml: both ranks train (the manifest says world_size 2), one process writes
one set of outputs, and the loss curve is one process's on the same data and seed.

Two processes of 4 examples each take the same 8 examples per step as one process of 8, and DDP
averages their gradients, so the curves agree to float rounding; a launch that left one rank
training alone on its 4 examples would not."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_config
from training_fixtures import metrics, write_stage2

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
          "--num_processes", "2"]
SFT = ("sft.load_in_4bit=false", "sft.grad_accum=1", "sft.learning_rate=0.01", "sft.warmup=0", "sft.logging_steps=1",
       "sft.max_steps=4", "sft.save_steps=2", "sft.lora={r: 8, alpha: 16, dropout: 0.0}")
DPO = ("dpo.grad_accum=1", "dpo.learning_rate=0.01", "dpo.warmup=0", "dpo.logging_steps=1", "dpo.max_steps=3")
OUTPUTS = {".lock", "manifest.json", "metrics.jsonl", "checkpoints", "adapter"}  # and 03_sft's loss_preview.jsonl


def launch(script: str, runs, *overrides: str) -> str:
    argv = [*LAUNCH, f"{script}.py", "--config", "configs/tiny.yaml", f"runs_dir={runs}", *overrides]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `tiny` trained by two processes (SFT, then DPO from its adapter), run `one` by this
    process on the same stage-2 data, 8 examples per step."""
    runs = tmp_path_factory.mktemp("runs")
    write_stage2(runs)
    printed = launch("03_sft", runs, *SFT, "sft.batch_size=4")
    printed += launch("04_dpo", runs, *DPO, "dpo.batch_size=4")
    module, cfg = make_config("03_sft", "sft", runs, *SFT, "sft.batch_size=8", "run_name=one", "sft.source_run=tiny")
    module.main(cfg)
    module, cfg = make_config("04_dpo", "dpo", runs, *DPO, "dpo.batch_size=8", "run_name=one", "dpo.source_run=tiny")
    module.main(cfg)
    return runs, printed


@pytest.mark.slow
def test_two_ranks_train_and_one_writes(runs):
    runs, printed = runs
    for stage in ("03_sft", "04_dpo"):
        two, one = manifest(runs / "tiny" / stage), manifest(runs / "one" / stage)
        assert (two["world_size"], one["world_size"]) == (2, 1), stage
        assert two["status"] == "complete" and two["counts"]["steps"] == one["counts"]["steps"]
        assert {p.name for p in (runs / "tiny" / stage).iterdir()} == OUTPUTS | ({"loss_preview.jsonl"} if stage == "03_sft" else set())
        assert [m["step"] for m in metrics(runs / "tiny" / stage) if "loss" in m] == \
            [m["step"] for m in metrics(runs / "one" / stage) if "loss" in m], stage  # each step logged once
        # one summary and one line per step, not one per process
        assert printed.count(f"{stage}: complete") == 1, printed
    steps = [line.split()[1] for line in printed.splitlines() if line.startswith("step ")]
    assert steps == ["1/4", "2/4", "3/4", "4/4", "1/3", "2/3", "3/3"], printed
    assert sorted(p.name for p in (runs / "tiny" / "03_sft" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (runs / "tiny" / "04_dpo" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_two_processes_follow_one_process_loss_curve(runs):
    runs, _ = runs
    for stage, keys in (("03_sft", ("loss", "grad_norm")), ("04_dpo", ("loss", "rewards/margins", "rewards/accuracies"))):
        two = [m for m in metrics(runs / "tiny" / stage) if "loss" in m]
        one = [m for m in metrics(runs / "one" / stage) if "loss" in m]
        assert len(two) == len(one) >= 3
        for a, b in zip(two, one):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (stage, a["step"], key)
            assert a["tokens_seen"] == b["tokens_seen"]  # both ranks' tokens counted
        assert two[-1]["loss"] < two[0]["loss"] - 0.05, stage  # and it learnt: the curves are not flat
