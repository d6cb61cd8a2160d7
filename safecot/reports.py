"""Stage 5's tables, figures and report: the papers' comparison table (rows: suite and metric;
columns: models such as base, SFT_OG, SFT_DB, DPO) with 95% bootstrap intervals, as Markdown,
CSV and seaborn figures, and the one place the notebooks find the run they draw
(`find_run_dir`). Read by 05_eval.py and the notebooks in notebooks/ alike.

`results` below is the `models` part of a results.json: {model label: {suite: {metric: block}}},
a block as made by safecot.metrics.compute_metrics. Figures use the table's units: rates and
scores in percent, CoT grades on their 1-5 scale; every point or bar says its n, a model with
n = 0 gets an `n/a` mark where its value would be, and an empty panel says why it is empty.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from .judges import as_protocol, judge_name
from .metrics import COT_METRICS, METRICS, REASONING_METRICS, SAMPLE_METRICS, STRICT
from .records import STAGES

ROOT = Path(__file__).resolve().parent.parent  # the repository root
COLUMNS = ["suite", "metric", "model", "value", "low", "high", "n", "missing", "truncated", "higher_is_better", "judge"]
TASK_OF = {name: m.task for ms in [*METRICS.values(), COT_METRICS] for m in ms
           for name in (m.name, m.name + STRICT)}  # metric (and its strict form) -> the judge task it reads
# the reasoning and K-sample rates are all the safety judge's verdicts (on the thoughts too)
TASK_OF.update({name: "safety" for m in [*REASONING_METRICS, *SAMPLE_METRICS] for name in (m.name, m.name + STRICT)})


# ---- the run a notebook reads ------------------------------------------------------------------

def stage_of(folder: Path) -> str | None:
    """The stage a folder holds (its manifest's `stage`, else a stage name such as 02_refine), or None."""
    try:
        stage = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    return stage if stage in STAGES else folder.name if folder.name in STAGES else None


def find_run_dir(value, stage: str | None = None, root: Path = ROOT) -> Path | None:
    """The folder a notebook's RUN_DIR names: the run folder, or with `stage` that stage's folder
    of the run. RUN_DIR is absolute, or relative to the working directory, the repository root
    (`data/runs/tiny`, as `make demo` prints it) or notebooks/ (`../data/runs/tiny`); a stage
    folder (`data/runs/tiny/02_refine`, or a 05_eval/compare folder) names its run. Prints the
    folder it returns; when RUN_DIR names no folder, prints one line saying so and returns None."""
    path = Path(str(value)).expanduser()
    tried = [path] if path.is_absolute() else [Path.cwd() / path, root / path, root / "notebooks" / path]
    found = next((p.resolve() for p in tried if p.is_dir()), None)
    if found is None:
        looked = ", ".join(dict.fromkeys(str(p.resolve()) for p in tried))
        print(f"RUN_DIR={str(value)!r} is not a folder (looked for {looked}): nothing to draw. Set RUN_DIR to a run "
              "folder such as data/runs/tiny (relative to the repository root or to notebooks/, or absolute) "
              "after its stages ran, e.g. with `make demo`.")
        return None
    own = stage_of(found)
    folder = found if own and own == stage else (found.parent if own else found) / (stage or "")
    print(f"reading {folder}" + ("" if folder.is_dir() else f" (not written yet: this run has no {stage}/)"))
    return folder


# ---- tables --------------------------------------------------------------------------------------

def long_frame(results: dict, category: bool = False) -> pd.DataFrame:
    """One row per (suite, metric, model[, category]) with value, interval, n, missing, truncated, judge."""
    rows = []
    for model, suites in results.items():
        for suite, metrics in suites.items():
            for metric, block in metrics.items():
                parts = block["by_category"].items() if category else [(None, block["overall"])]
                for cat, s in parts:
                    rows.append({"suite": suite, "metric": metric, "model": model, **({"category": cat} if category else {}),
                                 **{k: s[k] for k in ("value", "low", "high", "n", "missing")},
                                 "truncated": s.get("truncated", 0),  # results written before the count existed
                                 "higher_is_better": block["higher_is_better"], "judge": block["judge"]})
    cols = COLUMNS[:3] + (["category"] if category else []) + COLUMNS[3:]
    return pd.DataFrame(rows, columns=cols)


def cell(value, low, high, percent: bool = True, n=None) -> str:
    """`value [low, high] (n=N)`; n/a without a value."""
    size = "" if n is None or pd.isna(n) else f" (n={int(n)})"
    if value is None or pd.isna(value):
        return "n/a" + size
    f = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.2f}")
    return f"{f(value)} [{f(low)}, {f(high)}]{size}"


