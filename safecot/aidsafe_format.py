"""The schema of the released AIDSAFE dataset (Hub: AmazonScience/AIDSAFE, CSV, configs
Beavertails_CoT and Dataadvisor_CoT), so refined records can be shared in it and the released
data can be trained on without generating any.

Columns: `prompt`, `refined_thoughts` (some loaders call it `thoughts`: both are read), `response`,
`deliberation_log`. Thoughts are written one per line, numbered; the log is the deliberation as
text. Our own `id`, `label` and `category` travel as extra columns and are optional on import.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .parsing import items
from .prompt_sets import prompt_id
from .records import InputError, numbered_rows

COLUMNS = ("prompt", "refined_thoughts", "response", "deliberation_log")


def log_text(log: list[dict]) -> str:
    return "\n\n".join(f"[{t.get('agent', t.get('step'))}] {t['text']}" for t in log)


def export_csv(records: list[dict], path: Path) -> int:
    tmp = Path(path).with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "id", "label", "category"])
        w.writeheader()
        for r in records:
            w.writerow({"prompt": r["prompt"],
                        "refined_thoughts": "\n".join(f"{i}. {t}" for i, t in enumerate(r["refined_thoughts"], 1)),
                        "response": r["refined_response"], "deliberation_log": log_text(r["deliberation_log"]),
                        "id": r["id"], "label": r["label"], "category": r["category"]})
    tmp.replace(path)
    return len(records)


def _thoughts(value) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value or "")
    if text.lstrip().startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    return items(text)


def import_records(source: str, subset: str | None = None, split: str = "train", limit: int | None = None) -> list[dict]:
    """Stage-1-shaped records from the released dataset (hf:<id>) or a local CSV/JSONL in its schema."""
    if source.startswith("hf:"):
        try:
            from datasets import load_dataset
            rows = [(f"{source} row {i}", dict(r)) for i, r in enumerate(load_dataset(source[3:], subset, split=split))]
        except Exception as e:  # offline, unknown id, unknown config...
            raise InputError(f"{source}: cannot load the Hub dataset ({subset}/{split}): {str(e).splitlines()[0]}") from None
    else:
        rows = [(f"{source}:{n}", r) for n, r in numbered_rows(source)]
    out, seen = [], set()
    for where, row in rows:
        thoughts = row.get("refined_thoughts", row.get("thoughts"))
        for key, value in (("prompt", row.get("prompt")), ("refined_thoughts or thoughts", thoughts), ("response", row.get("response"))):
            if value is None:
                raise InputError(f"{where}: missing field '{key}'")
        if not str(row["prompt"]).strip():
            raise InputError(f"{where}: empty prompt")
        rid = str(row.get("id") or prompt_id("aidsafe", str(row["prompt"])))
        if rid in seen:
            continue
        seen.add(rid)
        log = row.get("deliberation_log") or ""
        out.append({"id": rid, "prompt": str(row["prompt"]).strip(), "label": row.get("label") or "unknown",
                    "category": row.get("category") or "unknown", "intents": {},
                    "thoughts": _thoughts(thoughts), "response": str(row["response"]),
                    "deliberation_log": [{"step": "imported", "agent": "aidsafe", "text": str(log)}],
                    "stop_reason": "imported", "parse_failures": []})
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{source}: no records")
    return out
