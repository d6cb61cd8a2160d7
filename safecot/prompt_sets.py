"""Prompt sets: the project's seed set, any local JSONL/CSV, or a Hub dataset by id.

Every prompt record has `id`, `prompt`, `label` (harmful | benign | borderline) and `category`
(data/prompts/README.md). Other sources are mapped onto that schema with `columns`
({our_field: their_column}) and `defaults` ({our_field: value}), e.g. for BeaverTails:

    prompts: hf:PKU-Alignment/BeaverTails
    prompt_split: 30k_test
    prompt_columns: {prompt: prompt}
    prompt_defaults: {label: harmful, category: beavertails}

A record without an `id` gets one from a hash of its prompt, so ids are stable across reruns
and a prompt repeated in the source is taken once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .records import InputError, read_csv, read_jsonl

LABELS = ("harmful", "benign", "borderline")


def prompt_id(source: str, prompt: str) -> str:
    return f"{source}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}"


def _rows(source: str, split: str, subset: str | None) -> tuple[list[dict], str]:
    if source.startswith("hf:"):
        name = source[3:]
        try:
            from datasets import load_dataset
            ds = load_dataset(name, subset, split=split)
        except Exception as e:  # datasets raises many kinds; all mean "cannot load that"
            raise InputError(f"{source}: cannot load the Hub dataset (split '{split}'): {str(e).splitlines()[0]}") from None
        return [dict(r) for r in ds], name.split("/")[-1]
    path = Path(source)
    if path.suffix == ".csv":
        return read_csv(path), path.stem
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path), path.stem
    raise InputError(f"{source}: prompts must be a .jsonl or .csv file, or hf:<dataset id>")


def load_prompts(source: str, split: str = "train", subset: str | None = None,
                 columns: dict | None = None, defaults: dict | None = None,
                 limit: int | None = None) -> list[dict]:
    rows, stem = _rows(source, split, subset)
    columns = {"id": "id", "prompt": "prompt", "label": "label", "category": "category", **(columns or {})}
    defaults = {"label": "unknown", "category": "unknown", **(defaults or {})}
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{source}:{n}" if not source.startswith("hf:") else f"{source} row {n - 1}"
        rec = {}
        for field, column in columns.items():
            if column in row and row[column] not in (None, ""):
                rec[field] = row[column]
            elif field in defaults:
                rec[field] = defaults[field]
            elif field != "id":
                raise InputError(f"{where}: missing field '{column}'")
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise InputError(f"{where}: empty prompt")
        rec["prompt"] = rec["prompt"].strip()
        given = rec.get("id")
        rec["id"] = str(given or prompt_id(stem, rec["prompt"]))
        if rec["id"] in seen:
            if not given:
                continue  # the same prompt twice (common in Hub sets): deliberate it once
            raise InputError(f"{where}: duplicate id '{rec['id']}'")
        seen.add(rec["id"])
        rec["label"], rec["category"] = str(rec["label"]), str(rec["category"])
        out.append(rec)
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{source}: no prompts")
    return out
