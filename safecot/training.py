"""QLoRA training machinery shared by stages 3 (SFT) and 4 (DPO / GRPO): the trainer settings both
stages' Configs inherit (TrainerSettings: one flat set of recipe keys, written once, checked before
any model loads), the LoRA settings, the 4-bit base plus adapter, CPU/GPU trainer defaults, the
locked stage folder under `accelerate launch` (one process writes; the manifest's `world_size` says
how many trained), the tokenised SFT set with its assistant-only
loss mask (the mask itself is made by safecot/chat.py for any chat template), the truncation
check, the planned number of optimiser steps (with a warning when they are too few), the metrics
log, resume from the last checkpoint, and saving the adapter (and, if asked, the merged model).
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .records import InputError


@dataclass
class LoraSettings:
    r: int = 16                         # adapter rank (QLoRA used 64; 16 is the common 7B default)
    alpha: int = 32                     # scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.05
    target_modules: str | list = "all-linear"  # every linear layer but the LM head, as in QLoRA


@dataclass
class TrainerSettings:
    """What stages 3 and 4 set alike; each stage's Config inherits these fields (so the recipe keys
    stay flat: `sft.learning_rate`, `dpo.lora.r`) and changes the defaults that differ (its own
    epochs, learning rate, warm-up)."""
    load_in_4bit: bool = True           # QLoRA: frozen nf4 double-quantised base
    dtype: str = "auto"                 # compute dtype: auto = bf16 on a GPU that has it, else fp32
    lora: LoraSettings = field(default_factory=LoraSettings)  # a new adapter's shape
    max_length: int = 2048              # tokens per example (or prompt + answer); longer ones are cut (and counted)
    epochs: float = 3.0                 # passes over the data ...
    max_steps: int | None = None        # ... or this many optimiser steps if set
    batch_size: int = 4                 # examples per device per micro-batch
    grad_accum: int = 4                 # micro-batches per optimiser step
    learning_rate: float = 2e-4         # QLoRA's value for 7B models
    lr_scheduler: str = "cosine"
    warmup: float = 0.03                # warm-up steps, or a fraction of all steps if < 1
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True  # recompute activations (GPU only): less memory, ~20% slower
    logging_steps: int = 10             # a metrics.jsonl line every N steps
    save_steps: int = 100               # a checkpoint every N steps (the last two are kept)
    report_to: str | list = "none"      # live training curves besides metrics.jsonl: none | tensorboard | wandb (or a list)
    export_merged: str | None = None    # also write merged/: base + adapter as one model in this dtype (float32 |
                                        # bfloat16 | float16), a 4-bit base dequantised first; null: the adapter only


# Raising the step budget (or logging more often) and rerunning carries on from the last checkpoint;
# asking for a merged export or another reporter afterwards exports or reports without retraining.
RESUME_IGNORES = ("epochs", "max_steps", "logging_steps", "save_steps", "report_to", "export_merged")


def trainer_args(cfg, out: Path) -> dict:
    """A stage Config's TrainerSettings (and seed) as the keyword arguments every trl config takes
    (SFTConfig, DPOConfig, GRPOConfig), plus the hardware defaults; checkpoints in <out>/checkpoints."""
    gc = cfg.gradient_checkpointing and on_gpu()
    return dict(output_dir=str(out / "checkpoints"), seed=cfg.seed, per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
                lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
                num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, logging_steps=cfg.logging_steps,
                save_steps=cfg.save_steps, logging_first_step=True, report_to=reporters(cfg.report_to),
                run_name=f"{cfg.run_name}/{out.name}", **trainer_defaults(gc))


# What each `report_to` needs installed (any one of the packages), as transformers' callbacks look for it.
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
DTYPES = ("float32", "bfloat16", "float16")


def reporters(report_to) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n != "none"]


def check_settings(cfg, section: str) -> None:
    """The trainer settings a typo or a missing package would otherwise break only after the model
    has loaded (or, for report_to, after the first steps): one line naming the key, before anything loads."""
    import importlib.util
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else cfg.report_to
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{section}.report_to must be none, tensorboard, wandb or a list of them, got {cfg.report_to!r}")
    for name in reporters(names):
        if name not in REPORTERS:
            raise InputError(f"{section}.report_to: unknown '{name}' (known: none, {', '.join(REPORTERS)})")
        if not any(importlib.util.find_spec(p) for p in REPORTERS[name]):
            raise InputError(f"{section}.report_to={name}: the {REPORTERS[name][0]} package is not installed here "
                             f"(pip install {REPORTERS[name][0]}, or set {section}.report_to=none)")
    if cfg.export_merged is not None and cfg.export_merged not in DTYPES:
        raise InputError(f"{section}.export_merged must be one of {', '.join(DTYPES)} or null, got {cfg.export_merged!r}")


# ---- models ----------------------------------------------------------------------------------

def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def load_base(model: str, load_in_4bit: bool = True, dtype: str = "auto", gradient_checkpointing: bool = False):
    """The frozen base: nf4 double-quantised weights when `load_in_4bit`, made ready for k-bit
    training (norms in fp32, input grads for checkpointing). The AVX512-BF16 guard is set by
    load_model on every Linear4bit and stays set for the life of the model."""
    from peft import prepare_model_for_kbit_training
    from .models import load_model
    base = load_model(model, load_in_4bit=load_in_4bit, dtype=dtype)
    if load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    base.config.use_cache = False
    return base


def add_lora(base, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def load_adapter(base, adapter: str | Path, trainable: bool = True):
    """A saved adapter on `base` under peft's name "default"."""
    from peft import PeftModel
    if not (Path(adapter) / "adapter_config.json").exists():
        raise InputError(f"{adapter}: no LoRA adapter here (adapter_config.json missing)")
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)


