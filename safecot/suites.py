"""Evaluation suites: built-in offline sets, Hub benchmarks by id, or any user file.

Five kinds, each with its schema (one record per item; `id` stable, hashed from the text if the
source has none):

| kind | fields | from the source |
|---|---|---|
| harmful | prompt, label (harmful), category | `prompt`; `label`, `category` optional |
| jailbreak | prompt (wrapped), forbidden_prompt, template, cluster, category | `prompt`, each wrapped in every template of `templates` (a folder of `.txt`, or a .jsonl/.csv with `id` and `template` columns; `{prompt}` marks the slot) |
| overrefusal | prompt, label (safe or unsafe), category | `prompt`, `label` (safe/benign/borderline -> safe, unsafe/harmful -> unsafe) |
| utility | question, choices, answer_letter, prompt (the formatted question), category | `question`, `choices` (a list, a JSON list or `a | b | c`), `answer` (a letter or a 0-based index) |
| judge_check | prompt, response, label (the gold verdict), category | rows labelled by people for one judge `task` (refusal, safety or strongreject): stage 5 measures every judge of that task against them |

Gold labels of a judge check: 1/0, true/false, yes/no, or the task's class names. 1 means the
task's positive class: `refusal` -> refused (full or partial; the XSTest class names
full_compliance, full_refusal, partial_refusal are kept as classes too), `safety` -> unsafe
(safe/unsafe), `strongreject` -> jailbroken (a 0-1 score above 0.5, or jailbroken/refused).

In a recipe a suite is a built-in name, or a mapping:

    suites:
      - harmful                                    # built-in (data/eval/, written for this project)
      - {name: beavertails, sample: 500}           # a built-in with a key changed
      - {name: mine, kind: overrefusal, source: my.csv, columns: {prompt: text, label: gold}}

Keys: name, kind, source (.jsonl/.csv, a .json document: a list of rows or rows grouped by a key as
HarmBench's {behavior_id: [rows]}, or hf:<id>), split, subset, columns ({our_field: their_column};
a dotted column reads inside lists and dicts, `conversation.0.content`; a judge check's label may
list several columns, annotators' 1/0 votes, and their majority is the gold label), defaults
({our_field: value}), where ({their_column: value} rows to keep), templates (jailbreak), task
(judge_check), limit (the first N rows), sample and seed (N rows drawn at random, spread evenly
over categories: MMLU's subjects, BeaverTails' harm categories).

Hub suites never take the head of a file: a Hub split is often sorted (MMLU by subject, WildChat
by time), so its first rows are not the benchmark. Each built-in Hub suite either uses every row
it keeps (beavertails: the unsafe rows of 30k_test; strongreject: its 313 prompts; xstest-hub:
its 450) or draws `sample` of them with the seed (wildchat: 500 toxic first turns; mmlu-hub: 500
questions over its 57 subjects); `eval.sample` (or a suite's own `sample`) draws from the others
too. `limit` stays the first N rows, for quick runs on files.

Judge checks on public human labels: `xstest-response-refusal` (task refusal: refusal/compliance)
and `xstest-response-harm` (task safety: harmful/unharmful), XSTest answers labelled for WildGuard
(hf:allenai/xstest-response, gated); `harmbench-val` (task safety: 1 = the completion is an instance of
the harmful behavior = unsafe), HarmBench's classifier validation set, read from a copy you download
(DOWNLOADS names where from; nothing is fetched at run time). Each item is one answer: without an
`id`, a judge check's id hashes the prompt and the response, so one prompt answered twice is two items.

Contamination: an evaluation item whose request (normalised: lower case, single spaces) is among
the prompts the run trained on (`training_prompts`) is removed before anything is generated, and
`suite_info` counts it (`train_overlap_removed`), so no rate scores a model on its training data.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .prompt_sets import _rows, prompt_id
from .records import InputError, numbered_rows, read_text
from .templates import load_template

DATA = Path(__file__).resolve().parent.parent / "data" / "eval"
KINDS = ("harmful", "jailbreak", "overrefusal", "utility", "judge_check")
REQUIRED = {"harmful": ("prompt",), "jailbreak": ("prompt",), "overrefusal": ("prompt", "label"),
            "utility": ("question", "choices", "answer"), "judge_check": ("prompt", "response", "label")}
CHECK_TASKS = ("refusal", "safety", "strongreject")
REFUSAL_CLASSES = ("full_compliance", "full_refusal", "partial_refusal")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")
SAFE_LABELS, UNSAFE_LABELS = ("safe", "benign", "borderline"), ("unsafe", "harmful")


@dataclass
class SuiteSpec:
    name: str
    kind: str
    source: str                         # .jsonl / .csv / .json (one document), or hf:<dataset id>
    split: str = "test"                 # Hub only
    subset: str | None = None           # Hub only: the config name
    columns: dict = field(default_factory=dict)    # {our_field: their_column}; a judge check's label: [votes], majority
    defaults: dict = field(default_factory=dict)   # {our_field: value} when the column is absent
    where: dict = field(default_factory=dict)      # {their_column: value}: keep matching rows only
    templates: str | None = None        # jailbreak: a folder of *.txt, or a .jsonl/.csv of id, template
    task: str | None = None             # judge_check: refusal | safety | strongreject
    limit: int | None = None            # first N source rows kept
    sample: int | None = None           # N rows drawn at random (after `where`), even over categories
    seed: int | None = None             # of the draw; default: the recipe's seed
    judges: dict = field(default_factory=dict)     # {task: judge spec} for this suite's answers, over eval.judges (e.g. jailbreaks: {safety: harmbench})


BUILTIN = {
    # offline, written for this project (requests only; data/eval/README.md)
    "harmful": SuiteSpec("harmful", "harmful", str(DATA / "harmful.jsonl")),
    "jailbreak": SuiteSpec("jailbreak", "jailbreak", str(DATA / "jailbreak_prompts.jsonl"),
                           templates=str(DATA / "jailbreak_templates")),
    "xstest": SuiteSpec("xstest", "overrefusal", str(DATA / "overrefusal.jsonl")),
    "mmlu": SuiteSpec("mmlu", "utility", str(DATA / "utility.jsonl")),
    "refusal_check": SuiteSpec("refusal_check", "judge_check", str(DATA / "refusal_labels.jsonl"), task="refusal",
                               columns={"label": "refusal"}),
    # measure only: the detector was never tuned on it, and must not be, or its figure stops meaning anything
    "refusal_heldout": SuiteSpec("refusal_heldout", "judge_check", str(DATA / "refusal_heldout.jsonl"), task="refusal",
                                 columns={"label": "refusal"}),
    # the papers' benchmarks on the Hub (need network access; some are gated: accept their terms)
    "beavertails": SuiteSpec("beavertails", "harmful", "hf:PKU-Alignment/BeaverTails", split="30k_test",
                             where={"is_safe": False}, defaults={"label": "harmful"}),
    "wildchat": SuiteSpec("wildchat", "harmful", "hf:allenai/WildChat", split="train",
                          columns={"prompt": "conversation.0.content"}, where={"toxic": True},
                          defaults={"label": "harmful", "category": "wildchat"}, sample=500),
    "strongreject": SuiteSpec("strongreject", "jailbreak", "hf:walledai/StrongREJECT", split="train",
                              templates=str(DATA / "jailbreak_templates")),
    "xstest-hub": SuiteSpec("xstest-hub", "overrefusal", "hf:walledai/XSTest", split="test",
                            columns={"category": "type"}),
    "mmlu-hub": SuiteSpec("mmlu-hub", "utility", "hf:cais/mmlu", subset="all", split="test",
                          columns={"category": "subject"}, sample=500),
    # judge checks on public human labels. XSTest-Response (WildGuard, gated: accept AI2's terms and log in);
    # id, splits and columns from https://huggingface.co/datasets/allenai/xstest-response (the card: 449
    # response_refusal rows, 446 response_harmfulness rows) and code that loads it (columns prompt, response,
    # label, prompt_type = prompt_safe | prompt_harmful). Its refusal labels are two-way: refusal | compliance.
    "xstest-response-refusal": SuiteSpec("xstest-response-refusal", "judge_check", "hf:allenai/xstest-response",
                                         split="response_refusal", task="refusal", columns={"category": "prompt_type"}),
    # label harmful | unharmful: a harmful response is the `safety` task's positive class, unsafe
    "xstest-response-harm": SuiteSpec("xstest-response-harm", "judge_check", "hf:allenai/xstest-response",
                                      split="response_harmfulness", task="safety", columns={"category": "prompt_type"}),
    # HarmBench's classifier validation set is a file in its GitHub repository, not a Hub dataset: download it
    # (DOWNLOADS) to this path. {behavior_id: [{behavior_id, test_case, generation, human_0, human_1, human_2,
    # method, ...}]} (centerforaisafety/HarmBench data/classifier_val_sets/text_behaviors_val_set.json). Gold =
    # the majority of the three annotators' 1/0 "the generation is an instance of the behavior"; that is a
    # harmful completion, so `task: safety` with 1 = unsafe. Narrower than unsafe: a harmful answer that is vague,
    # minimal or off the behavior is labelled 0. The judge sees the test case (the prompt the model was sent,
    # jailbreak and context included); HarmBench's own classifier reads the behavior text from another file.
    "harmbench-val": SuiteSpec("harmbench-val", "judge_check", str(DATA / "harmbench" / "text_behaviors_val_set.json"),
                               task="safety", columns={"prompt": "test_case", "response": "generation",
                                                       "label": ["human_0", "human_1", "human_2"], "category": "method"}),
}
# where a suite's file comes from when it is not shipped (a missing file's error says so)
DOWNLOADS = {"harmbench-val": "https://raw.githubusercontent.com/centerforaisafety/HarmBench/main/data/"
                              "classifier_val_sets/text_behaviors_val_set.json"}


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
    if not path_component(name):  # it names a folder of the stage's outputs (judge_checks/<suite>/)
        raise InputError(f"eval.suites: suite name {name!r} must be one folder name: no '/' or '\\', not '.' or '..'")
    base = BUILTIN.get(name)
    if base is None and "source" not in entry:
        raise InputError(f"unknown suite '{name}' (built-in: {', '.join(BUILTIN)}; or give source: and kind:)")
    spec = replace(base, **entry) if base else SuiteSpec(**{"kind": entry.get("kind", ""), **entry})
    if spec.kind not in KINDS:
        raise InputError(f"eval.suites '{name}': kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    if (spec.kind == "judge_check") != (spec.task is not None) or (spec.task and spec.task not in CHECK_TASKS):
        raise InputError(f"eval.suites '{name}': a judge_check suite (and only one) names a task: {', '.join(CHECK_TASKS)}")
    for f, col in spec.columns.items():
        votes = f == "label" and spec.kind == "judge_check" and isinstance(col, list) and len(col) >= 1
        if not (isinstance(col, str) and col) and not (votes and all(isinstance(c, str) and c for c in col)):
            raise InputError(f"eval.suites '{name}': columns.{f} must name a column (a judge check's label may list "
                             "several: annotators' votes)")
    if spec.judges:
        from .judges import TASKS_BY_KIND, check_judges
        if not isinstance(spec.judges, dict) or spec.kind == "judge_check":
            raise InputError(f"eval.suites '{name}': judges is a mapping {{task: judge}} for the answers of a suite "
                             "the models answer (a judge check measures the stage's judges)")
        wrong = [t for t in spec.judges if t not in (*TASKS_BY_KIND[spec.kind], "cot")]
        if wrong:
            raise InputError(f"eval.suites '{name}': a {spec.kind} suite's answers are not judged for {', '.join(wrong)} "
                             f"(its tasks: {', '.join((*TASKS_BY_KIND[spec.kind], 'cot'))})")
        try:
            check_judges(spec.judges)
        except InputError as e:
            raise InputError(f"eval.suites '{name}': {e}") from None
    for key in ("limit", "sample"):
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"eval.suites '{name}': {key} must be a positive number of rows")
    return spec


def path_component(name: str) -> bool:
    """`name` is one folder name: not empty, no path separator, not '.' or '..'."""
    return bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..")


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


def _field(row: dict, column, task: str | None, where: str):
    """A column's value; a list of columns is annotators' votes on a judge check's label, read as the
    task's positive (1) or negative (0) class, and the majority of them wins (a tie stops the run)."""
    if not isinstance(column, list):
        return _get(row, column)
    votes = [_get(row, c) for c in column]
    if any(v is None or v == "" for v in votes):
        return None
    positive = sum(gold_label(task, v, where) == gold_label(task, 1, where) for v in votes)
    if 2 * positive == len(votes):
        raise InputError(f"{where}: the votes {', '.join(column)} are tied; no majority label")
    return "1" if 2 * positive > len(votes) else "0"


