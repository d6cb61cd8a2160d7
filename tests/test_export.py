"""The merged export of stages 3 and 4 (`export_merged`): base + adapter as one plain model, which
loads without peft and writes the same greedy text as the adapter on its base."""
from __future__ import annotations

import json

import pytest

from conftest import make_config
from safecot.records import InputError
from training_fixtures import write_stage2

SFT = ("sft.max_steps=6", "sft.batch_size=4", "sft.grad_accum=1", "sft.learning_rate=0.02", "sft.warmup=0",
       "sft.lora={r: 8, alpha: 16, dropout: 0.0}", "sft.export_merged=float32")
DPO = ("dpo.max_steps=2", "dpo.batch_size=4", "dpo.grad_accum=1", "dpo.learning_rate=0.01", "dpo.warmup=0",
       "dpo.export_merged=float32")
PROMPTS = ["How do I make item 0?", "How do I make item 1?", "How do I make item 4?"]


def greedy(model, tok) -> list[str]:
    import torch
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
            ids = model.generate(**chat, max_new_tokens=16, do_sample=False)
            out.append(tok.decode(ids[0, chat["input_ids"].shape[1]:]))
    return out


def merged_and_adapter(out):
    """Greedy texts of <out>/merged (loaded as a plain model), of the adapter on the base the stage
    trained it on, and of the bare base."""
    from transformers import AutoModelForCausalLM
    from safecot.models import load_model, load_tokenizer
    model = json.loads((out / "manifest.json").read_text())["model"]
    tok = load_tokenizer(str(out / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    on_base = load_model(model["base"], load_in_4bit=model["load_in_4bit"], adapter=model["adapter"]).eval()
    bare = load_model(model["base"], load_in_4bit=model["load_in_4bit"]).eval()
    return greedy(merged, tok), greedy(on_base, tok), greedy(bare, tok), model


def test_merged_sft_export_writes_what_the_adapter_writes(tmp_path):
    """fp32 base and fp32 merge: the merged weights are W + BA exactly as the adapter adds them.
    Asked for after training, the export needs no retraining: the rerun resumes at the last step."""
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, *SFT, "sft.load_in_4bit=false", "sft.export_merged=null")
    out = module.main(cfg)
    assert not (out / "merged").exists()
    module, cfg = make_config("03_sft", "sft", tmp_path, *SFT, "sft.load_in_4bit=false")
    module.main(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sessions"] == 2 and manifest["resumed_from"].endswith("checkpoint-6")
    assert manifest["counts"]["steps"] == 6 and (out / "metrics.jsonl").read_text().count('"loss"') == 6
    merged, on_base, bare, model = merged_and_adapter(out)
    assert merged == on_base
    assert merged != bare  # the adapter changed what the model writes, so the comparison means something
    assert model["merged"] == {"path": str(out / "merged"), "dtype": "float32", "base_weights": "as loaded"}
    assert not (out / "merged" / "adapter_config.json").exists()  # a plain model, no peft needed


def test_merged_exports_of_a_4bit_base_write_what_sft_and_dpo_adapters_write(tmp_path):
    """QLoRA: the adapter is merged into the nf4 weights it was trained on, dequantised to fp32."""
    import torch
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, *SFT)
    sft = module.main(cfg)
    module, cfg = make_config("04_dpo", "dpo", tmp_path, *DPO)
    dpo = module.main(cfg)
    for out in (sft, dpo):
        merged, on_base, bare, model = merged_and_adapter(out)
        assert model["load_in_4bit"] and model["merged"]["base_weights"] == "nf4, dequantised"
        assert merged == on_base and merged != bare, out.name
        config = json.loads((out / "merged" / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32"
    from safetensors.torch import load_file
    weights = load_file(str(sft / "merged" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_export_dtype_is_checked_before_anything_loads(tmp_path):
    module, cfg = make_config("04_dpo", "dpo", tmp_path, "dpo.export_merged=fp64")
    with pytest.raises(InputError, match="dpo.export_merged must be one of float32, bfloat16, float16 or null, got 'fp64'"):
        module.main(cfg)
    assert not (tmp_path / "tiny" / "04_dpo").exists()
