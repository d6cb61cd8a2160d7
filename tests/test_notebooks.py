"""The notebooks in notebooks/ run headless and are committed without outputs. The walkthrough
runs all five stages on the tiny recipe in a tmp folder and shows the stage notebooks' figures;
each stage notebook is then run on that complete run and must draw from real files.

Each notebook reads the run named by the environment variable RUN_DIR (its parameters cell);
the kernel inherits this process's environment, so setting os.environ before it starts is enough.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
WALKTHROUGH = NOTEBOOK_DIR / "00_walkthrough.ipynb"  # runs every stage itself: its own test below
STAGE_NOTEBOOKS = [p for p in NOTEBOOKS if p != WALKTHROUGH]
# The walkthrough's tiny run, kept small enough for ~2 minutes on 2 CPU cores: no 4-bit (slow on a
# CPU), 4 prompts, 8 new tokens, one belief round, 2 SFT and DPO steps, 2 rows per eval suite.
WALKTHROUGH_OVERRIDES = " ".join([
    "llm.load_in_4bit=false", "llm.max_new_tokens=8", "sft.load_in_4bit=false",
    "generate.limit=4", "generate.chunk_size=4", "generate.n_agents=2", "generate.max_rounds=1",
    "refine.limit=4", "refine.chunk_size=4", "refine.dedup_threshold=null",
    "refine.belief_candidates=1", "refine.belief_rounds=1", "refine.belief_probe=1",
    "sft.max_steps=2", "sft.max_length=128", "sft.batch_size=2",
    "dpo.max_steps=2", "dpo.max_length=128", "dpo.batch_size=2",
    "eval.limit=2", "eval.bootstrap_samples=100", "'eval.generation={temperature: 0.0, max_new_tokens: 8}'",
])
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def notebook_tiny_dir(tmp_path_factory):
    """Build the tiny model outside the repo, unless the caller already chose where it lives."""
    if os.environ.get("SAFECOT_TINY_DIR"):
        yield Path(os.environ["SAFECOT_TINY_DIR"])
        return
    path = tmp_path_factory.mktemp("tiny-model") / "tiny"
    os.environ["SAFECOT_TINY_DIR"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("SAFECOT_TINY_DIR", None)


@pytest.fixture(scope="module")
def walkthrough(notebook_tiny_dir, tmp_path_factory):
    """notebooks/00_walkthrough.ipynb executed on the tiny recipe: it runs the five stage scripts
    as subprocesses into a tmp runs folder and shows the stage notebooks' figures. Returns the
    executed notebook and the run folder, which the stage notebooks' own tests then read."""
    runs = tmp_path_factory.mktemp("walkthrough") / "runs"
    env = {"WALKTHROUGH_RECIPE": "tiny", "WALKTHROUGH_RUNS_DIR": str(runs), "WALKTHROUGH_OVERRIDES": WALKTHROUGH_OVERRIDES}
    saved = {k: os.environ.get(k) for k in [*env, "RUN_DIR"]}
    os.environ.update(env)
    try:
        nb = nbformat.read(WALKTHROUGH, as_version=4)
        NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return nb, runs / "tiny"


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def texts(nb) -> str:
    """Everything the notebook printed or displayed as text."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + "".join(v for k, v in o.get("data", {}).items() if k.startswith("text/")))
    return "\n".join(out)


@pytest.mark.slow
def test_walkthrough_runs_every_stage_and_shows_the_stage_notebooks_figures(walkthrough):
    nb, run = walkthrough
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = texts(nb)
    for stage_nb in ("01_generate", "02_refine", "03_04_training", "05_eval"):
        shown = re.search(rf"(\d+) figures from notebooks/{stage_nb}.ipynb", printed)
        assert shown and int(shown[1]) > 0, f"the walkthrough showed no figure of {stage_nb}.ipynb"
    for stage in ("01_generate", "02_refine", "03_sft", "04_dpo", "05_eval"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    assert (run / "05_eval" / "table.md").is_file() and (run / "05_eval" / "intervals.png").is_file()


# Notes a stage notebook shows when the stage it draws has not run: on the walkthrough's complete
# run none may appear, so each figure is drawn from real files, not a placeholder.
MISSING_STAGE_NOTES = ["No stage-", "**Note:** no `", "no logged steps yet", "no records to show",
                       "no results to tabulate", "no samples to show", "no manifest.json"]


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_runs_headless_on_a_complete_run(path, walkthrough, monkeypatch):
    _, run = walkthrough
    monkeypatch.setenv("RUN_DIR", str(run))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in outputs), f"{path.name} drew no figure"
    printed = texts(nb)
    assert not [n for n in MISSING_STAGE_NOTES if n in printed], printed[:2000]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel is not python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {i} has outputs committed"
        assert cell.execution_count is None, f"{path.name} cell {i} has an execution count committed"