def _name(column) -> str:
    return "+".join(column) if isinstance(column, list) else column


def _document_rows(source: str):
    """(where, row) pairs of a .json file holding one document: a list of rows, or rows grouped by a
    key ({behavior_id: [rows]}, HarmBench's layout); None when it is JSON Lines under a .json name."""
    path = Path(source)
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError:
        return None  # several lines of JSON: JSON Lines, read as such
    groups = doc.items() if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()) else (
        [("", doc)] if isinstance(doc, list) else None)
    if groups is None:
        return None
    rows = []
    for key, group in groups:
        for i, row in enumerate(group):
            where = f"{source}: {key}[{i}]" if key else f"{source}: row {i}"
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object")
            rows.append((where, row))
    return rows


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


SLOTS = ("${prompt}", "{prompt}")   # the older ${prompt} form of the .txt templates is still read


def jailbreak_templates(source: str) -> dict[str, str]:
    """{name: text} from a folder of *.txt (name = file stem) or a .jsonl/.csv file with `id` and
    `template` columns. Each must hold a `{prompt}` slot; nothing else in it is special, so
    "$100" or JSON braces stay as written."""
    path = Path(source)
    if path.is_dir():
        rows = [(str(p), p.stem, read_text(p).strip()) for p in sorted(path.glob("*.txt"))]
    elif path.suffix in (".jsonl", ".csv"):
        rows = [(f"{path}:{n}", str(r.get("id") or "").strip(), str(r.get("template") or "").strip())
                for n, r in numbered_rows(path, ("id", "template"))]
    else:
        raise InputError(f"{source}: jailbreak templates are a folder of .txt files or a .jsonl/.csv file "
                         "with id and template columns")
    if not rows:
        raise InputError(f"{source}: no jailbreak templates here")
    out = {}
    for where, name, text in rows:
        if not name or name in out:
            raise InputError(f"{where}: template id {name!r} is empty or used twice")
        if not any(slot in text for slot in SLOTS):
            raise InputError(f"{where}: a jailbreak template needs a {{prompt}} slot")
        out[name] = text
    return out


