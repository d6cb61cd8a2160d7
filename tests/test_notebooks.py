"""The notebooks in notebooks/ run headless and are committed without outputs. The walkthrough
runs all five stages on the tiny recipe in a tmp folder and shows the stage notebooks' figures,
twice in one kernel (a rerun, as after Colab's restart, must work); each stage notebook is then run
on that complete run and must draw from real files, whatever form its RUN_DIR takes.

Each notebook reads the run named by the environment variable RUN_DIR (its parameters cell);
the kernel inherits this process's environment, so setting os.environ before it starts is enough.
The walkthrough's Colab-only cells (Python version, clone and install, GPU) are run here on their
own, with git, pip and Colab faked.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from importlib import metadata
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
        client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        with client.setup_kernel():
            for _ in range(2):  # the second pass finds every stage complete: each says so and stops
                for index, cell in enumerate(nb.cells):
                    client.execute_cell(cell, index)  # raises CellExecutionError if a cell fails
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
    judges = (run / "05_eval" / "report.md").read_text().split("## Judges", 1)[1].split("\n## ", 1)[0]
    assert "refusal_detector" in judges and "choice_parser" in judges and "nan" not in judges.lower(), judges


# Notes a stage notebook shows when the stage it draws has not run: on the walkthrough's complete
# run none may appear, so each figure is drawn from real files, not a placeholder.
MISSING_STAGE_NOTES = ["No stage-", "**Note:** no `", "no logged steps yet", "no records to show",
                       "no results to tabulate", "no samples to show", "no manifest.json"]


# The folder each stage notebook reads in a run (None: the run folder itself).
STAGE_OF = {"01_generate.ipynb": "01_generate", "02_refine.ipynb": "02_refine", "03_04_training.ipynb": None,
            "05_eval.ipynb": "05_eval"}


def read_folder(path: Path, run: Path) -> Path:
    stage = STAGE_OF[path.name]
    return (run / stage if stage else run).resolve()


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_runs_headless_on_a_complete_run(path, walkthrough, monkeypatch):
    """RUN_DIR relative to the repository root, as `make demo` prints it (the run lives in a tmp
    folder, so the path climbs out of the repository; relative to notebooks/ it names nothing)."""
    _, run = walkthrough
    monkeypatch.setenv("RUN_DIR", os.path.relpath(run, ROOT))
    assert not (NOTEBOOK_DIR / os.environ["RUN_DIR"]).exists()
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
    assert f"reading {read_folder(path, run)}\n" in printed


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_reads_every_form_of_run_dir_and_says_once_when_it_is_missing(path, walkthrough):
    """In one kernel: the whole notebook with a RUN_DIR that names no folder (one message, nothing
    else, no error), then its setup cells with RUN_DIR relative to notebooks/, absolute, and as the
    stage folder: each prints the folder it reads."""
    _, run = walkthrough
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    params = next(i for i, c in enumerate(code) if "RUN_DIR = os.environ.get" in c)
    setup = next(i for i, c in enumerate(code) if "find_run_dir(RUN_DIR" in c)
    missing = "data/runs/no-such-run"
    forms = [os.path.relpath(run, NOTEBOOK_DIR), str(run), str(run / (STAGE_OF[path.name] or "03_sft"))]
    parts = [[code[params], f"RUN_DIR = {missing!r}", *code[params + 1:]]]
    parts += [[f"RUN_DIR = {form!r}", *code[params + 1:setup + 1]] for form in forms]
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for part in parts for c in part],
                                     metadata=nbformat.read(path, as_version=4).metadata)
    NotebookClient(probe, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()

    ends = [sum(map(len, parts[:i + 1])) for i in range(len(parts))]
    printed = [texts(nbformat.v4.new_notebook(cells=probe.cells[a:b])) for a, b in zip([0, *ends], ends)]
    outputs = [o for c in probe.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert printed[0].strip().startswith(f"RUN_DIR={missing!r} is not a folder") and "\n" not in printed[0].strip(), \
        printed[0][:2000]
    assert not [o for c in probe.cells[:ends[0]] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    for form, text in zip(forms, printed[1:]):
        assert f"reading {read_folder(path, run)}\n" in text, (form, text[:2000])
        assert not [n for n in MISSING_STAGE_NOTES if n in text], (form, text[:2000])


def walkthrough_cell(marker: str) -> str:
    return next(c.source for c in nbformat.read(WALKTHROUGH, as_version=4).cells if c.cell_type == "code" and marker in c.source)


@pytest.fixture
def colab(tmp_path, monkeypatch):
    """A fake Colab runtime in /content (a tmp folder): google.colab importable; git and pip
    recorded, not run (a clone writes 01_generate.py and this requirements.txt)."""
    calls = []

    def run(cmd, check=False, **kwargs):
        calls.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            Path(cmd[-1]).mkdir(parents=True)
            (Path(cmd[-1]) / "01_generate.py").write_text("")
            (Path(cmd[-1]) / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WALKTHROUGH_CLONE_DIR", str(tmp_path / "safecot"))
    monkeypatch.setenv("WALKTHROUGH_REPO_URL", "https://example.invalid/safecot.git")
    return calls


def test_walkthrough_clones_once_and_keeps_colabs_torch(colab, tmp_path):
    source = walkthrough_cell('"git", "clone"')
    for _ in range(2):  # the second time as after Colab's restart: back in /content, the clone is there
        os.chdir(tmp_path)
        exec(source, {})
        assert Path.cwd() == tmp_path / "safecot"
    clones = [c for c in colab if c[:2] == ["git", "clone"]]
    installs = [c for c in colab if c[1:4] == ["-m", "pip", "install"]]
    assert len(clones) == 1 and len(installs) == 1, colab
    requirements = (Path.cwd() / installs[0][installs[0].index("-r") + 1]).read_text()
    constraints = (Path.cwd() / installs[0][installs[0].index("-c") + 1]).read_text()
    assert not re.search(r"^torch\b", requirements, re.M) and "transformers==" in requirements
    assert constraints.strip() == f"torch=={metadata.version('torch')}"


def test_walkthrough_clone_cell_stops_clearly_on_a_folder_that_is_not_the_repository(colab, tmp_path, monkeypatch):
    source = walkthrough_cell('"git", "clone"')
    (tmp_path / "safecot").mkdir()
    (tmp_path / "safecot" / "notes.txt").write_text("")
    with pytest.raises(SystemExit, match="exists but is not a copy of this repository"):
        exec(source, {})
    monkeypatch.delenv("WALKTHROUGH_REPO_URL")
    monkeypatch.setenv("WALKTHROUGH_CLONE_DIR", str(tmp_path / "fresh"))
    with pytest.raises(SystemExit, match="set REPO_URL"):
        exec(source, {})
    assert not colab


@pytest.mark.parametrize("version, supported", [((3, 11), True), ((3, 12), True), ((3, 10), False), ((3, 13), False)])
def test_walkthrough_stops_clearly_on_an_unsupported_python(version, supported, monkeypatch, capsys):
    source = walkthrough_cell("sys.version_info")
    monkeypatch.setattr(sys, "version_info", (*version, 0, "final", 0))
    if supported:
        exec(source, {})
        assert capsys.readouterr().out.startswith(f"Python {version[0]}.{version[1]}")
    else:
        with pytest.raises(SystemExit, match=rf"Python {version[0]}\.{version[1]} is not supported: use Python 3\.11"):
            exec(source, {})


def test_walkthrough_stops_the_colab_recipe_without_a_gpu(monkeypatch, capsys):
    source = walkthrough_cell("torch.cuda.is_available()")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False)))
    with pytest.raises(SystemExit, match='no GPU in this runtime.*RECIPE = "tiny"'):
        exec(source, {"RECIPE": "colab"})
    exec(source, {"RECIPE": "tiny"})
    assert "no GPU needed" in capsys.readouterr().out


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
