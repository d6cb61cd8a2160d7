"""A paper's main table from stage 5's results: data/papers/<paper>.yaml names its columns (a
benchmark = one suite and metric of results.json) and the figures the paper reports; the arms are
the recipe's `experiment.arms` (safecot/experiments.py).

paper_table.md and paper_table.csv, in 05_eval/: one row per arm (and per inference-time setting
when stage 5 ran several, `eval.policy_prompt`), one column per benchmark, each cell our value in
percent (or a 0-1 score) with its 95% interval and n, and the paper's figure beside it where
METHOD.md has one. A cell with no judged answer says why (`n/a`, with the truncated count) rather
than showing a number. AIDSAFE's CoT-quality table (single-LLM baseline vs AIDSAFE, graded by the
same grader in stage 2: 02_refine/cot_quality.json) follows when the paper file has one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from .grading import CRITERIA
from .records import InputError, read_text

PAPERS = Path(__file__).resolve().parent.parent / "data" / "papers"


def load_paper(name: str) -> dict:
    path = PAPERS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PAPERS.glob("*.yaml")))
        raise InputError(f"experiment.paper: no {path} (known: {known})")
    paper = yaml.safe_load(read_text(path)) or {}
    for i, col in enumerate(paper.get("columns") or []):
        if not {"name", "suite", "metric"} <= set(col):
            raise InputError(f"{path}: columns[{i}] needs name, suite and metric")
    for model, rows in (paper.get("reported") or {}).items():
        for arm, values in rows.items():
            if len(values) != len(paper["columns"]):
                raise InputError(f"{path}: reported.{model}.{arm} has {len(values)} figures for {len(paper['columns'])} columns")
    return paper


def cell(block: dict | None, col: dict) -> dict:
    """One benchmark's value in the table's unit: {value, low, high, n, truncated}, value None when
    no answer was judged (or the suite was not run)."""
    if not block:
        return {"value": None, "low": None, "high": None, "n": 0, "truncated": 0, "why": "not run"}
    o = block.get("overall") or {}
    scale = 1.0 if col.get("unit") == "score" else 100.0
    value, low, high = (None if o.get(k) is None else o[k] * scale for k in ("value", "low", "high"))
    if col.get("invert") and value is not None:  # e.g. XSTest accuracy = 100 - over-refusal
        value, low, high = scale - value, None if high is None else scale - high, None if low is None else scale - low
    return {"value": value, "low": low, "high": high, "n": o.get("n", 0), "truncated": o.get("truncated", 0),
            "why": None if value is not None else "no judged answer"}


def _text(c: dict, paper: float | None, unit: str | None) -> str:
    if c["value"] is None:
        why = c["why"] + (f", {c['truncated']} truncated" if c.get("truncated") else "")
        shown = f"n/a ({why})"
    else:
        fmt = ".3f" if unit == "score" else ".1f"
        interval = f" [{c['low']:{fmt}}, {c['high']:{fmt}}]" if c["low"] is not None else ""
        shown = f"{c['value']:{fmt}}{interval} n={c['n']}"
    return shown + (f" (paper {paper:.2f})" if paper is not None else "")


def rows_of(results: dict, exp, paper: dict, suites: dict) -> list[dict]:
    """[{arm, setting, cells: {column: cell}}] for every arm under every setting stage 5 ran."""
    settings = results.get("settings") or {"none": {"models": results.get("models", {})}}
    out = []
    for setting, block in settings.items():
        for arm in exp.arms:
            metrics = (block.get("models") or {}).get(arm.arm)
            cells = {}
            for col in paper["columns"]:
                suite = suites.get(col["name"], col["suite"])
                found = ((metrics or {}).get(suite) or {}).get(col["metric"]) if suite else None
                cells[col["name"]] = cell(found, col)
                if metrics is None:
                    cells[col["name"]]["why"] = "arm not evaluated"
            out.append({"arm": arm.arm, "setting": setting, "cells": cells})
    return out


def write_paper_table(out: Path, exp, recipe: dict) -> Path:
    """05_eval/paper_table.md and .csv (and paper_cot_quality.csv for AIDSAFE) from 05_eval/results.json."""
    out = Path(out)
    results_path = out / "results.json"
    if not results_path.is_file():
        raise InputError(f"{out}: no results.json; run stage 5 of this run first")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    paper = load_paper(exp.paper)
    suites = dict(exp.suites)
    reported = (paper.get("reported") or {}).get(exp.reported) if exp.reported else None
    if exp.reported and reported is None:
        raise InputError(f"experiment.reported: the {exp.paper} paper file has no figures for '{exp.reported}' "
                         f"(it has: {', '.join(paper.get('reported') or {}) or 'none'})")
    rows = rows_of(results, exp, paper, suites)
    names = [c["name"] for c in paper["columns"]]
    several = len({r["setting"] for r in rows}) > 1

    def paper_value(arm: str, i: int) -> float | None:
        return (reported or {}).get(arm, [None] * len(names))[i] if reported else None

    lines = [f"# {paper['title']}", "", f"Run `{results.get('run_name')}`; "
             f"{'figures of ' + exp.reported + ' from the paper beside ours' if reported else 'no published figures to compare'}."
             " Rates in percent with 95% bootstrap intervals and n, the answers judged; truncated answers are "
             "out of the rates (their counts are in results.json and report.md).", ""]
    head = ["arm", *(["setting"] if several else []), *names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_text(r["cells"][n], paper_value(r["arm"], i), paper["columns"][i].get("unit")) for i, n in enumerate(names)]
        lines.append("| " + " | ".join([r["arm"], *([r["setting"]] if several else []), *cells]) + " |")
    lines += ["", "## How each arm was made", ""]
    for a in exp.arms:
        made = f"run `{recipe['run_name']}-{a.run}`, stages {', '.join(a.stages)}" if a.run else f"run `{recipe['run_name']}`"
        what = f"the adapter of {a.model}" if a.model else "the model as it is"
        extra = f"; overrides: {', '.join(f'`{o}`' for o in a.overrides)}" if a.overrides else ""
        lines.append(f"- **{a.arm}**: {what}, {made}{extra}")
    cot = cot_quality_lines(out.parent / "02_refine" / "cot_quality.json", paper)
    if cot:
        lines += ["", *cot]
    md = out / "paper_table.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with (out / "paper_table.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["arm", "setting", *[f"{n}{s}" for n in names for s in ("", "_low", "_high", "_n", "_truncated", "_paper")]])
        for r in rows:
            row = [r["arm"], r["setting"]]
            for i, n in enumerate(names):
                c = r["cells"][n]
                row += [c["value"], c["low"], c["high"], c["n"], c["truncated"], paper_value(r["arm"], i)]
            w.writerow(row)
    return md


def cot_quality_lines(path: Path, paper: dict) -> list[str]:
    """AIDSAFE's CoT-quality table from stage 2's cot_quality.json (the single-LLM baseline and the
    AIDSAFE CoT of the same records, graded by the same grader), the paper's figures beside."""
    reported = paper.get("cot_quality")
    if not reported:
        return []
    if not path.is_file():
        return ["## CoT quality", "", f"n/a: no {path} (stage 2 writes it with `refine.grade_baseline: true`)"]
    data = json.loads(path.read_text(encoding="utf-8"))
    lines = ["## CoT quality (1-5, stage 2's grader)", "",
             f"Grader: `{data.get('grader', 'unknown')}`; the same records graded twice (n = records with both grades).", "",
             "| criterion | single-LLM baseline | AIDSAFE | paper baseline | paper AIDSAFE |", "|---|---|---|---|---|"]
    for i, crit in enumerate(CRITERIA):
        ours = []
        for arm in ("baseline", "aidsafe"):
            s = ((data.get(arm) or {}).get(crit)) or {}
            ours.append(f"{s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}] n={s.get('n', 0)}"
                        if s.get("value") is not None and s.get("low") is not None else f"n/a (n={s.get('n', 0)})")
        lines.append(f"| {crit} | {ours[0]} | {ours[1]} | {reported['baseline'][i]:.2f} | {reported['aidsafe'][i]:.2f} |")
    return lines