def trainer_defaults(gradient_checkpointing: bool) -> dict:
    """Settings that depend on the hardware: bf16 and a paged 8-bit optimiser on a GPU; fp32
    and plain AdamW on a CPU (trl's configs default to bf16, which a CPU run must turn off)."""
    gpu = on_gpu()
    import torch
    bf16 = gpu and torch.cuda.is_bf16_supported()
    return {
        "use_cpu": not gpu, "bf16": bf16, "fp16": gpu and not bf16,
        "optim": "paged_adamw_8bit" if gpu else "adamw_torch",
        "activation_checkpointing": gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
        "save_total_limit": 2, "include_num_input_tokens_seen": "non_padding",
        # Every LoRA weight takes part in every forward pass: DDP need not search the graph for unused ones.
        "dataloader_num_workers": 0, "ddp_find_unused_parameters": False,
        # No tqdm bar: it wrote each log as a raw dict between two redraws of the bar. metrics_logger
        # prints one line per logging step instead (train_resuming drops the Trainer's PrinterCallback).
        "disable_tqdm": True,
    }


MIN_STEPS = 100                         # fewer optimiser steps than this barely move a LoRA adapter


def processes() -> int:
    """Processes training together (`accelerate launch --num_processes N` and torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_state():
    """accelerate's PartialState for this launch, which joins the processes' group (gloo on a CPU,
    nccl on GPUs). On a machine without a GPU it must be asked for with cpu=True: otherwise each of
    torchrun's processes takes itself for the only one (DistributedType.NO), with no barrier between
    them, while the Trainer later joins them for training."""
    from accelerate import PartialState
    return PartialState(cpu=not on_gpu())


def planned_steps(rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None = None,
                  group: int = 1, n_proc: int | None = None) -> int:
    """The optimiser steps a run will take, counted as the trainers count them. SFT and DPO: each
    process takes batch_size rows per micro-batch and grad_accum micro-batches per step, a short last
    batch included. GRPO (`group` = completions per prompt): a step is one generation batch of
    batch_size x processes x grad_accum completions, i.e. that over `group` prompts; prompts left
    over at the end of an epoch are not used (trl's RepeatSampler)."""
    if max_steps:
        return max_steps
    n_proc = n_proc or processes()
    if group > 1:
        per_epoch = rows // max(batch_size * n_proc * grad_accum // group, 1)
    else:
        per_epoch = math.ceil(math.ceil(rows / (batch_size * n_proc)) / grad_accum)
    return math.ceil(epochs * max(per_epoch, 1))


def plan_steps(stage: str, rows: int, what: str, batch_size: int, grad_accum: int, epochs: float,
               max_steps: int | None = None, group: int = 1) -> int:
    """planned_steps, with a warning when they are too few for the learning rate and its schedule to
    matter (the usual reason a preference stage seems to do nothing)."""
    steps = planned_steps(rows, batch_size, grad_accum, epochs, max_steps, group)
    if steps < MIN_STEPS and is_main_process():
        completions = f" x {group} completions" if group > 1 else ""
        how, fix = (f"max_steps={max_steps}", "raise max_steps") if max_steps else (
            f"{rows} {what}{completions} x {epochs:g} epoch(s) / ({batch_size} per batch x {grad_accum} accumulation "
            f"x {processes()} process(es))", f"use more {what} or epochs, or a smaller batch_size x grad_accum")
        print(f"warning: {stage} will take {steps} optimiser steps ({how}), fewer than {MIN_STEPS}: too few to "
              f"change the model much; {fix}")
    return steps


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or on a CPU the process's peak resident memory."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None. The Trainer writes the weights, the
    optimiser and scheduler, then trainer_state.json last: a kill while saving leaves a folder that
    lacks some of them, or a torn trainer_state.json."""
    path = Path(path)
    if not any((path / w).is_file() for w in WEIGHTS):
        return "no model weights"
    missing = [f for f in ("optimizer.pt", "scheduler.pt", "trainer_state.json") if not (path / f).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return "a torn trainer_state.json"
    return None


def last_checkpoint(folder: Path) -> str | None:
    """The latest complete `checkpoint-N` in `folder`. A later one cut off while it was being saved
    is removed (it can never be resumed from, and the Trainer would take it for the last one), with
    one line, and the one before it is used."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if is_main_process():
            print(f"warning: {path} is incomplete ({problem}; killed while it was being saved?): removed, "
                  "resuming from the checkpoint before it")
            shutil.rmtree(path, ignore_errors=True)
    return None


def train_resuming(trainer, checkpoints: Path):
    """Train, carrying on from the last checkpoint if an earlier run was interrupted."""
    from transformers import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # metrics_logger prints each logging step, once, for people
    resume = last_checkpoint(checkpoints)
    if resume and is_main_process():
        print(f"resuming from {resume}")
    return trainer.train(resume_from_checkpoint=resume), resume


def run_loss(result, resume: str | None, metrics: Path) -> float:
    """The mean training loss of the whole run. A resumed session's own figure covers only the steps
    it trained (and the Trainer divides it by every step), so then the logged losses are averaged
    over the steps each logging window covers."""
    if not resume:
        return result.training_loss
    total = steps = last = 0
    for line in Path(metrics).read_text(encoding="utf-8").splitlines() if Path(metrics).is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row.get("loss"), (int, float)) and row.get("step", 0) > last:
            total, steps, last = total + row["loss"] * (row["step"] - last), steps + row["step"] - last, row["step"]
    return total / steps if steps else result.training_loss


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def open_stage(cfg, stage: str, overwrite: bool, config: dict, resume_ignores: tuple = RESUME_IGNORES):
    """safecot.stage.open_stage under `accelerate launch`: only the main process locks the folder,
    clears it (--overwrite) and writes the manifest, which records how many processes trained
    (`world_size`); the others wait for it, then get manifest None and print no progress bars."""
    from . import stage as stages
    state = distributed_state()
    if not state.is_main_process:
        from datasets.utils.logging import disable_progress_bar
        from transformers.utils.logging import disable_progress_bar as disable_loading_bars
        disable_progress_bar()
        disable_loading_bars()
    with ExitStack() as held:
        with state.main_process_first():
            st = held.enter_context(stages.open_stage(cfg, stage, overwrite, config, resume_ignores,
                                                      main_process=state.is_main_process))
        st.record.data["world_size"] = state.num_processes
        yield st