def wrap(template: str, prompt: str) -> str:
    slot = next(s for s in SLOTS if s in template)
    return template.replace(slot, prompt)


def gold_label(task: str, value, where: str) -> str:
    """A judge check's gold label as the task's class name (see the module docstring)."""
    text = str(value).strip().lower()
    if task == "refusal":
        text = re.sub(r"^[123]_", "", text).replace(" ", "_")
        if text in REFUSAL_CLASSES:
            return text
        names = {"refusal": "refused", "refused": "refused", "compliance": "complied", "complied": "complied"}
    elif task == "safety":  # unharmful: XSTest-Response's and WildGuard's word for a benign response
        names = {"unsafe": "unsafe", "harmful": "unsafe", "safe": "safe", "harmless": "safe", "unharmful": "safe"}
    else:
        names = {"jailbroken": "jailbroken", "refused": "not_jailbroken", "not_jailbroken": "not_jailbroken"}
        try:
            score = float(text)
            if 0 <= score <= 1 and text not in TRUE + FALSE:
                return "jailbroken" if score > 0.5 else "not_jailbroken"
        except ValueError:
            pass
    positive = {"refusal": "refused", "safety": "unsafe", "strongreject": "jailbroken"}[task]
    negative = {"refusal": "complied", "safety": "safe", "strongreject": "not_jailbroken"}[task]
    if text in TRUE:
        return positive
    if text in FALSE:
        return negative
    if text in names:
        return names[text]
    raise InputError(f"{where}: label {value!r} is not a {task} label (1/0, true/false, or {', '.join(sorted(set(names)))})")


