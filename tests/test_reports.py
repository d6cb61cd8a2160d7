"""safecot/reports.py: the folder a notebook's RUN_DIR names (find_run_dir, used by every stage
notebook), the figures (units of the tables, axis labels, n on every point and bar, a mark for a
model with n = 0, a note on an empty panel) and report.md's Judges section. No model, no kernel:
figures are inspected as matplotlib objects."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safecot.reports import find_run_dir, long_frame, plot_by_category, plot_intervals, write_comparison  # noqa: E402


# ---- find_run_dir --------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository root with notebooks/ (the working directory, as in Jupyter) and one run."""
    run = tmp_path / "data" / "runs" / "r"
    for stage in ("01_generate", "02_refine", "05_eval"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({"stage": stage}))
    (run / "05_eval" / "compare").mkdir()
    (run / "05_eval" / "compare" / "manifest.json").write_text(json.dumps({"stage": "05_eval"}))
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    return tmp_path


@pytest.mark.parametrize("value, stage, expected", [
    ("data/runs/r", "02_refine", "data/runs/r/02_refine"),             # relative to the root, as `make demo` prints it
    ("../data/runs/r", "02_refine", "data/runs/r/02_refine"),          # relative to notebooks/
    ("ABS/data/runs/r", "02_refine", "data/runs/r/02_refine"),         # absolute
    ("data/runs/r/02_refine", "02_refine", "data/runs/r/02_refine"),   # the stage folder itself
    ("data/runs/r/01_generate", "02_refine", "data/runs/r/02_refine"),  # another stage folder names its run
    ("data/runs/r/05_eval/compare", "05_eval", "data/runs/r/05_eval/compare"),  # a comparison's folder
    ("data/runs/r", None, "data/runs/r"),                              # the run (notebook 03_04)
    ("../data/runs/r/02_refine", None, "data/runs/r"),
])
def test_find_run_dir_reads_every_form_and_prints_the_folder(repo, capsys, value, stage, expected):
    found = find_run_dir(value.replace("ABS", str(repo)), stage, root=repo)
    assert found == (repo / expected).resolve()
    assert capsys.readouterr().out.strip() == f"reading {found}"


def test_find_run_dir_says_once_that_a_missing_folder_is_missing(repo, capsys):
    assert find_run_dir("data/runs/nope", "01_generate", root=repo) is None
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("RUN_DIR='data/runs/nope' is not a folder")
    assert str(repo / "data" / "runs" / "nope") in out and str(repo / "notebooks" / "data" / "runs" / "nope") in out
    assert find_run_dir(repo / "elsewhere", root=repo) is None


def test_find_run_dir_names_a_stage_the_run_has_not_written_yet(repo, capsys):
    found = find_run_dir("data/runs/r", "03_sft", root=repo)
    assert found == (repo / "data/runs/r/03_sft").resolve() and not found.exists()
    assert "not written yet" in capsys.readouterr().out


# ---- figures -------------------------------------------------------------------------------------

def summary(value, n, truncated=0, missing=0) -> dict:
    if value is None:
        return {"value": None, "low": None, "high": None, "n": 0, "missing": missing, "truncated": truncated}
    return {"value": value, "low": value - 0.125, "high": value + 0.125, "n": n, "missing": missing, "truncated": truncated}


def block(overall, by_category, judge, higher=True) -> dict:
    return {"overall": overall, "higher_is_better": higher, "by_category": by_category, "judge": judge}


# base has values; DPO's harmful answers were all truncated (n = 0); nobody has an xstest value (an
# empty panel); DPO has no cot_quality block at all.
RESULTS = {
    "base": {"harmful": {"safe_rate": block(summary(0.5, 4), {"fraud": summary(0.25, 2), "weapons": summary(0.75, 2)},
                                            "refusal_detector")},
             "xstest": {"over_refusal_rate": block(summary(None, 0, truncated=2), {"homonyms": summary(None, 0, truncated=2)},
                                                   None, higher=False)},
             "cot_quality": {"cot_relevance": block(summary(3.5, 2), {"harmful": summary(3.5, 2)}, "llm:judge")}},
    "DPO": {"harmful": {"safe_rate": block(summary(None, 0, truncated=4), {"fraud": summary(None, 0, truncated=2),
                                                                           "weapons": summary(None, 0, truncated=2)}, None)},
            "xstest": {"over_refusal_rate": block(summary(None, 0, missing=2), {"homonyms": summary(None, 0, missing=2)},
                                                  None, higher=False)}},
}
JUDGES = {"safety": "refusal_detector", "refusal": "refusal_detector", "strongreject": "refusal_detector",
          "cot": "llm:judge", "choice": "choice_parser"}


