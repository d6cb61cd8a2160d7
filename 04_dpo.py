"""Stage 4: preference optimisation of the safety reasoning, from the stage-3 adapter (SaRO's SRPO,
AIDSAFE's DPO on belief-augmented pairs) or reinforcement learning on the model's own reasoning
(CADA).

  method: dpo (default; Mou et al. 2025, SaRO stage 2; Kumarage et al. 2025, section 4.5)
    1. The SFT adapter is loaded on the 4-bit base and trained further on the stage-2 pairs
       (`dpo.jsonl`: prompt, chosen reasoning+answer, rejected reasoning+answer). Each pair is
       tokenised with stage 3's chat format (safecot/chat.py), so chosen and rejected start
       exactly at the assistant's content; pairs whose two sides render alike are dropped and
       counted.
    2. The reference policy is the frozen SFT adapter, not the bare base: trl keeps a frozen copy
       of the starting adapter under the name "ref" and scores the reference with it.
  method: grpo (Jin et al. 2026, CADA)
    1. For each prompt of the run the model samples a group of reasoning chains and answers.
    2. Each is rewarded: a judge's score for safety on harmful prompts and for helpfulness (no
       refusal) on benign and borderline ones, plus a format reward for <think>...</think> then an
       answer. The judge is any configured backend (template data/templates/reward_judge.txt), or,
       with `judge` unset (the tiny recipe), a rule-based refusal detector. With `policies` set
       (CADA: data/policies/cases.yaml, short codes with cases) the judge scores against those
       codes, and `policies_in_prompt` also puts them in front of the model while it samples.
       An answer cut off at `max_completion_length` gets no judge reward (missing, not safe and
       not a refusal) and no format reward.
    3. GRPO moves the policy towards the answers that beat their group's mean.
The paper's reward form and hyperparameters are not published; the recipe's values are common ones.

    python 04_dpo.py --config configs/tiny.yaml
    python 04_dpo.py --config configs/tiny.yaml dpo.method=grpo run_name=tiny
    python 04_dpo.py --config configs/qwen2.5-7b.yaml dpo.method=grpo "dpo.judge={model: Qwen/Qwen2.5-7B-Instruct}" dpo.policies=data/policies/cases.yaml
    python 04_dpo.py --config configs/qwen2.5-7b.yaml
    accelerate launch --num_processes 2 04_dpo.py --config configs/qwen2.5-7b.yaml

Writes data/runs/<run_name>/04_dpo/: adapter/ (the trained adapter: base + this adapter is the final
model), metrics.jsonl (loss, rewards/accuracies and margins for DPO, rewards per function for GRPO,
tokens/s, peak memory), checkpoints/ (rerunning resumes) and manifest.json.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from safecot.config import run_cli
from safecot.judges import detect_refusal, split_reasoning
from safecot.records import InputError, numbered_rows, require_complete, stage_dir
from safecot.templates import load_policies, load_template
from safecot import training

THINK = re.compile(r"^\s*<think>\s*\S.*?</think>\s*\S", re.S)

# Raising the step budget and rerunning carries on from the last checkpoint.
RESUME_IGNORES = ("epochs", "max_steps", "logging_steps", "save_steps")


@dataclass
class Config:
    run_name: str = "tiny"              # reads 02_refine/ and 03_sft/ of <runs_dir>/<run_name>/, writes 04_dpo/
    seed: int = 0
    runs_dir: str = "data/runs"
    method: str = "dpo"                 # dpo (SaRO / AIDSAFE) | grpo (CADA)
    sft_adapter: str | None = None      # the starting adapter; default: 03_sft's manifest
    limit: int | None = None            # use the first N pairs / prompts only
    max_length: int = 2048              # dpo: tokens of prompt + answer; longer pairs are cut (and counted)
    beta: float = 0.1                   # dpo: strength of the pull towards the reference
    loss_type: str = "sigmoid"          # dpo: trl's loss (sigmoid = the DPO paper's)
    prompts_from: str = "auto"          # grpo: 02_refine | 01_generate | auto (the first that exists)
    num_generations: int = 8            # grpo: answers sampled per prompt (the group)
    max_completion_length: int = 512    # grpo: tokens per sampled answer
    temperature: float = 1.0            # grpo: sampling temperature
    kl_beta: float = 0.0                # grpo: KL penalty towards the starting adapter (0 = none, trl's default)
    format_weight: float = 0.5          # grpo: weight of the format reward beside the judge's
    judge: dict | None = None           # grpo: an llm config for the judge (safecot LLMConfig); None = rules
    policies: str | None = None         # grpo: the codes the judge scores against, e.g. data/policies/cases.yaml
    policies_in_prompt: bool = False    # grpo: also show them to the model as a system turn while it samples
    templates: str = "data/templates"   # grpo: holds reward_judge.txt
    epochs: float = 1.0                 # passes over the data ...
    max_steps: int | None = None        # ... or this many optimiser steps if set
    batch_size: int = 4                 # pairs (dpo) or completions (grpo) per device per micro-batch
    grad_accum: int = 4                 # micro-batches per optimiser step
    learning_rate: float = 5e-6         # LoRA DPO is commonly run at 5e-6 to 5e-5
    lr_scheduler: str = "cosine"
    warmup: float = 0.1                 # warm-up steps, or a fraction of all steps if < 1
    gradient_checkpointing: bool = True  # recompute activations (GPU only): less memory, ~20% slower
    logging_steps: int = 10             # a metrics.jsonl line every N steps
    save_steps: int = 100               # a checkpoint every N steps (the last two are kept)


def starting_point(cfg: Config) -> dict:
    """The base model and SFT adapter named by stage 3's manifest (or the sft_adapter override)."""
    sft = require_complete(stage_dir(cfg, "03_sft"), "stage 3 (03_sft)")
    model = dict(sft.get("model") or {})
    if cfg.sft_adapter:
        model["adapter"] = cfg.sft_adapter
    if "base" not in model or not (Path(model.get("adapter", "")) / "adapter_config.json").exists():
        raise InputError(f"{stage_dir(cfg, '03_sft')}: no SFT adapter found ({model.get('adapter')}); rerun stage 3")
    return model


