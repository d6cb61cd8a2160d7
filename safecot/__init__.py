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
- judges:    stage 5's judges (safety, refusal, StrongREJECT, CoT) and the offline refusal detector
- metrics:   rates and means with bootstrap confidence intervals, overall and per category
- reports:   the comparison table (Markdown, CSV) and its figure
"""

# Installs models.py's filter for bitsandbytes' CPU-kernel notice before anything can import
# bitsandbytes (stage 5 seeds through transformers, which imports peft, which imports bitsandbytes).
from . import models as _models  # noqa: E402,F401
