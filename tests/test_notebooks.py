"""The notebooks in notebooks/ run headless on a real (tiny) stage-1 and stage-2 run (the walkthrough
runs all five stages itself, on the tiny recipe in a tmp folder), and are
committed without outputs.

Each notebook reads the run named by the environment variable RUN_DIR (its parameters cell);
the kernel inherits this process's environment, so setting os.environ before it starts is enough.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
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


def _load_stage(filename: str, name: str):
    """Import a stage script (its file name starts with a digit, so no plain import)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


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
def stage1_run(notebook_tiny_dir, tmp_path_factory) -> Path:
    """A small stage-1 and stage-2 run of the tiny recipe, made in-process; returns the run folder
    (<runs_dir>/<run_name>, which holds 01_generate/ and 02_refine/)."""
    from safecot.backends import release_backends
    from safecot.config import load_recipe, section_config

    module = _load_stage("01_generate.py", "notebook_stage_01_generate")
    runs_dir = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", [
        f"runs_dir={runs_dir}", "generate.limit=6", "generate.chunk_size=6", "llm.max_new_tokens=16"])
    cfg = section_config(recipe, "generate", module.Config)
    refine = _load_stage("02_refine.py", "notebook_stage_02_refine")
    refine_recipe = load_recipe(ROOT / "configs" / "tiny.yaml", [
        f"runs_dir={runs_dir}", "refine.chunk_size=6", "llm.max_new_tokens=8",
        "refine.belief_probe=1", "refine.belief_rounds=1", "refine.belief_candidates=1"])
    refine_cfg = section_config(refine_recipe, "refine", refine.Config)
    try:
        with contextlib.chdir(ROOT):  # the recipe's prompts, policies and templates are repo-relative
            out = module.main(cfg)
            refined = refine.main(refine_cfg)  # 02_refine/ on the same run, for notebooks/02_refine.ipynb
    finally:
        release_backends()
    assert (out / "records.jsonl").is_file() and (out / "manifest.json").is_file()
    assert (refined / "records.jsonl").is_file() and refined.parent == out.parent
    return out.parent


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path, stage1_run, monkeypatch):
    monkeypatch.setenv("RUN_DIR", str(stage1_run))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in outputs), f"{path.name} drew no figure"


def test_walkthrough_runs_every_stage_on_the_tiny_recipe(notebook_tiny_dir, tmp_path, monkeypatch):
    """notebooks/00_walkthrough.ipynb runs the five stage scripts as subprocesses (tiny recipe,
    a tmp runs folder) and shows stage 5's table and figure."""
    assert WALKTHROUGH.exists()
    monkeypatch.setenv("WALKTHROUGH_RECIPE", "tiny")
    monkeypatch.setenv("WALKTHROUGH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WALKTHROUGH_OVERRIDES", WALKTHROUGH_OVERRIDES)
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the walkthrough showed no figure"
    stage5 = tmp_path / "runs" / "tiny" / "05_eval"
    assert (stage5 / "table.md").is_file() and (stage5 / "intervals.png").is_file()


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