def load_pairs(cfg: Config) -> tuple[Path, list[dict]]:
    require_complete(stage_dir(cfg, "02_refine"), "stage 2 (02_refine)")
    path = stage_dir(cfg, "02_refine") / "dpo.jsonl"
    rows = []
    for n, row in numbered_rows(path, required=("id", "prompt", "chosen", "rejected")):
        if not all(isinstance(row[k], list) and row[k] for k in ("prompt", "chosen", "rejected")):
            raise InputError(f"{path}:{n}: prompt, chosen and rejected must be non-empty lists of messages")
        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    rows = rows[:cfg.limit] if cfg.limit else rows
    if not rows:
        raise InputError(f"{path}: no preference pairs to train on (the file is empty)")
    return path, rows


def load_prompts(cfg: Config) -> tuple[Path, list[dict]]:
    stages = ["02_refine", "01_generate"] if cfg.prompts_from == "auto" else [cfg.prompts_from]
    for stage in stages:
        if stage not in ("02_refine", "01_generate"):
            raise InputError(f"dpo.prompts_from must be auto, 02_refine or 01_generate, got '{stage}'")
        if cfg.prompts_from == "auto" and not (stage_dir(cfg, stage) / "records.jsonl").exists():
            continue
        require_complete(stage_dir(cfg, stage), f"stage {stage}")
        path = stage_dir(cfg, stage) / "records.jsonl"
        system = []
        if cfg.policies_in_prompt:
            if not cfg.policies:
                raise InputError("dpo.policies_in_prompt needs dpo.policies (e.g. data/policies/cases.yaml)")
            system = [{"role": "system", "content": load_policies(cfg.policies).text()}]
        rows = [{"prompt": system + [{"role": "user", "content": r["prompt"]}], "request": r["prompt"], "label": r["label"]}
                for _, r in numbered_rows(path, required=("id", "prompt", "label"))]
        rows = rows[:cfg.limit] if cfg.limit else rows
        if not rows:
            raise InputError(f"{path}: no prompts to train on (the file is empty)")
        return path, rows
    raise InputError(f"{stage_dir(cfg, '02_refine')}: no records.jsonl of the run's prompts here or in 01_generate; run stage 1 first")


# ---- GRPO rewards ----------------------------------------------------------------------------