def save_adapter(model, tokenizer, out: Path) -> Path:
    """Only the trained adapter ("default"), not trl's frozen "ref" copy, plus the tokenizer with
    the model's own (inference) chat template."""
    model.save_pretrained(str(out), selected_adapters=["default"])
    tokenizer.save_pretrained(str(out))
    return out


def export_merged(base: str, adapter: Path, out: Path, dtype: str, load_in_4bit: bool) -> dict:
    """base + adapter as one plain model in `dtype` (peft's merge_and_unload), with the adapter's
    tokenizer, loadable without peft. A 4-bit base is merged as the adapter was trained and is
    evaluated: on its nf4 weights, dequantised into `dtype`, not on the original weights, which
    differ from them by the quantisation error the adapter learnt around."""
    from .models import load_model, load_tokenizer, torch_dtype
    model = load_model(base, load_in_4bit=load_in_4bit, dtype=dtype)
    if load_in_4bit:
        model = model.dequantize(dtype=torch_dtype(dtype))
    model = load_adapter(model, adapter, trainable=False).merge_and_unload()
    model.to(torch_dtype(dtype)).save_pretrained(str(out))
    load_tokenizer(str(adapter)).save_pretrained(str(out))
    return {"path": str(out), "dtype": dtype, "base_weights": "nf4, dequantised" if load_in_4bit else "as loaded"}


# ---- metrics ---------------------------------------------------------------------------------

# The console line of a logging step: (log key, label, format), in this order, then each GRPO reward
# function's mean and the share of completions cut off; every other log goes to metrics.jsonl only.
CONSOLE = (("loss", "loss", ".4g"), ("learning_rate", "lr", "lr"), ("rewards/margins", "margin", ".3g"),
           ("rewards/accuracies", "acc", ".2f"), ("reward", "reward", ".3g"))


def _number(value, fmt: str) -> str:
    if fmt == "lr":  # 0.0001941 -> 1.9e-4
        return "0" if value == 0 else f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e+")
    return format(value, fmt)


