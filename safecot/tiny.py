"""The offline tiny model: a random Llama-style causal LM and a byte-level BPE tokenizer
trained here, so every stage runs for real without the Hugging Face Hub.

The model is random: it proves the workflow (generation, 4-bit loading, training, evaluation),
not the science. It is built once into a cache folder and reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the recipe below changes, so stale caches are rebuilt rather than reused.
TINY_VERSION = 1
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "data" / "models"

# ChatML with {% generation %} markers: trl's assistant-only loss asks the template which
# tokens the assistant wrote. The end-of-turn token sits inside the marker so it is learnt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the tiny model lives: $SAFECOT_TINY_DIR, else data/models/tiny-v<N>-<corpus hash>.
    The tokenizer is trained on the project's data files, so editing them builds a new one."""
    if cache is None and os.environ.get("SAFECOT_TINY_DIR"):
        return Path(os.environ["SAFECOT_TINY_DIR"])
    digest = hashlib.sha256("\0".join(_corpus()).encode("utf-8")).hexdigest()[:8]
    return Path(cache or DEFAULT_CACHE) / f"tiny-v{TINY_VERSION}-{digest}"


def _corpus() -> list[str]:
    # The tokenizer learns from the project's own text (policies, templates, prompts), so the
    # words the agents see are a handful of tokens each, not a byte soup.
    root = Path(__file__).resolve().parent.parent / "data"
    texts = []
    for pattern in ("policies/*.yaml", "templates/*.txt", "prompts/*.jsonl", "eval/*.jsonl"):
        texts += [p.read_text(encoding="utf-8") for p in sorted(root.glob(pattern))]
    texts.append("THOUGHTS: RESPONSE: VERDICT: AGREE REVISE EXPLICIT IMPLICIT I agree with the previous agent.")
    return texts


def build_tiny(out: Path, vocab_size: int = 2048, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Train the tokenizer, initialise the model and save both to `out` (atomically)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>"], padding_side="left",
        model_max_length=8192,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-build-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
    try:
        tmp.rename(out)  # another process may have won the race; theirs is as good as ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny(cache: str | os.PathLike | None = None) -> Path:
    """Path of the tiny model, building it the first time."""
    out = tiny_dir(cache)
    if not (out / "tiny.json").exists():
        build_tiny(out)
    return out