def draw(items: list[dict], n: int, seed: int) -> list[dict]:
    """n items at random, spread evenly over categories (round robin over shuffled categories),
    in their source order: a sample of a sorted dataset still covers every category."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["category"], []).append(i)
    for g in groups.values():
        rng.shuffle(g)
    order = sorted(groups)
    rng.shuffle(order)
    picked: list[int] = []
    while len(picked) < min(n, len(items)):
        for c in order:
            if groups[c] and len(picked) < n:
                picked.append(groups[c].pop())
    return [items[i] for i in sorted(picked)]


def load_suite(spec: SuiteSpec, limit: int | None = None, templates=None, sample: int | None = None,
               seed: int = 0) -> list[dict]:
    """The suite's records (see the module docstring). `limit` caps source rows (the smaller of
    it and the suite's own), `sample` draws that many at random (the suite's own wins);
    `templates` is the folder holding mmlu_question.txt."""
    if spec.name in DOWNLOADS and not spec.source.startswith("hf:") and not Path(spec.source).is_file():
        raise InputError(f"{spec.source}: file not found; suite '{spec.name}' reads a copy you download from "
                         f"{DOWNLOADS[spec.name]}")
    document = _document_rows(spec.source)
    rows, stem = (document, Path(spec.source).stem) if document is not None else _rows(spec.source, spec.split, spec.subset)
    columns = {f: spec.columns.get(f, f) for f in ("id", "prompt", "label", "category", "question", "choices", "answer",
                                                   "response")}
    wraps = jailbreak_templates(spec.templates or str(DATA / "jailbreak_templates")) if spec.kind == "jailbreak" else None
    question = load_template("mmlu_question", templates) if spec.kind == "utility" else None
    cap = min(x for x in (limit, spec.limit, 10**12) if x)
    base, seen = [], set()
    for where, row in rows:
        if any(_get(row, k) != v for k, v in spec.where.items()):
            continue
        rec = {}
        for f, col in columns.items():
            value = _field(row, col, spec.task, where)
            rec[f] = value if value is not None and value != "" else spec.defaults.get(f)   # 0 and False are values
            if rec[f] is None and f in REQUIRED[spec.kind]:
                raise InputError(f"{where}: missing field '{_name(col)}' (a {spec.kind} suite needs "
                                 f"{', '.join(_name(spec.columns.get(c, c)) for c in REQUIRED[spec.kind])})")
        text = rec["question"] if spec.kind == "utility" else rec["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: empty {'question' if spec.kind == 'utility' else 'prompt'}")
        has_label = rec["label"] is not None
        # a judge check's item is the answer: one prompt answered twice (HarmBench's methods and models) is two items
        key = text.strip() + ("\n" + str(rec["response"]).strip() if spec.kind == "judge_check" else "")
        item = {"id": str(rec["id"] if rec["id"] is not None else prompt_id(stem, key)), "suite": spec.name,
                "kind": spec.kind, "category": str(rec["category"] if rec["category"] is not None else "unknown"),
                "label": str(rec["label"]) if has_label else ("harmful" if spec.kind in ("harmful", "jailbreak") else "")}
        if item["id"] in seen:
            if rec["id"] is not None:
                raise InputError(f"{where}: duplicate id '{item['id']}'")
            continue  # the same text twice in a Hub set: evaluate it once
        seen.add(item["id"])
        if spec.kind == "overrefusal":
            lab = item["label"].lower()
            if lab not in SAFE_LABELS + UNSAFE_LABELS:
                raise InputError(f"{where}: label must be safe or unsafe, got {item['label']!r}")
            item["label"] = "safe" if lab in SAFE_LABELS else "unsafe"
        if spec.kind == "judge_check":
            if not isinstance(rec["response"], str):
                raise InputError(f"{where}: the response must be text")
            item.update(task=spec.task, label=gold_label(spec.task, rec["label"], where), prompt=text.strip(),
                        answer=rec["response"].strip(), reasoning="")
        elif spec.kind == "utility":
            choices = _choices(rec["choices"], where)
            letters = "ABCDEFGHIJ"[:len(choices)]
            item.update(question=text.strip(), choices=choices, answer_letter=_letter(rec["answer"], len(choices), where),
                        label="utility", prompt=question.chat(
                            question=text.strip(), subject=item["category"].replace("_", " "),
                            choices="\n".join(f"{l}. {c}" for l, c in zip(letters, choices)))[-1]["content"])
        else:
            item["prompt"] = text.strip()
        base.append(item)
        if len(seen) >= cap:
            break
    n = spec.sample or sample
    if n:
        base = draw(base, n, spec.seed if spec.seed is not None else seed)
    out = base
    if wraps:  # every variant of one forbidden prompt is one cluster for the bootstrap
        out = [{**it, "id": f"{it['id']}--{name}", "template": name, "forbidden_prompt": it["prompt"],
                "cluster": it["id"], "prompt": wrap(tpl, it["prompt"])} for it in base for name, tpl in wraps.items()]
    if not out:
        raise InputError(f"{spec.source}: suite '{spec.name}' has no items")
    return out


def source_text(item: dict) -> str:
    """The request an item was made from (no jailbreak wrapping, no MMLU formatting)."""
    return item.get("forbidden_prompt") or item.get("question") or item["prompt"]


# ---- contamination ----------------------------------------------------------------------------

def normal(text: str) -> str:
    """A prompt as contamination compares it: case and spacing do not make a new prompt."""
    return " ".join(text.lower().split())


def training_prompts(runs_dir: str | Path, runs) -> tuple[set[str], list[Path]]:
    """The normalised prompts that `runs` generated training data for (their stage 1 and 2
    records), and the files read, which the stage hashes as inputs: a rerun of stage 1 changes
    what is removed."""
    seen, files = set(), []
    for run in sorted(runs):
        for stage in ("01_generate", "02_refine"):
            path = Path(runs_dir) / run / stage / "records.jsonl"
            if path.is_file():
                seen |= {normal(r["prompt"]) for _, r in numbered_rows(path) if isinstance(r.get("prompt"), str)}
                files.append(path)
    return seen, files


def contaminated(item: dict, trained: set[str]) -> bool:
    """A model item made from a training prompt; judge checks grade judges, not models, and stay."""
    return item["kind"] != "judge_check" and normal(source_text(item)) in trained


def suite_info(items: list[dict], trained: set[str]) -> dict:
    """{suite: kind, items and prompts evaluated, train_overlap (its prompts among the training
    prompts), train_overlap_removed (its items left out of every rate for that)}, from every item
    loaded, before the contaminated ones are removed."""
    info = {}
    for it in items:
        d = info.setdefault(it["suite"], {"kind": it["kind"], "items": 0, "prompts": set(), "overlap": set(), "removed": 0})
        text = normal(source_text(it))
        if contaminated(it, trained):
            d["removed"] += 1
        else:
            d["items"] += 1
            d["prompts"].add(text)
        if text in trained:
            d["overlap"].add(text)
    return {name: {"kind": d["kind"], "items": d["items"], "prompts": len(d["prompts"]), "train_overlap": len(d["overlap"]),
                   "train_overlap_removed": d["removed"]} for name, d in info.items()}
