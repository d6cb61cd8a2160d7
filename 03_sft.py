"""Stage 3: supervised fine-tuning on safety reasoning, QLoRA (SaRO's reasoning-style warm-up;
AIDSAFE's SFT_DB, or the SFT_OG baseline).

As in Kumarage et al. 2025 (arXiv 2505.21784), section 5, and Mou et al. 2025 (SaRO), stage 1:
  1. The base model is loaded frozen in 4-bit nf4 with double quantisation (bf16 compute on a GPU)
     and a LoRA adapter is put on every linear layer (QLoRA).
  2. It is trained on the stage-2 conversations: `sft.jsonl` (prompt -> <think>policy-embedded
     reasoning</think> then the answer: SFT_DB / SaRO warm-up) or `sft_og.jsonl` (prompt -> the
     plain original response: the paper's SFT_OG baseline), chosen by `sft.dataset`.
  3. The loss covers only what the assistant writes, from the first token of its content to its
     end-of-turn token, for any chat template: the prompt and the answer are tokenised apart so
     the boundary is a token boundary (safecot/chat.py explains why). A template that drops the
     reasoning from assistant turns (DeepSeek-R1-Distill's) is replaced for training by one that
     keeps it. `loss_preview.jsonl` shows the first examples' learnt text: look there first.
  4. Before training, the planned number of optimiser steps is printed and recorded in the manifest,
     with a warning when it is below about 100 (safecot/training.py: plan_steps): a few steps at a
     LoRA learning rate leave the model almost where it started.
Hyperparameters are not published; the recipe's values are common QLoRA defaults for 7B models.

    python 03_sft.py --config configs/tiny.yaml
    python 03_sft.py --config configs/tiny.yaml run_name=tiny-og sft.source_run=tiny sft.dataset=sft_og
    python 03_sft.py --config configs/qwen2.5-7b.yaml
    accelerate launch --num_processes 2 03_sft.py --config configs/qwen2.5-7b.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 03_sft.py --config configs/tiny.yaml

Several processes train one model together, one per GPU (the first command, on a machine with two),
or on a CPU with the shipped config file (the second: its torchrun launcher, gloo); a plain
`accelerate launch --cpu --num_processes 2` starts one process only. One process writes everything.

Writes data/runs/<run_name>/03_sft/: adapter/ (LoRA adapter and tokenizer), merged/ (with `sft.export_merged`:
base + adapter as one model in that dtype), loss_preview.jsonl
(for the first 8 examples, the decoded text of exactly the tokens that carry loss), metrics.jsonl
(one line per logging step: loss, learning rate, tokens/s, peak memory), checkpoints/ (rerunning the same
command resumes from the last one; `sft.max_steps`/`sft.epochs` may be raised to train on) and
manifest.json (the base model and adapter path that stage 4 and stage 5 load, planned and taken steps,
world_size: the processes that trained).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from safecot.backends import LLMConfig
from safecot.records import InputError, numbered_rows, require_complete, stage_dir, write_jsonl
from safecot.stage import done_before, run_cli
from safecot import training

DATASETS = {"sft": "sft.jsonl", "sft_og": "sft_og.jsonl"}
PREVIEW = 8                             # examples shown in loss_preview.jsonl


@dataclass
class Config(training.TrainerSettings):  # + load_in_4bit, dtype, lora, max_length, epochs, batch_size, grad_accum,
                                         # learning_rate, lr_scheduler, warmup, ... (safecot/training.py)
    run_name: str = "tiny"              # reads <runs_dir>/<run_name>/02_refine/, writes .../03_sft/
    source_run: str | None = None       # read 02_refine/ of this run instead (SFT_OG beside SFT_DB)
    seed: int = 0
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # the base model to train is llm.model ...
    model: str | None = None            # ... unless this names another (Hub id, folder, or `tiny`)
    dataset: str = "sft"                # sft (SFT_DB: reasoning + answer) | sft_og (SFT_OG baseline)
    limit: int | None = None            # train on the first N examples only
    chat_template: str | None = None    # a jinja file replacing the model's template for training (default: its own,
                                        # or trl's training variant if its own drops the reasoning)


def base_model(cfg: Config) -> str:
    return cfg.model or cfg.llm.model


def refine_dir(cfg: Config) -> Path:
    """Stage 2 of this run, or of `source_run`: the SFT_OG baseline is trained in a run of its
    own on the same stage-2 data as SFT_DB, so the paper's comparison needs one stage 1-2 only."""
    return Path(cfg.runs_dir) / (cfg.source_run or cfg.run_name) / "02_refine"


def load_examples(cfg: Config) -> tuple[Path, list[dict]]:
    """The stage-2 conversations, each checked to have a user turn and an assistant turn."""
    prev = refine_dir(cfg)
    require_complete(prev, "stage 2 (02_refine)")
    if cfg.dataset not in DATASETS:
        raise InputError(f"sft.dataset must be one of {', '.join(DATASETS)}, got '{cfg.dataset}'")
    path = prev / DATASETS[cfg.dataset]
    rows = []
    for n, row in numbered_rows(path, required=("id", "messages")):
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
                or not any(m["role"] == "assistant" and m["content"] for m in msgs)):
            raise InputError(f"{path}:{n}: 'messages' must be a list of {{role, content}} with an assistant turn")
        rows.append(row)
    rows = rows[:cfg.limit] if cfg.limit else rows
    if not rows:
        raise InputError(f"{path}: no examples to train on (the file is empty)")
    return path, rows


