"""Prompt sets: the project's seed set, any local JSONL/CSV, or a Hub dataset by id.

Every prompt record has `id`, `prompt`, `label` (harmful | benign | borderline) and `category`
(data/prompts/README.md), and may carry `original_response`, the source's own answer to the prompt
(stage 2 trains the SFT_OG baseline on it). Other sources are mapped onto that schema with
`columns` ({our_field: their_column}), `defaults` ({our_field: value}) and `values` ({our_field:
{their_value: our_value}}), e.g. for BeaverTails, whose `is_safe` says whether a row is safe:

    prompts: hf:PKU-Alignment/BeaverTails
    prompt_split: 330k_train
    prompt_columns: {label: is_safe, original_response: response}
    prompt_values: {label: {false: harmful, true: benign}}

`values` keys match their values as text, any case (`false`, "False" in a CSV, a boolean); a
value it does not list is kept as it is. A list of columns joins their non-empty values with a
blank line, e.g. Alpagasus' instruction and its optional input: `columns: {prompt: [instruction,
input]}`. A record without an `id` gets one from a hash of its prompt, so ids are stable across
reruns. A category given as flags (BeaverTails' `category` is {"violence,aiding_and_abetting,
incitement": true, ...}) names every flag set; a label given as flags is its first flag set.

A prompt may have several rows (BeaverTails holds one row per answer, several answers per prompt,
and its `is_safe` judges each answer): the rows of one prompt (the same id, or the same prompt text
when ids are hashed) make ONE record. Its `label` is the most severe of its rows' labels (harmful >
borderline > benign > unknown), so a harmful prompt whose first answer happens to be safe is still
harmful; `categories` is the sorted union of every row's categories (the flags set in any row) and
`category` the first of them in row order (within a row, in the source's column order; `none` when
no row names one), so per-category code keeps one string. `original_responses` is every row's
response in row order with that row's safety, `{"response": ..., "safe": true | false | null}`:
a row's label read as the safety of its answer (benign -> true, harmful -> false, otherwise null),
which is what BeaverTails' is_safe mapped to a label is; `original_response` stays the first row's
response, as released. A source with one row per prompt gives the same label, category and
original_response as before. A `limit` counts prompts, not rows, and the whole file or Hub split is
still read (`load_dataset` has downloaded all of it anyway), so a kept prompt gets every one of its
rows, wherever they are; rows of prompts past the limit are skipped, even unreadable ones.

Several sources mix into one set (the AIDSAFE paper: 5,000 BeaverTails safety prompts and 5,000
Alpagasus general prompts): `prompts` is then a list of mappings with `source` and optional `split`,
`subset`, `columns`, `defaults`, `values`, `limit`, each read as above.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from .records import InputError, numbered_rows

LABELS = ("harmful", "benign", "borderline")
SOURCE_KEYS = ("source", "split", "subset", "columns", "defaults", "values", "limit")


def prompt_id(source: str, prompt: str) -> str:
    return f"{source}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}"


def _rows(source: str, split: str, subset: str | None) -> tuple[Iterable[tuple[str, dict]], str]:
    """(where, row) pairs, `where` naming the file and line (or the Hub row) for errors. Hub rows
    are read as they are taken, one at a time, so a large split (BeaverTails' 300k rows) is never
    held in memory as dicts."""
    if source.startswith("hf:"):
        name = source[3:]
        try:
            from datasets import load_dataset
            ds = load_dataset(name, subset, split=split)
        except Exception as e:  # datasets raises many kinds; all mean "cannot load that"
            raise InputError(f"{source}: cannot load the Hub dataset (split '{split}'): {str(e).splitlines()[0]}") from None
        return ((f"{source} row {i}", dict(r)) for i, r in enumerate(ds)), name.split("/")[-1]
    path = Path(source)
    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise InputError(f"{source}: prompts must be a .jsonl or .csv file, or hf:<dataset id>")
    return [(f"{source}:{n}", row) for n, row in numbered_rows(path)], path.stem


def load_prompts(source: str, split: str = "train", subset: str | None = None,
                 columns: dict | None = None, defaults: dict | None = None,
                 limit: int | None = None, values: dict | None = None) -> list[dict]:
    rows, stem = _rows(source, split, subset)
    # `id` and an unmapped `original_response` are optional; a column the user names is not.
    optional = {"id"} | ({"original_response"} - set(columns or {}))
    columns = {"id": "id", "prompt": "prompt", "label": "label", "category": "category",
               "original_response": "original_response", **(columns or {})}
    defaults = {"label": "unknown", "category": "unknown", **(defaults or {})}
    groups: dict[str, list[dict]] = {}  # id -> its rows' records, in row order (dicts keep first-seen order)
    for where, row in rows:
        full = bool(limit) and len(groups) >= limit
        try:
            rec = _row_record(row, where, stem, columns, defaults, values or {}, optional)
        except InputError:
            if full:  # a row past the limit is never used, so it cannot fail the set
                continue
            raise
        group = groups.get(rec["id"])
        if group is None:
            if not full:
                groups[rec["id"]] = [rec]
            continue
        if rec["given_id"] and rec["prompt"] != group[0]["prompt"]:
            raise InputError(f"{where}: duplicate id '{rec['id']}'")
        group.append(rec)
    if not groups:
        raise InputError(f"{source}: no prompts")
    return [_merged(group) for group in groups.values()]


SEVERITY = ("unknown", "benign", "borderline", "harmful")  # a prompt takes its most severe row's label
ANSWER_SAFE = {"benign": True, "harmful": False}  # a row's label as the safety of its answer (BeaverTails' is_safe)


def _row_record(row: dict, where: str, stem: str, columns: dict, defaults: dict, values: dict, optional: set) -> dict:
    """One source row in our schema, checked; `categories` holds every category it names."""
    rec = {}
    for field, column in columns.items():
        value = _column(row, column, where)
        if value not in (None, ""):
            rec[field] = _mapped(value, values.get(field))
        elif field in defaults:
            rec[field] = defaults[field]
        elif field not in optional:
            raise InputError(f"{where}: missing field '{column}'")
    if "original_response" in rec:
        rec["original_response"] = str(rec["original_response"]).strip()
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        raise InputError(f"{where}: empty prompt")
    rec["prompt"] = rec["prompt"].strip()
    rec["given_id"] = bool(rec.get("id"))
    rec["id"] = str(rec.get("id") or prompt_id(stem, rec["prompt"]))
    rec["label"], rec["categories"] = str(_flag(rec["label"])), [str(c) for c in _flags(rec["category"])]
    if rec["label"] not in LABELS + ("unknown",):
        raise InputError(f"{where}: label '{rec['label']}' is not one of {', '.join(LABELS)} (or unknown); "
                         "map it with prompt_columns and prompt_values, or set prompt_defaults={label: ...}")
    return rec


def _merged(group: list[dict]) -> dict:
    """One prompt's record from its rows (the module docstring): the most severe label, the union
    of categories, every row's response with its safety; the rest from the first row."""
    first = group[0]
    names = list(dict.fromkeys(c for rec in group for c in rec["categories"]))
    out = {k: v for k, v in first.items() if k not in ("given_id", "original_response", "categories")}
    out["label"] = max((rec["label"] for rec in group), key=SEVERITY.index)
    out["category"], out["categories"] = names[0] if names else "none", sorted(names)
    answers = [{"response": rec["original_response"], "safe": ANSWER_SAFE.get(rec["label"])}
               for rec in group if "original_response" in rec]
    if answers:
        out["original_response"], out["original_responses"] = answers[0]["response"], answers
    return out


def _column(row: dict, column, where: str):
    """A column's value; a list of columns joins their non-empty values with a blank line."""
    if not isinstance(column, list):
        return row.get(column)
    for c in column:
        if c not in row:
            raise InputError(f"{where}: missing field '{c}'")
    return "\n\n".join(str(row[c]).strip() for c in column if str(row[c] or "").strip()) or None


def _mapped(value, mapping: dict | None):
    """`value` through a {their_value: our_value} mapping, matched as text in any case, so a
    YAML `false`, a CSV "False" and a Hub boolean are one key; unlisted values pass through."""
    for theirs, ours in (mapping or {}).items():
        if str(theirs).lower() == str(value).lower():
            return ours
    return value


def _flag(value):
    """The first flag set of a {name: bool} mapping (or the first item of a list); else the value."""
    if isinstance(value, dict):
        return next((k for k, v in value.items() if v), "none")
    if isinstance(value, (list, tuple)):
        return value[0] if value else "none"
    return value


def _flags(value) -> list:
    """Every flag set of a {name: bool} mapping (every item of a list), in order; else [value]."""
    if isinstance(value, dict):
        return [k for k, v in value.items() if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def prompt_sources(prompts, split: str = "train", subset: str | None = None, columns: dict | None = None,
                   defaults: dict | None = None, values: dict | None = None) -> list[dict]:
    """`generate.prompts` as a list of sources: one (a path or hf:<id>, with the stage's split,
    columns, defaults and values) or a mix (a list of mappings, each with its own)."""
    if isinstance(prompts, str):
        return [{"source": prompts, "split": split, "subset": subset, "columns": columns or {},
                 "defaults": defaults or {}, "values": values or {}, "limit": None}]
    if not isinstance(prompts, list) or not prompts:
        raise InputError(f"generate.prompts: expected a file, hf:<id>, or a list of sources, got {prompts!r}")
    specs = []
    for i, entry in enumerate(prompts):
        entry = {"source": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "source" not in entry or set(entry) - set(SOURCE_KEYS):
            raise InputError(f"generate.prompts[{i}]: expected a mapping with source and optional "
                             f"{', '.join(SOURCE_KEYS[1:])}, got {entry!r}")
        limit = entry.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InputError(f"generate.prompts[{i}].limit must be a positive number of prompts or null (all), got {limit!r}")
        specs.append({"split": split, "subset": None, "columns": {}, "defaults": {}, "values": {}, "limit": None, **entry})
    return specs


def load_prompt_sources(specs: list[dict], limit: int | None = None) -> list[dict]:
    """Every source's prompts, in order, then the first `limit`; an id in two sources is an error.
    Each spec gets `rows`, the number it gave, for the manifest."""
    out, seen = [], {}
    for spec in specs:
        rows = load_prompts(spec["source"], spec["split"], spec["subset"], spec["columns"], spec["defaults"],
                            spec["limit"], spec["values"])
        for rec in rows:
            if rec["id"] in seen:
                raise InputError(f"{spec['source']}: id '{rec['id']}' is also in {seen[rec['id']]}")
            seen[rec["id"]] = spec["source"]
        spec["rows"] = len(rows)
        out += rows
    return out[:limit] if limit else out