def console_line(step: int, max_steps: int, row: dict) -> str:
    """One logging step for people: `step 10/40  loss 7.41  lr 1.9e-4  12.3 tok/s`; the Trainer's
    summary at the end of training is `trained: step 40/40 in 12.3 s`."""
    if "train_loss" in row:
        return f"trained: step {step}/{max_steps} in {row.get('train_runtime', 0):.1f} s"
    rewards = [k for k in row if k.startswith("rewards/") and k.endswith("/mean")]
    shown = [*CONSOLE, *((k, k.split("/")[1], ".3g") for k in rewards), ("completions/clipped_ratio", "cut off", ".0%")]
    parts = [f"step {step}/{max_steps}"]
    for key, label, fmt in shown:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            parts.append(f"{label} {_number(value, fmt)}")
        elif key in rewards:  # None: no completion of the step got this reward (e.g. all were cut off)
            parts.append(f"{label} n/a")
    speed = row.get("tokens_per_s")
    if isinstance(speed, (int, float)):
        parts.append(f"{speed:.1f} tok/s" if speed < 100 else f"{speed:.0f} tok/s")
    return "  ".join(parts)


def metrics_logger(path: Path):
    """A TrainerCallback appending one JSON line per logging step: the trainer's logs (loss, lr,
    DPO rewards/margins, GRPO rewards...) plus tokens/s since the previous line and peak memory,
    and printing that step as one readable line (console_line; the Trainer's own printer is
    dropped by the stages, trainer_defaults turns its progress bar off).
    It also asks for a checkpoint at the last step, so a rerun resumes rather than restarts."""
    from transformers import TrainerCallback

    class MetricsLogger(TrainerCallback):
        def __init__(self):
            self.t, self.tokens = time.perf_counter(), None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now, seen = time.perf_counter(), state.num_input_tokens_seen or 0
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            if self.tokens is not None and now > self.t and seen > self.tokens:
                row["tokens_per_s"] = round((seen - self.tokens) / (now - self.t), 1)
            row["tokens_seen"] = seen
            row["peak_mem_gib"] = round(peak_memory_gib(), 3)
            row["time"] = round(time.time(), 3)
            self.t, self.tokens = now, seen
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(console_line(state.global_step, state.max_steps, row), flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_save = True

        def on_train_begin(self, args, state, control, **kwargs):
            self.t, self.tokens = time.perf_counter(), state.num_input_tokens_seen or 0
            if state.is_world_process_zero and Path(path).exists():
                # A kill after the last checkpoint logged steps that this session trains again:
                # drop them, so the log stays one curve with each step once.
                lines = Path(path).read_text(encoding="utf-8").splitlines()
                kept = [x for x in lines if _logged_step(x) <= state.global_step]
                if len(kept) < len(lines):
                    tmp = Path(path).with_suffix(".tmp")
                    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
                    os.replace(tmp, path)

    return MetricsLogger()


def _logged_step(line: str) -> float:
    """The step of a metrics line; a torn or blank line (killed mid-write) counts as never logged."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return float("inf")


# ---- chats -> tokens with an assistant-only mask ---------------------------------------------

def tokenize_sft(fmt, rows: list[dict], max_length: int | None, where: str = "dataset") -> tuple[list[dict], dict]:
    """Tokenised rows for trl's SFTTrainer (safecot.chat.ChatFormat.tokenize) and counts; refuses a
    max_length that truncates every example, and drops examples whose assistant tokens would all
    be cut."""
    out, lengths, dropped, merged = [], [], 0, 0
    for row in rows:
        enc = fmt.tokenize(row["messages"])
        merged += enc.pop("merged_boundary")
        lengths.append(len(enc["input_ids"]))
        if max_length and len(enc["input_ids"]) > max_length:
            enc = {k: v[:max_length] for k, v in enc.items()}
            if not any(enc["assistant_masks"]):
                dropped += 1
                continue
        out.append({"id": row["id"], **enc})
    truncated = sum(n > max_length for n in lengths) if max_length else 0
    check_truncation(lengths, truncated, max_length, where)
    if truncated and is_main_process():
        print(f"warning: max_length={max_length} truncates {truncated} of {len(rows)} examples "
              f"({dropped} dropped: no assistant token left)")
    if merged and is_main_process():
        print(f"note: in {merged} of {len(rows)} examples the chat template's text merges into one token across the "
              "start of the assistant turn; prompt and answer were tokenised apart, as at inference, so none is learnt")
    return out, {"examples": len(rows), "truncated": truncated, "dropped_no_assistant_tokens": dropped,
                 "max_tokens": max(lengths, default=0), "boundary_merges_avoided": merged}


def check_truncation(lengths: list[int], truncated: int, max_length: int | None, where: str) -> None:
    if lengths and truncated == len(lengths):
        raise InputError(f"{where}: max_length={max_length} truncates every example ({truncated} of {len(lengths)} "
                         f"are longer; the shortest is {min(lengths)} tokens); raise max_length")
