"""Tiny random Llama models that carry the tokenizers and chat templates real models use, built
offline: Mistral's own sentencepiece vocabularies (shipped by mistral-common) with the original
Mistral-7B-Instruct v0.2 and v0.3 templates (fixture files), and the Qwen2.5, Llama 3.1 and
DeepSeek-R1-Distill templates that trl ships, on the project's tokenizer with those families'
special tokens added. The weights are random: these models test formats, not answers."""
from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = ("mistral-v0.2", "mistral-v0.3", "qwen2.5", "llama3.1", "r1-distill")
# The end-of-turn token every learnt assistant turn must end with.
END_OF_TURN = {"mistral-v0.2": "</s>", "mistral-v0.3": "</s>", "qwen2.5": "<|im_end|>",
               "llama3.1": "<|eot_id|>", "r1-distill": "<\uff5cend\u2581of\u2581sentence\uff5c>"}
# Special tokens added to the project's tokenizer for the families whose vocabularies are not shipped offline.
_FAMILY_TOKENS = {
    "qwen2.5": {"bos": None, "eos": "<|im_end|>", "extra": []},
    "llama3.1": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "extra": ["<|start_header_id|>", "<|end_header_id|>"]},
    "r1-distill": {"bos": "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "eos": END_OF_TURN["r1-distill"],
                   "extra": ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]},
}
_TRL_TEMPLATES = {"qwen2.5": "qwen2_5.jinja", "llama3.1": "llama3_1.jinja", "r1-distill": "deepseek_r1_distill.jinja"}
_MISTRAL = {"mistral-v0.2": ("tokenizer.model.v1", "mistral_v0.2.jinja"),
            "mistral-v0.3": ("mistral_instruct_tokenizer_240323.model.v3", "mistral_v0.3.jinja")}


def build_tokenizer(fmt: str, scratch: Path):
    if fmt in _MISTRAL:
        import mistral_common
        from transformers import LlamaTokenizer
        vocab, template = _MISTRAL[fmt]
        folder = scratch / f"{fmt}-spm"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(mistral_common.__file__).parent / "data" / vocab, folder / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(folder)
        tok.chat_template = (FIXTURES / template).read_text(encoding="utf-8")
        return tok
    import trl
    from safecot.models import load_tokenizer
    spec = _FAMILY_TOKENS[fmt]
    tok = load_tokenizer("tiny")
    new = [t for t in [spec["bos"], spec["eos"], *spec["extra"]] if t and t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    tok.bos_token, tok.eos_token = spec["bos"], spec["eos"]
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / _TRL_TEMPLATES[fmt]).read_text(encoding="utf-8")
    return tok


def build_format_model(fmt: str, out: Path) -> Path:
    """A random 2-layer Llama on `fmt`'s tokenizer and template, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if (out / "config.json").exists():
        return out
    tok = build_tokenizer(fmt, out.parent)
    tok.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