def wide_table(frame: pd.DataFrame, models: list[str] | None = None) -> pd.DataFrame:
    """The paper-style table: a row per suite/metric, a column per model, cells `value [low, high] (n=N)`
    (rates and scores in percent, CoT grades on their 1-5 scale; n = judged samples)."""
    models = models or list(dict.fromkeys(frame["model"]))
    frame = frame.assign(text=[cell(r.value, r.low, r.high, not r.metric.startswith("cot_"), r.n) for r in frame.itertuples()])
    table = frame.pivot_table(index=["suite", "metric"], columns="model", values="text", aggfunc="first", sort=False)
    table = table.reindex(columns=[m for m in models if m in table.columns]).fillna("n/a")
    arrows = frame.drop_duplicates(["suite", "metric"]).set_index(["suite", "metric"])["higher_is_better"]
    table.index = [f"{s} / {m} {'↑' if arrows[(s, m)] else '↓'}" for s, m in table.index]
    table.index.name = "suite / metric"
    return table


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no tabulate needed)."""
    head = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(i)] + [str(v) for v in row]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines)


def judge_kind(name) -> str:
    """A recorded judge name's kind: `llm:<model>` is an LLM judge; a detector or parser is rule-based."""
    return "none" if not name else "LLM" if str(name).startswith("llm:") else "rule-based"


def judge_table(results: dict, judges: dict | None = None) -> pd.DataFrame:
    """A row per judge task: the judge stage 5 ran for it (`judges`, results.json's {task: name},
    with its kind), the suite / metrics it scores, and the judges named in those metrics' verdicts
    (`none` when no answer was judged, e.g. every one truncated). Without `judges` (a comparison
    of several runs' results) the judge column names the judges of the verdicts."""
    if judges is not None:  # results.json holds a protocol per task (a name alone in older runs)
        judges = {task: judge_name(entry) for task, entry in judges.items()}
    scored: dict[str, dict] = {}
    seen: dict[str, dict] = {}
    for suites in results.values():
        for suite, metrics in suites.items():
            for metric, block in metrics.items():
                task = TASK_OF.get(metric, "?")
                scored.setdefault(task, {})[f"{suite} / {metric}"] = None
                names = [j.strip() for j in (block.get("judge") or "").split(",") if j.strip()]
                seen.setdefault(task, {}).update(dict.fromkeys(names))
    rows = []
    for task in dict.fromkeys([*(judges or {}), *scored]):
        verdicts = ", ".join(seen.get(task) or {})
        name = judges.get(task) if judges is not None else verdicts or None
        rows.append({"task": task, "judge": name or ("none" if judges is not None else "not recorded"), "kind": judge_kind(name),
                     "metrics": ", ".join(scored.get(task) or {}) or "-",
                     "verdicts by": verdicts or ("none (no answer judged)" if task in scored else "-")})
    return pd.DataFrame(rows, columns=["task", "judge", "kind", "metrics", "verdicts by"]).set_index("task")


# ---- figures -------------------------------------------------------------------------------------

def _pyplot(path):
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _scale(metric: str) -> tuple[float, str, tuple[float, float]]:
    """(factor, axis label, axis limits) of a metric in the table's units: percent, or CoT grades 1-5."""
    return (1.0, "grade (1-5)", (0.5, 5.5)) if metric.startswith("cot_") else (100.0, "percent", (-5.0, 105.0))