def tokenize(cfg: Config, rows: list[dict]):
    """The tokenizer, its chat format, and the conversations as input_ids plus assistant masks
    (with counts of truncated examples); a max_length that cuts every example stops here, before
    any output."""
    from safecot.chat import training_format
    from safecot.models import load_tokenizer

    tokenizer = load_tokenizer(base_model(cfg), padding_side="right")
    fmt = training_format(tokenizer, base_model(cfg), cfg.chat_template)
    tokenised, counts = training.tokenize_sft(fmt, rows, cfg.max_length, where=f"{refine_dir(cfg)}/{DATASETS[cfg.dataset]}")
    return tokenizer, fmt, tokenised, counts


def loss_preview(tokenizer, rows: list[dict], tokenised: list[dict]) -> tuple[list[dict], int]:
    """For the first examples, the decoded text of exactly the tokens that carry loss, and how many
    of them do not start at the assistant's content (a mask that is off by a token shows here)."""
    content = {r["id"]: next(m["content"] for m in r["messages"] if m["role"] == "assistant") for r in rows}
    preview, off = [], 0
    for r in tokenised[:PREVIEW]:
        learnt = tokenizer.decode([t for t, m in zip(r["input_ids"], r["assistant_masks"]) if m])
        if not learnt.lstrip().startswith(content[r["id"]].strip()[:16]):
            off += 1
            print(f"warning: example {r['id']}: the learnt text does not start at the assistant's content: {learnt[:60]!r}")
        preview.append({"id": r["id"], "text_with_loss": learnt})
    return preview, off


def build_trainer(cfg: Config, out: Path, tokenizer, dataset):
    """trl's SFTTrainer on the tokenised conversations, a fresh LoRA adapter on the 4-bit base."""
    from trl import SFTConfig, SFTTrainer

    model = training.add_lora(training.load_base(base_model(cfg), cfg.load_in_4bit, cfg.dtype,
                                                 cfg.gradient_checkpointing and training.on_gpu()), cfg.lora)
    args = SFTConfig(**training.trainer_args(cfg, out), max_length=cfg.max_length, packing=False,
                     assistant_only_loss=False, completion_only_loss=False)  # the mask is in the data already
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[training.metrics_logger(out / "metrics.jsonl")])
    return trainer


def main(cfg: Config, overwrite: bool = False) -> Path:
    from datasets import Dataset
    training.check_settings(cfg, "sft")
    path, rows = load_examples(cfg)
    config = {**asdict(cfg), "llm": {"model": cfg.llm.model}}  # the agents' sampling settings don't matter here
    if not overwrite and done_before(cfg, "03_sft", {cfg.dataset: (path, len(rows))}, config, training.RESUME_IGNORES):
        return stage_dir(cfg, "03_sft")  # trained before to the same steps on the same data
    tokenizer, fmt, tokenised, counts = tokenize(cfg, rows)
    counts["planned_steps"] = training.plan_steps("03_sft", len(tokenised), "examples", cfg.batch_size, cfg.grad_accum,
                                                  cfg.epochs, cfg.max_steps)
    with training.open_stage(cfg, "03_sft", overwrite, config) as st:
        out, manifest = st.out, st.manifest
        st.input(cfg.dataset, path, len(rows))
        if st.unchanged():  # trained before to the same steps on the same data: nothing to redo or rewrite
            return out
        preview, counts["preview_off_content"] = loss_preview(tokenizer, rows, tokenised)
        if manifest:
            manifest.data["counts"]["planned_steps"] = counts["planned_steps"]  # visible while it trains
            manifest.data["chat_format"] = {**fmt.describe(), "training_template": "recipe" if cfg.chat_template else
                                            "own" if fmt.template is None else "trl training variant"}
            write_jsonl(out / "loss_preview.jsonl", preview)
            manifest.output("loss_preview", out / "loss_preview.jsonl")
            manifest.save()
        dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "assistant_masks")} for r in tokenised])

        trainer = build_trainer(cfg, out, tokenizer, dataset)
        result, resume = training.train_resuming(trainer, out / "checkpoints")

        if manifest:
            adapter = training.save_adapter(trainer.model, trainer.processing_class, out / "adapter")
            manifest.data["model"] = {"base": base_model(cfg), "adapter": str(adapter), "chat_template": cfg.chat_template,
                                      "load_in_4bit": cfg.load_in_4bit, "dtype": cfg.dtype}
            if cfg.export_merged:
                manifest.data["model"]["merged"] = training.export_merged(base_model(cfg), adapter, out / "merged",
                                                                          cfg.export_merged, cfg.load_in_4bit)
            manifest.data["resumed_from"] = resume
            manifest.output("metrics", out / "metrics.jsonl")
        st.finish(**counts, steps=trainer.state.global_step, train_loss=training.run_loss(result, resume, out / "metrics.jsonl"),
                  peak_mem_gib=round(training.peak_memory_gib(), 3), tokens_seen=trainer.state.num_input_tokens_seen)
    return out


if __name__ == "__main__":
    run_cli("sft", Config, main, __doc__)
