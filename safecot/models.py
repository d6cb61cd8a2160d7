"""Loading Hugging Face causal LMs the same way in every stage: the tiny offline model by the
name `tiny`, any Hub id or local folder otherwise; optional 4-bit nf4 (QLoRA's quantisation);
optional LoRA adapter on top.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .records import InputError


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes, on a CPU with AVX512-BF16, tries the optional `kernels` package for a fused
    4-bit matmul when it is imported (by peft or transformers, before any model loads) and logs a
    warning when that package is absent. It then uses its own C++ CPU kernel, which gives the same
    results; `kernels` is no requirement here, so every stage would print this line for nothing.
    Only that message is dropped; the logger's other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Installed when this module is imported, which must come before the first import of bitsandbytes
# (peft imports it; transformers.set_seed and the Trainer's callbacks import peft).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
# peft and trl (pinned) still ask models `is_gradient_checkpointing`, which transformers 5 renamed:
# a deprecation notice every stage that loads an adapter printed, about code not ours that works as meant.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def resolve_model(name: str) -> str:
    """`tiny` means the project's offline model; anything else is a Hub id or a local folder."""
    if name == "tiny":
        from .tiny import ensure_tiny
        one_thread_for_tiny()
        return str(ensure_tiny())
    return name


def one_thread_for_tiny() -> None:
    """The tiny model's matrices (64 wide) are too small to share among torch's CPU threads, and
    when other programs keep the cores busy, those threads spin-wait for each other: stage 1 of
    the tiny recipe took 86-135 s with torch's 2 threads and 17-26 s with one, on 2 shared cores
    (4-8x the CPU time). So the tiny model runs on one thread, unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(1)


def torch_dtype(name: str = "auto"):
    import torch
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def quantization_config(dtype: str = "auto"):
    import torch
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(dtype), bnb_4bit_quant_storage=torch.uint8,
    )


def disable_avx512bf16_repack(model) -> int:
    """bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights after a no-grad forward
    (generation, evaluation) and then computes wrong LoRA gradients. Keeping every Linear4bit
    on the portable kernel costs a little CPU speed and keeps training correct."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_tokenizer(name: str, padding_side: str = "left"):
    from transformers import AutoTokenizer
    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(_not_found(name, e)) from None
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, load_in_4bit: bool = False, dtype: str = "auto", adapter: str | None = None,
               trainable_adapter: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    path = resolve_model(name)
    kwargs = {"dtype": torch_dtype(dtype)}
    # Under `accelerate launch` / torchrun each process loads its copy on its own GPU (LOCAL_RANK).
    gpu = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) if torch.cuda.is_available() else None
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": gpu} if gpu is not None else {"": "cpu"}
    elif gpu is not None:
        kwargs["device_map"] = {"": gpu}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(_not_found(name, e)) from None
    disable_avx512bf16_repack(model)
    if adapter:
        from peft import PeftModel
        if not (Path(adapter) / "adapter_config.json").exists():
            raise InputError(f"{adapter}: no LoRA adapter here (adapter_config.json missing)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    return model


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a turn: a generation without one ran out of its token budget."""
    stop = model.generation_config.eos_token_id
    stop = (stop if isinstance(stop, list) else [stop]) + [tokenizer.eos_token_id]
    return {t for t in stop if t is not None}


def check_loadable(name: str) -> None:
    """The model's config can be read (a local folder, the cache, or the Hub with access granted):
    one small file, no weights. Stage 5 asks this of its judges before any answer is generated, so
    a gated judge (Llama Guard) whose licence is not accepted stops the stage at once, not after
    an hour of generation."""
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise InputError(_not_found(name, e)) from None


def _not_found(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: only local folders and cached models load)" if offline else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"model '{name}' cannot be loaded{hint}: {first}"