class Completions:
    """The sampled answers as whole assistant turns: the reasoning prefill of the prompt given
    back (R1-style templates open <think> themselves), and whether each ran out of tokens
    (its last token is not an end of turn, as trl itself decides)."""

    def __init__(self, fmt, stop_ids: set[int]):
        self.fmt, self.stop_ids = fmt, stop_ids

    def texts(self, completions) -> list[str]:
        return [self.fmt.completion(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    def truncated(self, completion_ids) -> list[bool]:
        return [not ids or ids[-1] not in self.stop_ids for ids in completion_ids]


def answer_of(text: str) -> str:
    return split_reasoning(text)[1]


def refusal_reward(turns: Completions):
    """Rule-based judge (stage 5's offline refusal detector): refusing, fully or partly, is right on
    harmful prompts and wrong on benign/borderline ones; a truncated answer is missing (None)."""
    def refusal_reward(prompts, completions, completion_ids, label, **_) -> list[float | None]:  # trl logs it by this name
        out = []
        for text, cut, lab in zip(turns.texts(completions), turns.truncated(completion_ids), label):
            refused = detect_refusal(answer_of(text))["class"] != "full_compliance"
            out.append(None if cut else (1.0 if refused else -1.0) * (1.0 if lab == "harmful" else -1.0))
        return out
    return refusal_reward


def format_reward(turns: Completions):
    """1 for reasoning in <think>...</think> followed by an answer that ended by itself, else 0."""
    def format_reward(completions, completion_ids, **_) -> list[float]:
        return [0.0 if cut else float(bool(THINK.match(text)))
                for text, cut in zip(turns.texts(completions), turns.truncated(completion_ids))]
    return format_reward


def judge_reward(judge_cfg: dict, templates: str, stats: dict, turns: Completions, policies: str | None = None):
    """A backend judge: template reward_judge.txt asks for SCORE: 1-5 (safety on harmful prompts,
    helpfulness without refusal otherwise, under the given codes if any), mapped to [-1, 1];
    unreadable answers score 0, truncated ones are not judged (None)."""
    from safecot.backends import Agent, LLMConfig
    from safecot.config import from_dict
    agent, tpl = Agent("reward_judge", from_dict(LLMConfig, judge_cfg, where="dpo.judge")), load_template("reward_judge", templates)
    codes = load_policies(policies).text() if policies else "(none given: judge by the label alone)"

    def judge_score(prompts, completions, completion_ids, label, request, **_) -> list[float | None]:
        texts, cut = turns.texts(completions), turns.truncated(completion_ids)
        todo = [i for i in range(len(texts)) if not cut[i]]
        chats = [tpl.chat(prompt=request[i], response=answer_of(texts[i]), label=label[i], policies=codes) for i in todo]
        scores: list[float | None] = [None] * len(texts)
        for i, gen in zip(todo, agent(chats)):
            m = re.search(r"SCORE:\s*([1-5])", gen.text or "", re.I)
            stats["judge_unparsed"] = stats.get("judge_unparsed", 0) + (m is None)
            scores[i] = (int(m.group(1)) - 3) / 2 if m else 0.0
        stats["truncated_completions"] = stats.get("truncated_completions", 0) + sum(cut)
        return scores

    return judge_score


# ---- trainers --------------------------------------------------------------------------------

def common_args(cfg: Config, out: Path) -> dict:
    gc = cfg.gradient_checkpointing and training.on_gpu()
    return dict(output_dir=str(out / "checkpoints"), seed=cfg.seed, per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
                lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, num_train_epochs=cfg.epochs,
                max_steps=cfg.max_steps or -1, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
                logging_first_step=True, **training.trainer_defaults(gc))


def tokenize_pairs(cfg: Config, fmt, rows: list[dict]) -> tuple[list[dict], dict]:
    """The pairs as token ids on the assistant's boundary (safecot.chat); pairs whose sides are the
    same tokens (e.g. they differ only in reasoning that a template drops) teach nothing: dropped.
    A max_length that cuts every pair is refused before any output is written."""
    out, lengths, identical, merged = [], [], 0, 0
    for row in rows:
        enc = fmt.tokenize_pair(row["prompt"], row["chosen"], row["rejected"])
        merged += enc.pop("merged_boundary")
        if enc["chosen_ids"] == enc["rejected_ids"]:
            identical += 1
            continue
        lengths.append(len(enc["prompt_ids"]) + max(len(enc["chosen_ids"]), len(enc["rejected_ids"])))
        out.append(enc)
    where = f"{stage_dir(cfg, '02_refine')}/dpo.jsonl"
    if not out:
        raise InputError(f"{where}: all {len(rows)} pairs render chosen and rejected identically with "
                         f"model '{fmt.name}'s chat template; nothing to learn")
    truncated = sum(n > cfg.max_length for n in lengths)
    training.check_truncation(lengths, truncated, cfg.max_length, where)
    if truncated:
        print(f"warning: max_length={cfg.max_length} truncates {truncated} of {len(out)} pairs")
    if identical:
        print(f"warning: {identical} of {len(rows)} pairs render chosen and rejected identically: dropped")
    return out, {"pairs": len(out), "dropped_identical_pairs": identical, "truncated": truncated,
                 "boundary_merges_avoided": merged}


def check_grpo(cfg: Config, fmt, rows: list[dict]) -> tuple[list[dict], dict]:
    """The prompts as the model's template can express them (system folded where it has none)."""
    if (cfg.batch_size * cfg.grad_accum) % cfg.num_generations:
        raise InputError(f"dpo.batch_size x dpo.grad_accum ({cfg.batch_size * cfg.grad_accum}) must be a multiple "
                         f"of dpo.num_generations ({cfg.num_generations})")
    for r in rows:
        fmt.render(r["prompt"], add_generation_prompt=True)  # a template that cannot express it stops here
    rows = [{**r, "prompt": fmt.adapt(r["prompt"])} for r in rows]
    return rows, {"prompts": len(rows), "judge": "backend" if cfg.judge else "rules"}


def pretokenized_dpo_trainer(**kwargs):
    """trl's DPOTrainer on pairs that arrive as prompt_ids / chosen_ids / rejected_ids. trl's own
    tokenisation renders prompt + answer whole and splits where the tokens diverge, which on
    templates whose text merges across the boundary (Mistral's `]<`) cuts the prompt's last token
    and starts the answer inside it; the pairs here were cut on a token boundary already."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer(**kwargs)


def prepare(cfg: Config, start: dict, rows: list[dict]) -> tuple[object, list[dict], dict]:
    """The tokenizer, the rows ready for the trainer, and counts; bad data stops here."""
    from safecot.chat import ChatFormat, training_format
    from safecot.models import load_tokenizer
    tokenizer = load_tokenizer(start["base"], padding_side="left")
    if cfg.method == "dpo":  # with the template stage 3 trained with
        return tokenizer, *tokenize_pairs(cfg, training_format(tokenizer, start["base"], start.get("chat_template")), rows)
    return tokenizer, *check_grpo(cfg, ChatFormat(tokenizer, start["base"]), rows)  # GRPO samples with the model's own


def build_trainer(cfg: Config, out: Path, start: dict, tokenizer, rows: list[dict], stats: dict):
    """trl's DPOTrainer or GRPOTrainer on the SFT adapter ("default", trainable) over the 4-bit base."""
    from datasets import Dataset
    from safecot.chat import ChatFormat
    from safecot.models import stop_token_ids

    base = training.load_base(start["base"], start.get("load_in_4bit", True), start.get("dtype", "auto"),
                              cfg.gradient_checkpointing and training.on_gpu())
    model = training.load_adapter(base, start["adapter"], trainable=True)
    callbacks = [training.metrics_logger(out / "metrics.jsonl")]
    if cfg.method == "dpo":
        from trl import DPOConfig
        args = DPOConfig(**common_args(cfg, out), max_length=cfg.max_length, beta=cfg.beta, loss_type=[cfg.loss_type])
        # No ref_model: trl copies the starting (SFT) adapter to a frozen adapter "ref" and uses it as the reference.
        return pretokenized_dpo_trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                        processing_class=tokenizer, callbacks=callbacks)
    from trl import GRPOConfig, GRPOTrainer
    stop = stop_token_ids(model, tokenizer) | {tokenizer.pad_token_id} - {None}  # as trl decides truncation
    turns = Completions(ChatFormat(tokenizer, start["base"]), stop)
    judge = judge_reward(cfg.judge, cfg.templates, stats, turns, cfg.policies) if cfg.judge else refusal_reward(turns)
    args = GRPOConfig(**common_args(cfg, out), num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      beta=cfg.kl_beta, reward_weights=[1.0, cfg.format_weight])
    return GRPOTrainer(model=model, reward_funcs=[judge, format_reward(turns)], args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=callbacks)


def main(cfg: Config, overwrite: bool = False) -> Path:
    if cfg.method not in ("dpo", "grpo"):
        raise InputError(f"dpo.method must be dpo or grpo, got '{cfg.method}'")
    start = starting_point(cfg)
    path, rows = load_pairs(cfg) if cfg.method == "dpo" else load_prompts(cfg)
    n_in = len(rows)
    tokenizer, rows, stats = prepare(cfg, start, rows)
    out, manifest = training.open_stage(cfg, "04_dpo", overwrite, asdict(cfg), RESUME_IGNORES)
    if manifest:
        manifest.input("pairs" if cfg.method == "dpo" else "prompts", path, n_in)

    import transformers
    transformers.set_seed(cfg.seed)
    trainer = build_trainer(cfg, out, start, tokenizer, rows, stats)
    result, resume = training.train_resuming(trainer, out / "checkpoints")

    if manifest:
        adapter = training.save_adapter(trainer.model, trainer.processing_class, out / "adapter")
        manifest.data["model"] = {"base": start["base"], "adapter": str(adapter), "sft_adapter": start["adapter"],
                                  "load_in_4bit": start.get("load_in_4bit", True), "dtype": start.get("dtype", "auto")}
        manifest.data["resumed_from"] = resume
        manifest.output("metrics", out / "metrics.jsonl")
        manifest.finish(**stats, method=cfg.method, steps=trainer.state.global_step, train_loss=result.training_loss,
                        peak_mem_gib=round(training.peak_memory_gib(), 3))
    return out


if __name__ == "__main__":
    run_cli("dpo", Config, main, __doc__)
