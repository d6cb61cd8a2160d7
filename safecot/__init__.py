"""Shared machinery of the stage scripts (01_generate.py ... 05_eval.py), one concern per module:

- config:    YAML recipes parsed into each stage's dataclass, command-line overrides
- records:   JSONL records, resumable writers, manifests
- backends:  LLM backends (hf, openai, vllm) behind one `Agent` interface
- models:    loading Hugging Face models (4-bit, adapters, the tiny model by name)
- chat:      chat formats: each template probed once, conversations adapted, token-exact loss masks
- tiny:      the offline tiny random model and its locally trained tokenizer
- templates: policy sets and agent/judge prompt templates (files under data/)
- parsing:   lenient parsing of agent outputs
- prompt_sets: prompt sets from JSONL/CSV files or Hub datasets
- suites:    stage 5's evaluation suites (offline sets, Hub benchmarks, user files)
- evaluation: stage 5's answers and verdicts on the scheduler, each answer judged as soon as it exists, and their caches
- judges:    stage 5's judges (safety, refusal, StrongREJECT, CoT) and the offline refusal detector
- guards:    the field's safety classifiers (Llama Guard 3, WildGuard, HarmBench, StrongREJECT, ShieldGemma) as judges
- metrics:   rates and means with bootstrap confidence intervals, overall and per category
- reports:   the comparison table (Markdown, CSV) and its figures, the notebooks' RUN_DIR
- stage:     what every stage main shares: command line, locked folder, manifest, reruns, summary
- scheduler: many records' methods at once, no barrier between steps
- grading:   AIDSAFE's six CoT grades, and the baseline-vs-AIDSAFE comparison
- stance:    whether two near-identical thoughts agree (stage 2's near-duplicate pass)
- rewards:   GRPO's reward functions (stage 4, CADA)
- experiments: a paper's arms run by the stage scripts, one command (`make reproduce`)
- papers:    a paper's main table from stage 5's results, its reported figures beside ours
- hub:       the optional push of an adapter or stage 2's AIDSAFE-format data to the Hub, with a card from the manifest
"""

# Installs models.py's filter for bitsandbytes' CPU-kernel notice before anything can import
# bitsandbytes (stage 5 seeds through transformers, which imports peft, which imports bitsandbytes).
from . import models as _models  # noqa: E402,F401