def _not_available(row, one_line: bool = False) -> str:
    """The mark of a model without a value (n = 0) and why: its truncated answers and missing verdicts."""
    why = [] if row is None else [f"{int(row[k])} {w}" for k, w in (("truncated", "truncated"), ("missing", "no verdict")) if row[k]]
    return f"n/a (n=0{''.join(', ' + w for w in why)})" if one_line else "\n".join(["n/a", "n=0", *why])


def _empty_note(part: pd.DataFrame) -> str:
    """Why a panel has no value at all."""
    cut, missing = int(part["truncated"].sum()), int(part["missing"].sum())
    why = ", ".join(w for w in (f"{cut} answers truncated" if cut else "", f"{missing} without a verdict" if missing else "") if w)
    return f"empty: no judged answer\n({why})" if why else "empty: no answer to judge"


def _note(ax, text: str, x: float = 0.5, y: float = 0.5):
    """A note on a panel (why it is empty), in axes coordinates; tests find it by its gid."""
    return ax.text(x, y, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="dimgrey",
                   gid="note", bbox={"boxstyle": "round", "fc": "white", "ec": "lightgrey"})


def _finish(fig, plt, path, top: float = 1.0):
    fig.tight_layout(rect=(0, 0, 1, top))
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_intervals(frame: pd.DataFrame, path: Path | None = None, title: str = "Stage 5: metrics with 95% bootstrap intervals"):
    """A panel per suite/metric: each model's value (percent; CoT grades 1-5) with its interval and
    n; `n/a` where a model has none, and a note on a panel where no model has one. Returns the figure."""
    plt, sns = _pyplot(path)
    panels = list(dict.fromkeys(zip(frame["suite"], frame["metric"])))
    models = list(dict.fromkeys(frame["model"]))
    colours = dict(zip(models, sns.color_palette("colorblind", len(models))))
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (suite, metric) in zip(axes.flat, panels):
        part = frame[(frame["suite"] == suite) & (frame["metric"] == metric)]
        factor, label, limits = _scale(metric)
        for x, model in enumerate(models):
            rows = part[part["model"] == model]
            r = rows.iloc[0] if len(rows) else None
            if r is None or pd.isna(r["value"]):
                ax.text(x, sum(limits) / 2, _not_available(r), ha="center", va="center", fontsize=7, color="dimgrey", gid="n/a")
                continue
            v = factor * r["value"]
            if not pd.isna(r["low"]):
                ax.errorbar([x], [v], yerr=[[v - factor * r["low"]], [factor * r["high"] - v]], fmt="none",
                            ecolor=colours[model], capsize=4)
            ax.plot([x], [v], "o", color=colours[model])
            ax.annotate(f"n={int(r['n'])}", (x, v), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set(xlim=(-0.6, len(models) - 0.4), ylim=limits, xlabel="model", ylabel=label)
        arrow = "↑" if part["higher_is_better"].iloc[0] else "↓"
        ax.set_title(f"{suite}\n{metric} {arrow}", fontsize=10)
        if part["value"].isna().all():
            _note(ax, _empty_note(part), y=0.85)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        _note(axes.flat[0], "empty: these results hold no metric")
        axes.flat[0].set(xticks=[], yticks=[])
    fig.suptitle(title, fontsize=11)
    return _finish(fig, plt, path)


def plot_by_category(frame: pd.DataFrame, path: Path | None = None, title: str = "Stage 5: metrics per category"):
    """`frame` from long_frame(results, category=True): a panel per suite/metric, a bar per
    category and model (percent; CoT grades 1-5) with its 95% interval and n; `n/a` where a model
    has no value, and a note on a panel where none has one. Returns the figure."""
    from matplotlib.patches import Patch
    plt, sns = _pyplot(path)
    panels = list(dict.fromkeys(zip(frame["suite"], frame["metric"])))
    models = list(dict.fromkeys(frame["model"]))
    colours = dict(zip(models, sns.color_palette("colorblind", len(models))))
    bars = [frame[(frame["suite"] == s) & (frame["metric"] == m)]["category"].nunique() * len(models) for s, m in panels]
    heights = [max(2.0, 0.8 + 0.18 * b) for b in bars] or [2.0]  # inches per panel: room for each bar's n
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 0.6 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    height = 0.8 / max(len(models), 1)
    for ax, (suite, metric) in zip(axes.flat, panels):
        part = frame[(frame["suite"] == suite) & (frame["metric"] == metric)]
        categories = list(dict.fromkeys(part["category"]))
        factor, label, limits = _scale(metric)
        for j, category in enumerate(categories):
            for k, model in enumerate(models):
                y = j - 0.4 + height * (k + 0.5)
                rows = part[(part["category"] == category) & (part["model"] == model)]
                r = rows.iloc[0] if len(rows) else None
                if r is None or pd.isna(r["value"]):
                    ax.text(0, y, f" {model}: {_not_available(r, one_line=True)}", va="center", fontsize=7, color="dimgrey", gid="n/a")
                    continue
                v, end = factor * r["value"], factor * r["value"]
                ax.barh(y, v, height=height, color=colours[model])
                if not pd.isna(r["low"]):
                    ax.plot([factor * r["low"], factor * r["high"]], [y, y], color="black", lw=1)
                    end = max(v, factor * r["high"])
                ax.text(end, y, f" n={int(r['n'])}", va="center", fontsize=7)
        ax.set_yticks(range(len(categories)), categories)
        ax.set_xticks(range(1, 6) if metric.startswith("cot_") else range(0, 101, 20))
        ax.set(ylim=(len(categories) - 0.5, -0.5), xlim=(0, limits[1] * 1.15), ylabel="category",
               xlabel=f"{label} (bar: value, line: 95% interval)")
        arrow = "↑" if part["higher_is_better"].iloc[0] else "↓"
        ax.set_title(f"{suite} / {metric} {arrow}", fontsize=10)
        if part["value"].isna().all():
            _note(ax, _empty_note(part), x=0.7)
    if not panels:
        _note(axes.flat[0], "empty: these results hold no metric")
        axes.flat[0].set(xticks=[], yticks=[])
    elif models:
        fig.legend(handles=[Patch(color=colours[m], label=m) for m in models], loc="upper right", ncol=len(models), fontsize=8)
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    return _finish(fig, plt, path, top=1 - 0.5 / fig.get_figheight())


def template_lines(results: dict) -> list[str]:
    """The jailbreak metrics per template, a row per (suite, metric, template), a column per model."""
    rows = {}
    for model, suites in results.items():
        for suite, metrics in suites.items():
            for metric, block in metrics.items():
                for tpl, s in (block.get("by_template") or {}).items():
                    rows.setdefault((suite, metric, tpl), {})[model] = cell(
                        s["value"], s["low"], s["high"], not metric.startswith("cot_"), s["n"])
    if not rows:
        return []
    models = list(results)
    lines = ["## Jailbreak templates", "", "Each template's share of the forbidden prompts (intervals by prompt).", "",
             "| suite / metric | template | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    lines += [f"| {s} / {m} | {t} | " + " | ".join(v.get(x, "n/a") for x in models) + " |" for (s, m, t), v in rows.items()]
    return lines + [""]


def judge_check_lines(checks: dict) -> list[str]:
    """How far each judge agrees with people's labels (stage 5's judge_check suites)."""
    if not checks:
        return []
    lines = ["## Judge checks", "", "Each judge against gold labels written by people; the positive class is the "
             "task's (refused, unsafe, jailbroken). A missing verdict counts as a disagreement.", "",
             "| suite | task | judge | agreement | precision | recall | class agreement | missing |", "|---|---|---|---|---|---|---|---|"]
    for suite, c in checks.items():
        for judge, r in c["judges"].items():
            fmt = [cell(r[k]["value"], r[k]["low"], r[k]["high"], True, r[k]["n"]) if r.get(k) else "-"
                   for k in ("agreement", "precision", "recall", "class_agreement")]
            lines.append(f"| {suite} | {c['task']} | {judge} | " + " | ".join(fmt) + f" | {r['missing']} |")
    return lines + ["", "Confusion counts and agreement per category: `judge_checks.json`.", ""]


def protocol_lines(judges: dict | None, standard: dict | None) -> list[str]:
    """The "Judges and protocol" section: per task, what decides whether another run's numbers may
    sit beside these (`eval.compare` checks the same fields). An older results.json recorded the
    judge's name alone: its protocol is `not recorded`."""
    if not judges:
        return []
    lines = ["## Judges and protocol", "", "Numbers are comparable only under the same judge and protocol: the judge's "
             "model, its template as sent (sha256 of the system and user parts), its decoding and the judging policies "
             "(sha256 of the text it reads). `eval.compare` refuses runs that differ in any of them.", ""]
    if standard:
        lines += [f"Judging policies: `{standard['path']}` (file sha256 {standard['sha256']}).", ""]
    lines += ["| task | kind | judge | model | template | template sha256 | decoding | policies sha256 |",
              "|---|---|---|---|---|---|---|---|"]
    for task, entry in judges.items():
        p = as_protocol(entry)
        if p["kind"] is None:
            lines.append(f"| {task} | not recorded | {p['name']} | not recorded | not recorded | - | - | - |")
            continue
        model = f"{p['model']}@{p['revision']}" if p["revision"] else p["model"]
        decoding = ", ".join(f"{k}={v}" for k, v in (p["decoding"] or {}).items())
        cells = [p["kind"], p["name"], model, p["template"], (p["template_sha256"] or "")[:12], decoding,
                 (p["policies_sha256"] or "")[:12]]
        lines.append(f"| {task} | " + " | ".join(str(c) if c else "-" for c in cells) + " |")
    return lines + [""]


def run_judges(results: dict, out: Path, details: dict) -> dict | None:
    """{task: judge protocol (a name in older runs)} as stage 5 ran them: `details["judges"]`, else the `judges` of the
    results.json that 05_eval.py writes into `out` just before the report (if it holds these
    results); None for a comparison of several runs, whose judges only their verdicts name."""
    if details.get("judges") is not None:
        return details["judges"]
    path = out / "results.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return saved.get("judges") if saved.get("models") == results else None


def write_comparison(results: dict, out: Path, models_info: dict | None = None, title: str = "Stage 5 evaluation",
                     details: dict | None = None) -> Path:
    """table.md, table.csv (long, with intervals), by_category.csv, intervals.png and report.md
    in `out`; returns the report's path. `details` (results.json's suites, self_judged, judges,
    judge_policies and settings, the judge checks; a comparison's mixed_standards) adds their
    warnings and sections to the report."""
    details = details or {}
    out.mkdir(parents=True, exist_ok=True)
    frame = long_frame(results)
    frame.to_csv(out / "table.csv", index=False)
    long_frame(results, category=True).to_csv(out / "by_category.csv", index=False)
    table = wide_table(frame, list(results))
    (out / "table.md").write_text(markdown(table) + "\n", encoding="utf-8")
    plot_intervals(frame, out / "intervals.png")
    lines = [f"# {title}", "", "Values in percent (CoT grades on 1-5) with 95% percentile-bootstrap intervals and n, "
             "the samples judged; ↑ higher is better, ↓ lower is better. Missing verdicts are left out, never counted "
             "as safe. Jailbreak intervals resample forbidden prompts, not template variants. A `_strict` metric counts "
             "truncated answers as failures (not safe, a refusal of a safe prompt, wrong, fully jailbroken) instead of "
             "leaving them out.", ""]
    if details.get("mixed_standards"):
        lines += [f"> **Warning: mixed judging standards.** These runs were judged differently ({details['mixed_standards']}; "
                  "allowed by `eval.compare_mixed`): their numbers are not comparable side by side.", ""]
    for task, labels in (details.get("self_judged") or {}).items():
        lines += [f"> **Warning: self-judged.** The {task} judge is the model under test ({', '.join(labels)}): it grades "
                  "its own answers (allowed by `eval.allow_self_judge`). Treat these numbers as biased.", ""]
    for suite, d in (details.get("suites") or {}).items():
        if d.get("train_overlap_removed"):
            lines += [f"> **Contamination removed.** {d['train_overlap_removed']} items of suite `{suite}` ({d['train_overlap']} "
                      f"prompts) are among this run's training prompts and are left out of every rate; {d['items']} "
                      "items evaluated.", ""]
    cut = frame[(frame["truncated"] > 0) & ~frame["metric"].str.endswith(STRICT)]
    if len(cut):
        lines += ["## Truncated answers", "", "Answers that ran out of tokens or stopped inside their reasoning are "
                  "left out of the rates, never counted as safe or as refusals, and counted as failures in the `_strict` "
                  "rates (raise `max_new_tokens` in `eval.generation`):", "",
                  "| suite | metric | model | truncated | judged (n) |", "|---|---|---|---|---|"]
        lines += [f"| {r.suite} | {r.metric} | {r.model} | {r.truncated} | {r.n} |" for r in cut.itertuples()] + [""]
    settings = details.get("settings") or {}
    if len(settings) > 1:
        lines += ["## Inference-time settings", "", "Every model answered every prompt under each setting (a column "
                  "`<label> @ <setting>`): `none` shows no policies; a policy file is shown in the system turn of "
                  "`reason_over_policies.txt`, as GRPO trains with it.", "", "| setting | policies in the prompt |", "|---|---|"]
        lines += [f"| {name} | {path or '-'} |" for name, path in settings.items()] + [""]
    if models_info:
        lines += ["## Models", "", "| label | model | adapter |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('model')} | {v.get('adapter') or '-'} |" for k, v in models_info.items()] + [""]
    standard = details.get("judge_policies")
    lines += ["## Results", "", markdown(table), "", "![intervals](intervals.png)", "", "## Judges", "",
              "The judge of each task as stage 5 ran it (kind: rule-based or LLM), the metrics it scores, and the "
              "judges named in those metrics' verdicts (`samples.jsonl` names the judge of every verdict; none: no "
              "answer was judged).", ""]
    if standard:
        lines += [f"The judging standard: LLM judges read the policies of `{standard['path']}` (sha256 {standard['sha256']}; "
                  "`eval.judge_policies`), whatever policies the models trained with; rule-based judges read none.", ""]
    judges = run_judges(results, out, details)
    lines += [markdown(judge_table(results, judges)), ""]
    lines += protocol_lines(judges, standard)
    lines += template_lines(results) + judge_check_lines(details.get("judge_checks") or {})
    suites = details.get("suites") or {}
    if suites:
        lines += ["## Suites", "", "Items and prompts evaluated; prompts among the run's training prompts, and the items "
                  "removed for that (a judge check's labelled answers grade judges and are kept).", "",
                  "| suite | kind | items | prompts | in training prompts | items removed |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {d['kind']} | {d['items']} | {d['prompts']} | {d['train_overlap']} | {d.get('train_overlap_removed', 0)} |"
                  for k, d in suites.items()] + [""]
    lines += ["Per-category values: `by_category.csv`; every sample and verdict: `samples.jsonl`.", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def load_results(folder: str | Path) -> dict:
    """results.json of a 05_eval folder (or of a run folder holding 05_eval/)."""
    from .records import InputError
    folder = Path(folder)
    path = folder / "results.json" if (folder / "results.json").exists() else folder / "05_eval" / "results.json"
    if not path.exists():
        raise InputError(f"{folder}: no results.json (run 05_eval.py for that run first)")
    return json.loads(path.read_text(encoding="utf-8"))
