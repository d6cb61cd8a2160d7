"""safecot/stage.py: the stage-folder lock across processes, the folder and manifest a stage main
opens, the partial-status tail, and the trained model a later stage finds in a manifest."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, make_config
from safecot import stage
from safecot.records import InputError

# A second process that takes the stage's lock, says so, and holds it until its stdin closes.
HOLDER = """
import sys
sys.path.insert(0, {root!r})
from safecot.stage import lock_stage
with lock_stage({out!r}):
    print("locked", flush=True)
    sys.stdin.read()
"""


@dataclass
class Config:
    run_name: str = "r"
    seed: int = 0
    runs_dir: str = "data/runs"


def hold(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out)), "--holder-flag"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # blocks until the child holds it: no sleeps
    return proc


def test_a_second_process_on_the_same_stage_exits_naming_the_holder(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_name: r\nruns_dir: {tmp_path}\n")
    out = tmp_path / "r" / "01_generate"
    ran = []

    def main(cfg, overwrite=False):
        with stage.open_stage(cfg, "01_generate", overwrite, seed=False) as st:
            (st.out / "records.jsonl").write_text('{"id": 1}\n')
            ran.append(st.out)
            st.finish()
        return st.out

    proc = hold(out)
    try:
        with pytest.raises(SystemExit) as e:
            stage.run_cli("generate", Config, main, argv=["--config", str(recipe), "--overwrite"])
        line = str(e.value.code)
        assert line.startswith("error: ") and "\n" not in line
        assert f"pid {proc.pid}" in line and "--holder-flag" in line and str(out) in line
        assert not ran and not (out / "manifest.json").exists()  # --overwrite cleared nothing of the holder's
    finally:
        proc.kill()  # as kill -9 would: the OS drops the lock with the process
        proc.wait()
    stage.run_cli("generate", Config, main, argv=["--config", str(recipe)])
    printed = capsys.readouterr().out
    assert ran == [out] and "01_generate: complete" in printed and "next: python 02_refine.py --config" in printed
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_training_stage_takes_the_lock_before_it_writes(tmp_path):
    from training_fixtures import write_stage2
    write_stage2(tmp_path)
    module, cfg = make_config("03_sft", "sft", tmp_path, "sft.max_steps=1")
    out = tmp_path / "tiny" / "03_sft"
    proc = hold(out)
    try:
        with pytest.raises(InputError, match=rf"pid {proc.pid} on .*--holder-flag"):
            module.main(cfg, overwrite=True)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.iterdir()) == [stage.LOCK]  # nothing written, nothing cleared


def test_the_same_process_reopens_a_stage_and_overwrite_keeps_the_lock(tmp_path):
    cfg = Config(runs_dir=str(tmp_path))
    with stage.open_stage(cfg, "03_sft", seed=False) as st:
        holder = json.loads((st.out / stage.LOCK).read_text())
        assert holder["pid"] > 0 and holder["argv"] == sys.argv
        (st.out / "old").mkdir()
        with pytest.raises(InputError, match="being written by another process"):  # a second writer, even here
            with stage.open_stage(cfg, "03_sft", seed=False):
                pass
    with stage.open_stage(cfg, "03_sft", overwrite=True, seed=False) as st:
        assert sorted(p.name for p in st.out.iterdir()) == [stage.LOCK, "manifest.json"]
        with pytest.raises(InputError, match=r"pid \d+"):
            with stage.lock_stage(st.out):
                pass
    assert (st.out / stage.LOCK).read_text() == ""  # let go: it names no one


def test_missing_items_leave_the_stage_partial_with_a_rerun_warning(tmp_path, capsys):
    with stage.open_stage(Config(runs_dir=str(tmp_path)), "05_eval", seed=False) as st:
        st.finish(missing=3, what="generations", items=10)
    manifest = json.loads((st.out / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["counts"]["items"] == 10
    assert "warning: 3 generations failed on the backend; rerun the same command" in capsys.readouterr().out
    with stage.open_stage(Config(runs_dir=str(tmp_path)), "05_eval", seed=False) as st:
        st.finish(missing=0)
    assert json.loads((st.out / "manifest.json").read_text())["status"] == "complete"


def write_trained(folder: Path, manifest: dict, adapter: bool = True) -> Path:
    folder.mkdir(parents=True)
    if adapter:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"status": "complete", **manifest}))
    return folder


def test_trained_model_reads_the_manifest_and_older_ones(tmp_path):
    sft = write_trained(tmp_path / "sft", {"model": {"base": "org/base", "adapter": str(tmp_path / "sft" / "adapter")},
                                           "config": {"llm": {"model": "other"}}})
    assert stage.trained_model(sft) == ("org/base", tmp_path / "sft" / "adapter")
    old = write_trained(tmp_path / "old", {"base_model": "org/dpo-base", "config": {"llm": {"model": "other"}}})
    assert stage.trained_model(old) == ("org/dpo-base", old / "adapter")  # a manifest from before `model`
    older = write_trained(tmp_path / "older", {"config": {"model": None, "llm": {"model": "org/llm"}}})
    assert stage.trained_model(older)[0] == "org/llm"
    moved = write_trained(tmp_path / "moved", {"model": {"base": "b", "adapter": "/gone/adapter"}})
    assert stage.trained_model(moved) == ("b", moved / "adapter")  # the run folder was moved: its own adapter
    with pytest.raises(InputError, match="adapter_config.json missing"):
        stage.trained_model(write_trained(tmp_path / "none", {"model": {"base": "b"}}, adapter=False))
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "manifest.json").write_text('{"status": "running"}')
    with pytest.raises(InputError, match="did not finish"):
        stage.trained_model(tmp_path / "running")


@pytest.mark.parametrize("script,section,stage_name", [("01_generate", "generate", "01_generate"),
                                                       ("02_refine", "refine", "02_refine"),
                                                       ("05_eval", "eval", "05_eval")])
def test_every_stage_that_writes_records_takes_the_lock(tmp_path, scripted, script, section, stage_name):
    """Two processes on one stage of one run: the second stops before it writes a record, so no
    record is ever written twice."""
    module, cfg = make_config(script, section, tmp_path, "llm.backend=scripted", "eval.models=[{label: base}]")
    if script == "02_refine":  # stage 2 needs a finished stage 1
        gen, gcfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=2")
        gen.main(gcfg)
    out = tmp_path / "tiny" / stage_name
    proc = hold(out)
    try:
        with pytest.raises(InputError, match=rf"pid {proc.pid} on .*--holder-flag"):
            module.main(cfg)
        assert not (out / "records.jsonl").exists() and not (out / "manifest.json").exists()
    finally:
        proc.kill()
        proc.wait()


def test_seed_agents_seeds_torch_only_for_local_models(monkeypatch):
    # A server samples with its own seed: an openai-only stage must not import transformers to seed torch.
    import random

    seeded = []
    monkeypatch.setattr(stage, "set_seed", seeded.append)
    remote = type("A", (), {"cfg": type("C", (), {"backend": "openai"})()})()
    local = type("A", (), {"cfg": type("C", (), {"backend": "hf"})()})()
    stage.seed_agents(7, [remote, remote])
    first = random.random()
    assert seeded == []
    stage.seed_agents(7, [remote, local])
    assert seeded == [7] and random.random() == first