def panels(fig) -> dict:
    """{title's first line or 'suite / metric': axes} of the panels that are drawn."""
    return {ax.get_title().replace("\n", " ").rstrip(" ↑↓"): ax for ax in fig.axes if ax.axison}


def texts(ax, gid=None, pattern=None) -> list:
    return [t for t in ax.texts if (gid is None or t.get_gid() == gid) and (pattern is None or re.search(pattern, t.get_text()))]


def test_intervals_figure_is_in_percent_with_n_marks_and_notes():
    fig = plot_intervals(long_frame(RESULTS))
    p = panels(fig)
    assert set(p) == {"harmful safe_rate", "xstest over_refusal_rate", "cot_quality cot_relevance"}
    for name, ax in p.items():
        assert ax.get_xlabel() == "model"
        assert ax.get_ylabel() == ("grade (1-5)" if "cot_" in name else "percent"), name
    harmful = p["harmful safe_rate"]
    assert harmful.get_ylim()[1] > 100 and [line.get_ydata()[0] for line in harmful.lines if line.get_marker() == "o"] == [50]
    assert [t.get_text() for t in texts(harmful, pattern=r"^n=\d+$")] == ["n=4"]
    (na,) = texts(harmful, gid="n/a")  # DPO: n = 0, marked at its own x position with why
    assert na.get_position()[0] == 1 and na.get_text().startswith("n/a") and "4 truncated" in na.get_text()
    assert not texts(harmful, gid="note")
    empty = p["xstest over_refusal_rate"]
    assert len(texts(empty, gid="n/a")) == 2
    (note,) = texts(empty, gid="note")
    assert "empty" in note.get_text() and "2 answers truncated" in note.get_text() and "2 without a verdict" in note.get_text()
    cot = p["cot_quality cot_relevance"]  # DPO has no CoT grades at all: still marked
    assert [t.get_text() for t in texts(cot, pattern=r"^n=")] == ["n=2"] and len(texts(cot, gid="n/a")) == 1
    plt.close(fig)


def test_per_category_figure_is_in_percent_with_n_marks_and_notes():
    fig = plot_by_category(long_frame(RESULTS, category=True))
    p = panels(fig)
    harmful, empty, cot = p["harmful / safe_rate"], p["xstest / over_refusal_rate"], p["cot_quality / cot_relevance"]
    for ax in (harmful, empty):
        assert ax.get_ylabel() == "category" and ax.get_xlabel().startswith("percent")
    assert cot.get_xlabel().startswith("grade (1-5)")
    assert sorted(bar.get_width() for bar in harmful.patches) == [25, 75]
    assert sorted(t.get_text() for t in texts(harmful, pattern=r"^ n=")) == [" n=2", " n=2"]
    assert sorted(t.get_text() for t in texts(harmful, gid="n/a")) == [" DPO: n/a (n=0, 2 truncated)"] * 2
    assert not texts(harmful, gid="note")
    assert len(texts(empty, gid="n/a")) == 2 and "empty" in texts(empty, gid="note")[0].get_text()
    plt.close(fig)


def test_figures_of_results_without_metrics_say_so():
    for plot in (plot_intervals, plot_by_category):
        fig = plot(long_frame({}, category=plot is plot_by_category))
        assert [t.get_text() for ax in fig.axes for t in texts(ax, gid="note")] == ["empty: these results hold no metric"]
        plt.close(fig)


# ---- report.md -----------------------------------------------------------------------------------

def judges_section(report: Path) -> str:
    text = report.read_text(encoding="utf-8")
    return text.split("## Judges", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("how", ["details", "results.json", "comparison"])
def test_report_names_the_judges_of_each_task(tmp_path, how):
    """05_eval.py writes results.json (with `judges`) before the report; a comparison of several
    runs has only the judges named in the verdicts."""
    if how == "results.json":
        (tmp_path / "results.json").write_text(json.dumps({"models": RESULTS, "judges": JUDGES}))
    details = {"judges": JUDGES} if how == "details" else {}
    section = judges_section(write_comparison(RESULTS, tmp_path, details=details))
    assert "nan" not in section.lower() and "None" not in section
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert "harmful / safe_rate" in rows["safety"] and "refusal_detector" in rows["safety"]
    assert "llm:judge" in rows["cot"] and "LLM" in rows["cot"]
    if how == "comparison":
        assert "not recorded" in rows["refusal"] and "choice" not in rows
    else:
        assert "refusal_detector | rule-based" in rows["refusal"] and "none (no answer judged)" in rows["refusal"]
        assert "choice_parser" in rows["choice"] and "strongreject" in rows
    plt.close("all")
