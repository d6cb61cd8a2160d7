"""Evaluation suites: built-in offline sets, Hub benchmarks by id, or any user file.

Four kinds, each with its schema (one record per item; `id` stable, hashed from the text if the
source has none):

| kind | fields | from the source |
|---|---|---|
| harmful | prompt, label (harmful), category | `prompt`; `label`, `category` optional |
| jailbreak | prompt (wrapped), forbidden_prompt, template, category | `prompt`, each wrapped in every `${prompt}` template of `templates/` |
| overrefusal | prompt, label (safe or unsafe), category | `prompt`, `label` (safe/benign/borderline -> safe, unsafe/harmful -> unsafe) |
| utility | question, choices, answer_letter, prompt (the formatted question), category | `question`, `choices` (a list, a JSON list or `a | b | c`), `answer` (a letter or a 0-based index) |

In a recipe a suite is a built-in name, or a mapping:

    suites:
      - harmful                                    # built-in (data/eval/, written for this project)
      - {name: beavertails, limit: 500}            # a built-in with a key changed
      - {name: mine, kind: overrefusal, source: my.csv, columns: {prompt: text, label: gold}}

Keys: name, kind, source (.jsonl/.csv or hf:<id>), split, subset, columns ({our_field:
their_column}; a dotted column reads inside lists and dicts, `conversation.0.content`), defaults
({our_field: value}), where ({their_column: value} rows to keep), templates (jailbreak), limit.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .prompt_sets import _rows, prompt_id
from .records import InputError
from .templates import load_template

DATA = Path(__file__).resolve().parent.parent / "data" / "eval"
KINDS = ("harmful", "jailbreak", "overrefusal", "utility")
REQUIRED = {"harmful": ("prompt",), "jailbreak": ("prompt",), "overrefusal": ("prompt", "label"),
            "utility": ("question", "choices", "answer")}
SAFE_LABELS, UNSAFE_LABELS = ("safe", "benign", "borderline"), ("unsafe", "harmful")


@dataclass
class SuiteSpec:
    name: str
    kind: str
    source: str                         # .jsonl / .csv, or hf:<dataset id>
    split: str = "test"                 # Hub only
    subset: str | None = None           # Hub only: the config name
    columns: dict = field(default_factory=dict)    # {our_field: their_column}
    defaults: dict = field(default_factory=dict)   # {our_field: value} when the column is absent
    where: dict = field(default_factory=dict)      # {their_column: value}: keep matching rows only
    templates: str | None = None        # jailbreak: folder of ${prompt} templates (*.txt)
    limit: int | None = None            # first N source rows kept


BUILTIN = {
    # offline, written for this project (requests only; data/eval/README.md)
    "harmful": SuiteSpec("harmful", "harmful", str(DATA / "harmful.jsonl")),
    "jailbreak": SuiteSpec("jailbreak", "jailbreak", str(DATA / "jailbreak_prompts.jsonl"),
                           templates=str(DATA / "jailbreak_templates")),
    "xstest": SuiteSpec("xstest", "overrefusal", str(DATA / "overrefusal.jsonl")),
    "mmlu": SuiteSpec("mmlu", "utility", str(DATA / "utility.jsonl")),
    # the papers' benchmarks on the Hub (need network access; some are gated: accept their terms)
    "beavertails": SuiteSpec("beavertails", "harmful", "hf:PKU-Alignment/BeaverTails", split="30k_test",
                             where={"is_safe": False}, defaults={"label": "harmful"}),
    "wildchat": SuiteSpec("wildchat", "harmful", "hf:allenai/WildChat", split="train",
                          columns={"prompt": "conversation.0.content"}, where={"toxic": True},
                          defaults={"label": "harmful", "category": "wildchat"}, limit=500),
    "strongreject": SuiteSpec("strongreject", "jailbreak", "hf:walledai/StrongREJECT", split="train",
                              templates=str(DATA / "jailbreak_templates")),
    "xstest-hub": SuiteSpec("xstest-hub", "overrefusal", "hf:walledai/XSTest", split="test",
                            columns={"category": "type"}),
    "mmlu-hub": SuiteSpec("mmlu-hub", "utility", "hf:cais/mmlu", subset="all", split="test",
                          columns={"category": "subject"}),
}


def suite_spec(entry) -> SuiteSpec:
    """A recipe entry (a name or a mapping) -> SuiteSpec, with errors that name the problem."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not entry.get("name"):
        raise InputError(f"eval.suites: each suite is a name or a mapping with a name, got {entry!r}")
    known = {f.name for f in fields(SuiteSpec)}
    for key in entry:
        if key not in known:
            raise InputError(f"eval.suites '{entry['name']}': unknown key '{key}' (known: {', '.join(sorted(known))})")
    name = str(entry["name"])
    if "/" in name:
        raise InputError(f"eval.suites: suite name '{name}' may not contain '/'")
    base = BUILTIN.get(name)
    if base is None and "source" not in entry:
        raise InputError(f"unknown suite '{name}' (built-in: {', '.join(BUILTIN)}; or give source: and kind:)")
    spec = replace(base, **entry) if base else SuiteSpec(**{"kind": entry.get("kind", ""), **entry})
    if spec.kind not in KINDS:
        raise InputError(f"eval.suites '{name}': kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    return spec


def _get(row: dict, column: str):
    """A column, or a dotted path into nested lists/dicts (`conversation.0.content`)."""
    value = row
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    if isinstance(value, dict):  # e.g. BeaverTails' {category: true/false, ...}
        value = ",".join(k for k, v in value.items() if v) or "none"
    return value


def _choices(value, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [c.strip() for c in text.split("|")]
        except json.JSONDecodeError:
            raise InputError(f"{where}: 'choices' is not a JSON list") from None
    if not isinstance(value, list) or not 2 <= len(value) <= 10:
        raise InputError(f"{where}: 'choices' must list 2 to 10 options, got {value!r}")
    return [str(c) for c in value]


def _letter(value, n: int, where: str) -> str:
    letters = "ABCDEFGHIJ"[:n]
    text = str(value).strip()
    if text.isdigit() and int(text) < n:
        return letters[int(text)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    raise InputError(f"{where}: 'answer' must be a letter {letters[0]}-{letters[-1]} or a 0-based index, got {value!r}")


def _jailbreak_templates(folder: str) -> dict[str, string.Template]:
    paths = sorted(Path(folder).glob("*.txt"))
    if not paths:
        raise InputError(f"{folder}: no jailbreak templates (*.txt) here")
    out = {}
    for p in paths:
        text = p.read_text(encoding="utf-8").strip()
        if "${prompt}" not in text:
            raise InputError(f"{p}: a jailbreak template needs a ${{prompt}} placeholder")
        out[p.stem] = string.Template(text)
    return out


def load_suite(spec: SuiteSpec, limit: int | None = None, templates=None) -> list[dict]:
    """The suite's records (see the module docstring). `limit` caps source rows (the smaller of
    it and the suite's own); `templates` is the folder holding mmlu_question.txt."""
    rows, stem = _rows(spec.source, spec.split, spec.subset)
    columns = {f: spec.columns.get(f, f) for f in ("id", "prompt", "label", "category", "question", "choices", "answer")}
    wrap = _jailbreak_templates(spec.templates or DATA / "jailbreak_templates") if spec.kind == "jailbreak" else None
    question = load_template("mmlu_question", templates) if spec.kind == "utility" else None
    cap = min(x for x in (limit, spec.limit, 10**12) if x)
    out, seen = [], set()
    for where, row in rows:
        if any(_get(row, k) != v for k, v in spec.where.items()):
            continue
        rec = {}
        for f, col in columns.items():
            value = _get(row, col)
            rec[f] = value if value not in (None, "") else spec.defaults.get(f)
            if rec[f] is None and f in REQUIRED[spec.kind]:
                raise InputError(f"{where}: missing field '{col}' (a {spec.kind} suite needs "
                                 f"{', '.join(spec.columns.get(c, c) for c in REQUIRED[spec.kind])})")
        text = rec["question"] if spec.kind == "utility" else rec["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: empty {'question' if spec.kind == 'utility' else 'prompt'}")
        item = {"id": str(rec["id"] or prompt_id(stem, text.strip())), "suite": spec.name, "kind": spec.kind,
                "category": str(rec["category"] or "unknown"), "label": str(rec["label"] or ("harmful" if spec.kind != "overrefusal" else ""))}
        if item["id"] in seen:
            if rec["id"]:
                raise InputError(f"{where}: duplicate id '{item['id']}'")
            continue  # the same text twice in a Hub set: evaluate it once
        seen.add(item["id"])
        if spec.kind == "overrefusal":
            lab = item["label"].lower()
            if lab not in SAFE_LABELS + UNSAFE_LABELS:
                raise InputError(f"{where}: label must be safe or unsafe, got {item['label']!r}")
            item["label"] = "safe" if lab in SAFE_LABELS else "unsafe"
        if spec.kind == "utility":
            choices = _choices(rec["choices"], where)
            letters = "ABCDEFGHIJ"[:len(choices)]
            item.update(question=text.strip(), choices=choices, answer_letter=_letter(rec["answer"], len(choices), where),
                        label="utility", prompt=question.chat(
                            question=text.strip(), subject=item["category"].replace("_", " "),
                            choices="\n".join(f"{l}. {c}" for l, c in zip(letters, choices)))[-1]["content"])
            out.append(item)
        elif wrap:
            for name, tpl in wrap.items():
                out.append({**item, "id": f"{item['id']}--{name}", "template": name, "forbidden_prompt": text.strip(),
                            "prompt": tpl.substitute(prompt=text.strip())})
        else:
            out.append({**item, "prompt": text.strip()})
        if len(seen) >= cap:
            break
    if not out:
        raise InputError(f"{spec.source}: suite '{spec.name}' has no items")
    return out
