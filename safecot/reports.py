"""Stage 5's tables, figures and report: the papers' comparison table (rows: suite and metric;
columns: models such as base, SFT_OG, SFT_DB, DPO) with 95% bootstrap intervals, as Markdown,
CSV and a seaborn figure. Read by 05_eval.py and notebooks/05_eval.ipynb alike.

`results` below is the `models` part of a results.json: {model label: {suite: {metric: block}}},
a block as made by safecot.metrics.compute_metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["suite", "metric", "model", "value", "low", "high", "n", "missing", "truncated", "higher_is_better", "judge"]


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


def plot_intervals(frame: pd.DataFrame, path: Path | None = None, title: str = "Stage 5: metrics with 95% bootstrap intervals"):
    """A panel per suite/metric: each model's value with its interval. Returns the figure."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    frame = frame.dropna(subset=["value"]).copy()
    panels = list(dict.fromkeys(zip(frame["suite"], frame["metric"])))
    models = list(dict.fromkeys(frame["model"]))
    colours = dict(zip(models, sns.color_palette("colorblind", len(models))))
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (suite, metric) in zip(axes.flat, panels):
        part = frame[(frame["suite"] == suite) & (frame["metric"] == metric)]
        sns.pointplot(data=part, x="model", y="value", hue="model", order=models, hue_order=models,
                      palette=colours, linestyle="none", errorbar=None, legend=False, ax=ax)
        for r in part.itertuples():
            ax.errorbar([models.index(r.model)], [r.value], yerr=[[r.value - r.low], [r.high - r.value]],
                        fmt="none", ecolor=colours[r.model], capsize=4)
        ax.set_title(f"{suite}\n{metric} {'↑' if part['higher_is_better'].iloc[0] else '↓'}", fontsize=10)
        ax.set_xlabel(""); ax.set_ylabel("")
        ax.set_ylim(*((0.5, 5.5) if metric.startswith("cot_") else (-0.05, 1.05)))
        ax.tick_params(axis="x", rotation=30)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no metric has a value", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


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


def write_comparison(results: dict, out: Path, models_info: dict | None = None, title: str = "Stage 5 evaluation",
                     details: dict | None = None) -> Path:
    """table.md, table.csv (long, with intervals), by_category.csv, intervals.png and report.md
    in `out`; returns the report's path. `details` (results.json's suites, self_judged and the
    judge checks) adds their warnings and sections to the report."""
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
             "as safe. Jailbreak intervals resample forbidden prompts, not template variants.", ""]
    for task, labels in (details.get("self_judged") or {}).items():
        lines += [f"> **Warning: self-judged.** The {task} judge is the model under test ({', '.join(labels)}): it grades "
                  "its own answers (allowed by `eval.allow_self_judge`). Treat these numbers as biased.", ""]
    for suite, d in (details.get("suites") or {}).items():
        if d.get("train_overlap") and d.get("kind") != "judge_check":  # a judge check grades judges, not the model
            lines += [f"> **Warning: contamination.** {d['train_overlap']} of the {d['prompts']} prompts of suite "
                      f"`{suite}` are among this run's training prompts: its numbers overstate generalisation.", ""]
    cut = frame[frame["truncated"] > 0]
    if len(cut):
        lines += ["## Truncated answers", "", "Answers that ran out of tokens or stopped inside their reasoning are "
                  "left out of the rates, never counted as safe or as refusals (raise `max_new_tokens` in "
                  "`eval.generation`):", "", "| suite | metric | model | truncated | judged (n) |", "|---|---|---|---|---|"]
        lines += [f"| {r.suite} | {r.metric} | {r.model} | {r.truncated} | {r.n} |" for r in cut.itertuples()] + [""]
    if models_info:
        lines += ["## Models", "", "| label | model | adapter |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('model')} | {v.get('adapter') or '-'} |" for k, v in models_info.items()] + [""]
    judges = frame.drop_duplicates(["suite", "metric"])[["suite", "metric", "judge"]]
    lines += ["## Results", "", markdown(table), "", "![intervals](intervals.png)", "", "## Judges", "",
              "| suite | metric | judge |", "|---|---|---|"]
    lines += [f"| {r.suite} | {r.metric} | {r.judge} |" for r in judges.itertuples()]
    lines += [""] + template_lines(results) + judge_check_lines(details.get("judge_checks") or {})
    suites = details.get("suites") or {}
    if suites:
        lines += ["## Suites", "", "| suite | kind | items | prompts | in training prompts |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {d['kind']} | {d['items']} | {d['prompts']} | {d['train_overlap']} |" for k, d in suites.items()] + [""]
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
