"""benchmarks/gpu_check.py at tiny size on the CPU, so the GPU check cannot rot: every part runs
through the stages' own trainers and backend, and the JSON and table have what the README says."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_7b_architecture_is_qwen2_5_7b():
    """The hard-coded config builds Qwen2.5-7B's 7,615,616,512 parameters (its model card: 7.61B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = dict(gpu_check().SIZES["7b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    assert model.config.rope_parameters["rope_theta"] == 1e6


def test_the_judge_architecture_is_llama_3_1_8b():
    """Llama Guard 3 8B's (Llama-3.1-8B's) 8,030,261,248 parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = dict(gpu_check().SIZES["judge-7b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


@pytest.mark.slow
def test_gpu_check_runs_every_part_at_tiny_size(tmp_path):
    out = tmp_path / "check.json"
    gpu_check().main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "64", "--batch", "2",
                      "--gen-prompts", "3", "--gen-tokens", "4", "--judge-items", "5", "--judge-answer-words", "30",
                      "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["gpu"] is None and result["machine"]["torch"]
    assert result["anchors"]["sft_tokens_per_s"]["value"] == 2400 and result["anchors"]["sft_peak_gib"]["value"] == 9.0
    sft, dpo, gen = (result["parts"][p] for p in ("sft", "dpo", "generate"))
    # stage 3's trainer on the recipe's settings (configs/qwen2.5-7b.yaml: 4-bit, r 16), on a quantised model
    assert sft["status"] == "ok" and (sft["batch_size"], sft["seq_len"], sft["lora_r"]) == (2, 64, 16)
    assert sft["load_in_4bit"] is True and sft["linear4bit_layers"] == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert sft["timed_steps"] == 1 and sft["tokens_per_s"] > 0 and sft["peak_gib"] > 0
    assert dpo["status"] == "ok" and dpo["reference"].startswith("the starting adapter") and dpo["step_s"] > 0
    assert dpo["pairs_per_step"] == 2 and dpo["expected_step_s"] == round(2 * 2 * 64 * 4 / 3 / 2400, 2)
    # stage 1's initial-CoT prompts share the policies as one prefix; every answer is exactly --gen-tokens long
    assert gen["status"] == "ok" and gen["prompts"] == 3 and gen["generated_tokens"] == 3 * 4
    assert gen["shared_prefix_tokens"] > 1000 and gen["tokens_per_s"] > 0
    # stage 5's guard judges on the judge-sized architecture: a text verdict of --judge-tokens, a scored one
    judges = result["parts"]["judges"]
    assert judges["status"] == "ok" and judges["architecture"] == "judge-tiny" and judges["items"] == 5
    assert (judges["text"]["kind"], judges["text"]["new_tokens"]) == ("llamaguard3", 8)
    assert (judges["scored"]["kind"], judges["scored"]["new_tokens"]) == ("strongreject", 1)
    assert judges["text"]["verdicts_per_s"] > 0 and judges["scored"]["verdicts_per_s"] > 0
    vllm = result["parts"]["vllm"]
    if importlib.util.find_spec("vllm") is None:
        assert vllm == {"status": "skipped", "reason": "vllm is not installed (pip install vllm to compare)",
                        "part_s": vllm["part_s"], "held_at_start_gib": 0.0}
    table = out.with_suffix(".md").read_text()
    assert "| sft | tokens/s (batch 2 x 64) |" in table and "| 2400 |" in table and "| vllm | tokens/s | skipped" in table
    assert "| judges | llamaguard3 verdicts/s (text: 8 new token(s), 5 items) |" in table
