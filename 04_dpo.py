"""Stage 4: preference optimisation of the safety reasoning, from the stage-3 adapter (SaRO's SRPO,
AIDSAFE's DPO on belief-augmented pairs) or reinforcement learning on the model's own reasoning
(CADA).

  method: dpo (default; Mou et al. 2025, SaRO stage 2; Kumarage et al. 2025, section 4.5)
    1. The SFT adapter is loaded on the 4-bit base and trained further on the stage-2 pairs that
       `dataset` names: `dpo.jsonl` (prompt, chosen reasoning+answer, rejected reasoning+answer:
       SRPO, AIDSAFE) or `dpo_og.jsonl` (a safe direct answer chosen over an unsafe one: SaRO's
       "traditional alignment" DPO baseline, usually from an SFT_OG adapter). Each pair is
       tokenised with stage 3's chat format (safecot/chat.py), so chosen and rejected start
       exactly at the assistant's content; pairs whose two sides render alike are dropped and
       counted.
    2. The reference policy is the frozen SFT adapter, not the bare base: trl keeps a frozen copy
       of the starting adapter under the name "ref" and scores the reference with it.
  method: grpo (Jin et al. 2026, CADA)
    1. For each prompt of the run the model samples a group of reasoning chains and answers. With
       `policies_in_prompt` (CADA) it is shown the case-augmented codes of `policies` and asked to
       reason over them in <think>...</think> first (template reason_over_policies.txt).
    2. Each is rewarded by a judge plus a format reward for <think>...</think> then an answer. The
       judge is any configured backend (template reward_judge.txt): it reads the request and the
       codes, decides itself whether the request is harmful under them (the dataset's label is not
       shown to it), and scores the answer's safety if so, its helpfulness (no refusal) if not.
       With `judge` unset (the tiny recipe), a rule-based refusal detector scores against the
       dataset's labels instead, and gives an `unknown` label no reward rather than the benign one.
       An answer cut off at `max_completion_length` is neither safe nor a refusal: by
       `truncated_completions` it gets the bottom of both reward scales (`lowest`), or is left out
       of the loss and of its group's baseline (`mask`, DAPO's overlong filtering). A completion
       the judge gives no verdict (a failed request, an unreadable reply) is left out of its group
       the same way, and counted (judge_errors, judge_unreadable).
    3. GRPO moves the policy towards the answers that beat their group's mean.
  from_sft: false (CADA trains the instruct model directly): either method starts from the model
    itself (`model`, else `llm.model`) with a fresh LoRA adapter; stage 3 is not needed, and the
    reference is the bare model.
  An arm of an experiment may live in a run of its own: `source_run` names the run whose stage 1-2
  data it reads, `sft_run` the run whose stage-3 adapter it starts from (both default to run_name).
Before training it prints the planned optimiser steps (recorded in the manifest) and warns when
they are fewer than about 100. The paper's reward form and hyperparameters are not published; the
recipe's values are common ones.

    python 04_dpo.py --config configs/tiny.yaml
    python 04_dpo.py --config configs/tiny.yaml dpo.method=grpo run_name=tiny
    python 04_dpo.py --config configs/tiny.yaml dpo.method=grpo dpo.from_sft=false run_name=tiny
    python 04_dpo.py --config configs/tiny.yaml run_name=tiny-og dpo.source_run=tiny dpo.dataset=dpo_og
    python 04_dpo.py --config configs/cada-qwen2.5-7b.yaml
    python 04_dpo.py --config configs/qwen2.5-7b.yaml dpo.method=grpo "dpo.judge={model: Qwen/Qwen2.5-7B-Instruct}" dpo.policies=data/policies/cases.yaml
    python 04_dpo.py --config configs/qwen2.5-7b.yaml
    accelerate launch --num_processes 2 04_dpo.py --config configs/qwen2.5-7b.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 04_dpo.py --config configs/tiny.yaml

Writes data/runs/<run_name>/04_dpo/: adapter/ (the trained adapter: base + this adapter is the final
model), merged/ (with `dpo.export_merged`: that final model as one, in that dtype), metrics.jsonl
(loss, rewards/accuracies and margins for DPO, rewards per function for GRPO, tokens/s, peak
memory), checkpoints/ (rerunning resumes) and manifest.json (base_model, the planned and taken
steps, the judge's counts, world_size: the processes that trained).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safecot.backends import LLMConfig
from safecot.records import InputError, numbered_rows, require_complete, stage_dir
from safecot.rewards import (LABELLED, TRUNCATED, Completions, format_reward, judge_reward, quiet_unscored,
                             refusal_reward)
from safecot.stage import done_before, run_cli, trained_model
from safecot.templates import load_policies, load_template, policy_chat
from safecot import training

DATASETS = {"dpo": "dpo.jsonl", "dpo_og": "dpo_og.jsonl"}


@dataclass
class Config(training.TrainerSettings):  # + load_in_4bit, dtype (from_sft=false; else as stage 3 loaded it), lora
                                         # (from_sft=false: the new adapter), max_length (dpo: prompt + answer),
                                         # batch_size (pairs or completions), grad_accum, ... (safecot/training.py)
    run_name: str = "tiny"              # reads 02_refine/ and 03_sft/ of <runs_dir>/<run_name>/, writes 04_dpo/
    source_run: str | None = None       # read 02_refine/ (and 01_generate/) of this run instead: an arm in a run of its own
    sft_run: str | None = None          # start from 03_sft/ of this run instead (e.g. the SFT_OG run for SaRO's DPO baseline)
    seed: int = 0
    runs_dir: str = "data/runs"
    method: str = "dpo"                 # dpo (SaRO / AIDSAFE) | grpo (CADA)
    from_sft: bool = True               # start from stage 3's adapter; false: from the instruct model itself with a
                                        # fresh LoRA (CADA), the bare model then being the reference; no stage 3 needed
    sft_adapter: str | None = None      # the starting adapter; default: 03_sft's manifest
    llm: LLMConfig = field(default_factory=LLMConfig)  # from_sft=false: the model is llm.model ...
    model: str | None = None            # ... unless this names another (Hub id, folder, or `tiny`)
    limit: int | None = None            # use the first N pairs / prompts only
    dataset: str = "dpo"                # dpo: the stage-2 pairs: dpo (with reasoning) | dpo_og (direct answers, SaRO's baseline)
    beta: float = 0.1                   # dpo: strength of the pull towards the reference
    loss_type: str = "sigmoid"          # dpo: trl's loss (sigmoid = the DPO paper's)
    prompts_from: str = "auto"          # grpo: 02_refine | 01_generate | auto (the first that exists)
    num_generations: int = 8            # grpo: answers sampled per prompt (the group)
    max_completion_length: int = 512    # grpo: tokens per sampled answer
    temperature: float = 1.0            # grpo: sampling temperature
    kl_beta: float = 0.0                # grpo: KL penalty towards the starting model (0 = none, trl's default)
    format_weight: float = 0.5          # grpo: weight of the format reward beside the judge's
    truncated_completions: str = "lowest"  # grpo: an answer cut off at max_completion_length (safecot/rewards.py): lowest (the bottom of
                                        # every reward's scale) | mask (out of the loss and of its group's baseline)
    judge: dict | None = None           # grpo: an llm config for the judge (safecot LLMConfig); None = rules on the labels
    policies: str | None = None         # grpo: the codes the judge decides harm under, e.g. data/policies/cases.yaml
    policies_in_prompt: bool = False    # grpo: show them to the model too, to reason over in <think> first (CADA)
    templates: str = "data/templates"   # grpo: holds reward_judge.txt and reason_over_policies.txt
    # stage 4's own defaults for three of the shared trainer settings:
    epochs: float = 1.0                 # passes over the data
    learning_rate: float = 5e-6         # LoRA DPO is commonly run at 5e-6 to 5e-5
    warmup: float = 0.1                 # warm-up steps, or a fraction of all steps if < 1


def source_dir(cfg: Config, stage: str) -> Path:
    """Stage 1 or 2 of this run, or of `source_run`: the experiment's arms share one run's data."""
    return Path(cfg.runs_dir) / (cfg.source_run or cfg.run_name) / stage


def starting_point(cfg: Config) -> dict:
    """The base model and SFT adapter named by stage 3's manifest (of this run or `sft_run`; or the
    sft_adapter override) and how stage 3 loaded them; with from_sft=false the instruct model alone
    (adapter None: build_trainer gives it a fresh one)."""
    if not cfg.from_sft:
        for key in ("sft_adapter", "sft_run"):
            if getattr(cfg, key):
                raise InputError(f"dpo.{key} is set but dpo.from_sft=false starts from the model itself; drop one")
        return {"base": cfg.model or cfg.llm.model, "adapter": None, "load_in_4bit": cfg.load_in_4bit, "dtype": cfg.dtype}
    sft = Path(cfg.runs_dir) / (cfg.sft_run or cfg.run_name) / "03_sft"
    base, adapter = trained_model(sft, cfg.sft_adapter, "stage 3 (03_sft)")
    loading = require_complete(sft, "stage 3 (03_sft)").get("model") or {}
    return {**loading, "base": base, "adapter": str(adapter)}


def load_pairs(cfg: Config) -> tuple[Path, list[dict]]:
    require_complete(source_dir(cfg, "02_refine"), "stage 2 (02_refine)")
    path = source_dir(cfg, "02_refine") / DATASETS[cfg.dataset]
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
        if cfg.prompts_from == "auto" and not (source_dir(cfg, stage) / "records.jsonl").exists():
            continue
        require_complete(source_dir(cfg, stage), f"stage {stage}")
        path = source_dir(cfg, stage) / "records.jsonl"
        if cfg.policies_in_prompt and not cfg.policies:
            raise InputError("dpo.policies_in_prompt needs dpo.policies (e.g. data/policies/cases.yaml)")
        # CADA: the model reasons over the codes and their cases before it answers
        ask = policy_chat(cfg.policies if cfg.policies_in_prompt else None, cfg.templates)
        rows = [{"prompt": ask(r["prompt"]), "request": r["prompt"], "label": r["label"]}
                for _, r in numbered_rows(path, required=("id", "prompt", "label"))]
        rows = rows[:cfg.limit] if cfg.limit else rows
        if not rows:
            raise InputError(f"{path}: no prompts to train on (the file is empty)")
        return path, rows
    raise InputError(f"{source_dir(cfg, '02_refine')}: no records.jsonl of the run's prompts here or in 01_generate; run stage 1 first")


# ---- trainers --------------------------------------------------------------------------------

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
    where = f"{source_dir(cfg, '02_refine')}/{DATASETS[cfg.dataset]}"
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
    per_step = cfg.batch_size * cfg.grad_accum * training.processes() // cfg.num_generations
    if len(rows) < per_step:  # trl's sampler would yield no batch at all
        raise InputError(f"{len(rows)} prompts are fewer than one optimiser step samples ({per_step}: dpo.batch_size x "
                         "dpo.grad_accum x processes / dpo.num_generations); use more prompts or a smaller batch")
    for r in rows:
        fmt.render(r["prompt"], add_generation_prompt=True)  # a template that cannot express it stops here
    rows = [{**r, "prompt": fmt.adapt(r["prompt"])} for r in rows]
    unlabelled = 0 if cfg.judge else sum(r["label"] not in LABELLED for r in rows)
    if unlabelled:
        print(f"warning: {unlabelled} of {len(rows)} prompts have no label the rule-based reward can use: they get only "
              "the format reward; set dpo.judge to have a judge decide their harm under dpo.policies")
    return rows, {"prompts": len(rows), "judge": "backend" if cfg.judge else "rules", "unlabelled_prompts": unlabelled}


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
    """trl's DPOTrainer or GRPOTrainer on the SFT adapter ("default", trainable) over the 4-bit base, or on
    a fresh LoRA adapter (from_sft=false), which starts as the bare model."""
    from datasets import Dataset
    from safecot.chat import ChatFormat
    from safecot.models import stop_token_ids

    base = training.load_base(start["base"], start.get("load_in_4bit", True), start.get("dtype", "auto"),
                              cfg.gradient_checkpointing and training.on_gpu())
    model = training.load_adapter(base, start["adapter"], trainable=True) if start["adapter"] else training.add_lora(base, cfg.lora)
    callbacks = [training.metrics_logger(out / "metrics.jsonl")]
    if cfg.method == "dpo":
        from trl import DPOConfig
        args = DPOConfig(**training.trainer_args(cfg, out), max_length=cfg.max_length, beta=cfg.beta, loss_type=[cfg.loss_type])
        # No ref_model: trl copies the starting adapter to a frozen adapter "ref" and uses it as the reference: the
        # SFT adapter, or a fresh one, whose LoRA B matrices are zero, so the reference is then the bare model.
        return pretokenized_dpo_trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                        processing_class=tokenizer, callbacks=callbacks)
    from trl import GRPOConfig, GRPOTrainer
    stop = stop_token_ids(model, tokenizer) | {tokenizer.pad_token_id} - {None}  # as trl decides truncation
    turns = Completions(ChatFormat(tokenizer, start["base"]), stop, cfg.truncated_completions)
    judge = judge_reward(cfg.judge, cfg.templates, stats, turns, cfg.policies) if cfg.judge else refusal_reward(turns)
    args = GRPOConfig(**training.trainer_args(cfg, out), num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      beta=cfg.kl_beta, reward_weights=[1.0, cfg.format_weight],
                      mask_truncated_completions=cfg.truncated_completions == "mask")
    logging.getLogger("trl.trainer.grpo_trainer").addFilter(quiet_unscored)
    # The judge first: trl calls the reward functions in this order, and the format reward leaves out
    # what the judge could not score (Completions.unscored).
    return GRPOTrainer(model=model, reward_funcs=[judge, format_reward(turns)], args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=callbacks)


def main(cfg: Config, overwrite: bool = False) -> Path:
    if cfg.method not in ("dpo", "grpo"):
        raise InputError(f"dpo.method must be dpo or grpo, got '{cfg.method}'")
    if cfg.dataset not in DATASETS:
        raise InputError(f"dpo.dataset must be one of {', '.join(DATASETS)}, got '{cfg.dataset}'")
    if cfg.truncated_completions not in TRUNCATED:
        raise InputError(f"dpo.truncated_completions must be one of {', '.join(TRUNCATED)}, got '{cfg.truncated_completions}'")
    if cfg.method == "grpo" and cfg.judge and not cfg.policies:
        raise InputError("dpo.judge needs dpo.policies: the judge decides harm under those codes (e.g. data/policies/cases.yaml)")
    if cfg.method == "grpo" and cfg.judge:  # the reward judge's settings, template and codes, before any model loads
        LLMConfig().merged(cfg.judge)
        load_template("reward_judge", cfg.templates)
        load_policies(cfg.policies)
    training.check_settings(cfg, "dpo")
    start = starting_point(cfg)
    path, rows = load_pairs(cfg) if cfg.method == "dpo" else load_prompts(cfg)
    # What this run trains from; a retrained SFT adapter is another starting point.
    inputs = {"pairs" if cfg.method == "dpo" else "prompts": (path, len(rows)),
              **({"start_adapter": (start["adapter"], None)} if start.get("adapter") else {})}
    config = {**asdict(cfg), "llm": {"model": cfg.llm.model}}  # the agents' sampling settings don't matter here
    if not overwrite and done_before(cfg, "04_dpo", inputs, config, training.RESUME_IGNORES):
        return stage_dir(cfg, "04_dpo")  # trained before to the same steps from the same start
    tokenizer, rows, stats = prepare(cfg, start, rows)
    stats["planned_steps"] = training.plan_steps("04_dpo", len(rows), "pairs" if cfg.method == "dpo" else "prompts",
                                                 cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps,
                                                 group=cfg.num_generations if cfg.method == "grpo" else 1)
    with training.open_stage(cfg, "04_dpo", overwrite, config) as st:
        out, manifest = st.out, st.manifest
        for name, (where, n) in inputs.items():
            st.input(name, where, n)
        if st.unchanged():  # trained before to the same steps from the same start: nothing to redo or rewrite
            return out
        if manifest:
            manifest.data["base_model"] = start["base"]  # what stage 5's from_run: <run>/04_dpo loads the adapter on
            manifest.data["counts"]["planned_steps"] = stats["planned_steps"]  # visible while it trains
            manifest.save()

        trainer = build_trainer(cfg, out, start, tokenizer, rows, stats)
        result, resume = training.train_resuming(trainer, out / "checkpoints")

        if manifest:
            adapter = training.save_adapter(trainer.model, trainer.processing_class, out / "adapter")
            manifest.data["model"] = {"base": start["base"], "adapter": str(adapter), "sft_adapter": start["adapter"],
                                      "load_in_4bit": start.get("load_in_4bit", True), "dtype": start.get("dtype", "auto")}
            if cfg.export_merged:  # the SFT adapter trained on: base + this adapter is the whole final model
                manifest.data["model"]["merged"] = training.export_merged(start["base"], adapter, out / "merged",
                                                                          cfg.export_merged, start.get("load_in_4bit", True))
            manifest.data["resumed_from"] = resume
            manifest.output("metrics", out / "metrics.jsonl")
        st.finish(**stats, method=cfg.method, steps=trainer.state.global_step,
                  train_loss=training.run_loss(result, resume, out / "metrics.jsonl"),
                  peak_mem_gib=round(training.peak_memory_gib(), 3))
    return out


if __name__ == "__main__":
    run_cli("dpo", Config, main, __doc__)
