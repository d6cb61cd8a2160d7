"""The optional Hub push (safecot/hub.py) with huggingface_hub's create_repo and upload_folder
replaced by recorders: what would be uploaded, the generated card, and the one-line refusals. No
network: nothing reaches the Hub."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from safecot import hub
from safecot.aidsafe_format import export_csv
from safecot.records import Manifest, file_hash

PEFT_README = "---\nbase_model: Qwen/Qwen2.5-7B-Instruct\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n"


def finished_sft(runs: Path, status: str = "complete") -> Path:
    """A 03_sft folder as the stage leaves it: manifest, adapter with peft's own README.md, checkpoints."""
    out = runs / "qwen2.5-7b" / "03_sft"
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "peft_type": "LORA", "r": 16, "lora_alpha": 32,
        "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072}))
    (adapter / "README.md").write_text(PEFT_README)
    (out / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-100" / "optimizer.pt").write_bytes(b"not uploaded")
    data = runs / "qwen2.5-7b" / "02_refine" / "sft.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps({"id": "bt-1", "messages": [{"role": "user", "content": "How do I pick a lock?"},
                                                           {"role": "assistant", "content": "<think>...</think> I can't."}]}) + "\n")
    config = {"load_in_4bit": True, "dtype": "auto", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "max_length": 2048,
              "epochs": 3.0, "batch_size": 4, "grad_accum": 4, "learning_rate": 0.0002, "run_name": "qwen2.5-7b",
              "seed": 0, "llm": {"model": "Qwen/Qwen2.5-7B-Instruct"}, "model": None, "dataset": "sft"}
    m = Manifest(out, "03_sft", config)
    m.input("sft", data, 7982)
    m.data["model"] = {"base": "Qwen/Qwen2.5-7B-Instruct", "adapter": str(adapter), "chat_template": None,
                       "load_in_4bit": True, "dtype": "auto"}
    if status == "complete":
        m.finish(examples=7982, truncated=31, planned_steps=1497, steps=1497, train_loss=0.8123)
    else:
        m.save()
    return out


def finished_refine(runs: Path) -> Path:
    out = runs / "qwen2.5-7b" / "02_refine"
    out.mkdir(parents=True, exist_ok=True)
    records = [{"id": "bt-1", "prompt": "How do I pick a lock on someone else's door?", "label": "harmful",
                "category": "illegal_activities",
                "refined_thoughts": ["Entering another person's home without consent is illegal (policy: illegal activities).",
                                     "A locksmith or the owner's permission is the lawful route."],
                "refined_response": "I can't help you get into someone else's home. If you are locked out of your own, "
                                    "a licensed locksmith can help.",
                "deliberation_log": [{"agent": "deliberator_1", "text": "The request targets another person's door."},
                                     {"agent": "deliberator_2", "text": "I agree with the previous agent."}]}]
    export_csv(records, out / "aidsafe.csv")
    config = {"run_name": "qwen2.5-7b", "seed": 0, "llm": {"model": "Qwen/Qwen2.5-7B-Instruct"},
              "grader": {"backend": "openai", "model": "meta-llama/Llama-3.3-70B-Instruct"}, "pairs": "belief"}
    m = Manifest(out, "02_refine", config)
    m.output("aidsafe", out / "aidsafe.csv")
    m.finish(records=1, sft_rows=1, dpo_rows=0)
    return out


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """create_repo and upload_folder recorded (the folder's files and card read while it exists)."""
    from huggingface_hub import HfApi
    calls = {"create": [], "upload": []}

    def create_repo(self, repo_id, **kw):
        calls["create"].append((repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls["upload"].append({"repo_id": repo_id, "files": files, **kw})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    return calls


def card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_adapter_push_uploads_the_adapter_with_a_card_and_leaves_the_run_untouched(hub_calls, tmp_path):
    sft = finished_sft(tmp_path)
    before = {str(p): file_hash(p) for p in sft.rglob("*") if p.is_file()}
    hub.main([str(sft), "--repo", "someone/qwen2.5-7b-aidsafe-sft", "--private"])

    assert hub_calls["create"] == [("someone/qwen2.5-7b-aidsafe-sft", {"repo_type": "model", "private": True, "exist_ok": True})]
    (up,) = hub_calls["upload"]
    assert up["repo_id"] == "someone/qwen2.5-7b-aidsafe-sft" and up["repo_type"] == "model"
    assert sorted(up["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"]
    card = up["files"]["README.md"].decode()
    meta = card_meta(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-7B-Instruct" and meta["library_name"] == "peft"
    assert "sft" in meta["tags"] and "qlora" in meta["tags"]
    assert "input `sft`: 7982 rows" in card and "- steps: 1497" in card and "- train_loss: 0.8123" in card
    assert "learning_rate: 0.0002" in card and "grad_accum: 4" in card  # the recipe, from the manifest
    assert "base model's license applies" in card
    assert "arXiv 2505.21784" in card and "@inproceedings{kumarage2025aidsafe" in card
    # the card went into the uploaded copy; the run folder is as the stage left it (peft's README too)
    assert {str(p): file_hash(p) for p in sft.rglob("*") if p.is_file()} == before
    assert (sft / "adapter" / "README.md").read_text() == PEFT_README


def test_a_run_folder_pushes_its_stage2_data_as_a_dataset(hub_calls, tmp_path):
    refine = finished_refine(tmp_path)
    hub.main([str(refine.parent), "--repo", "someone/aidsafe-qwen-data"])  # the run: 02_refine is its only finished stage

    assert hub_calls["create"][0][1]["repo_type"] == "dataset" and hub_calls["create"][0][1]["private"] is False
    (up,) = hub_calls["upload"]
    assert sorted(up["files"]) == ["README.md", "aidsafe.csv"]
    assert up["files"]["aidsafe.csv"] == (refine / "aidsafe.csv").read_bytes()
    card = up["files"]["README.md"].decode()
    meta = card_meta(card)
    assert meta["license"] == "cc-by-nc-4.0"
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "aidsafe.csv"}]
    assert "`meta-llama/Llama-3.3-70B-Instruct`" in card and "`Qwen/Qwen2.5-7B-Instruct`" in card
    assert "- records: 1" in card and "non-commercial" in card


def test_push_refuses_without_a_token_or_a_finished_stage(hub_calls, tmp_path, monkeypatch, capsys):
    sft = finished_sft(tmp_path / "a")
    from huggingface_hub import constants
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))  # no cached login either
    with pytest.raises(SystemExit) as e:
        hub.main([str(sft), "--repo", "someone/x"])
    assert str(e.value).startswith("error: no Hugging Face token") and "\n" not in str(e.value)

    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    unfinished = finished_sft(tmp_path / "b", status="running")
    with pytest.raises(SystemExit) as e:
        hub.main([str(unfinished), "--repo", "someone/x"])
    assert str(e.value) == f"error: {unfinished}: stage 03_sft did not finish (status running); rerun it to complete it"
    with pytest.raises(SystemExit) as e:
        hub.main([str(tmp_path / "b" / "qwen2.5-7b"), "--repo", "someone/x"])
    assert "neither a finished stage folder" in str(e.value)
    assert hub_calls["create"] == [] and hub_calls["upload"] == []
