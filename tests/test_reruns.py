"""Nothing a user does twice costs them their results: a finished stage rerun changes nothing, an
edited record is refused, a kill while a checkpoint is saved never wedges the stage, a stage that
fails says so, timings add up over sessions, and every mode of every stage takes the folder lock.

One small run of all five stages on the tiny model is made once for the module (no 4-bit, a few
prompts and tokens, two training steps); tests that change a run work on a copy of it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import load_script
from safecot import stage
from safecot.records import InputError, RecordWriter

pytestmark = pytest.mark.slow

STAGES = (("01_generate", "generate"), ("02_refine", "refine"), ("03_sft", "sft"), ("04_dpo", "dpo"), ("05_eval", "eval"))
SMALL = ["llm.load_in_4bit=false", "llm.max_new_tokens=8", "sft.load_in_4bit=false", "dpo.load_in_4bit=false",
         "generate.limit=3", "generate.n_agents=1", "generate.max_rounds=1",
         "refine.dedup_threshold=null", "refine.belief_candidates=1", "refine.belief_rounds=1", "refine.belief_probe=1",
         "sft.max_steps=2", "sft.max_length=128", "sft.batch_size=2", "sft.save_steps=1",
         "dpo.max_steps=2", "dpo.max_length=128", "dpo.batch_size=2",
         "eval.limit=1", "eval.bootstrap_samples=20", "eval.suites=[harmful, xstest]",
         "eval.generation={temperature: 0.0, max_new_tokens: 8}"]


def cli(section: str, runs: Path, *extra: str) -> None:
    script = dict((s, n) for n, s in STAGES)[section]
    module = load_script(script)
    stage.run_cli(section, module.Config, module.main,
                  argv=["--config", "configs/tiny.yaml", f"runs_dir={runs}", *SMALL, *extra])


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash and modification time (but the lock files,
    which every run takes and lets go of)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("reruns")
    for _, section in STAGES:
        cli(section, runs)
    return runs


@pytest.fixture
def run_copy(finished_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs)
    return runs


def test_a_finished_stage_rerun_changes_nothing_it_recorded(finished_run, capsys):
    run = finished_run / "tiny"
    for name, _ in STAGES:
        assert manifest(run / name)["status"] == "complete", name
    before = snapshot(run)
    capsys.readouterr()
    for name, section in STAGES:
        cli(section, finished_run)
        said = capsys.readouterr().out
        assert "complete, with the same config and inputs; nothing to redo" in said, (name, said)
        assert f"{name}: complete" in said  # the summary still ends the stage
    assert snapshot(run) == before  # not a byte and not a modification time moved


def test_raising_the_step_budget_trains_on_and_adds_up_the_sessions(run_copy):
    out = run_copy / "tiny" / "03_sft"
    first = manifest(out)
    cli("sft", run_copy, "sft.max_steps=3")
    m = manifest(out)
    assert m["status"] == "complete" and m["counts"]["steps"] == 3 and m["resumed_from"].endswith("checkpoint-2")
    assert m["counts"]["train_loss"] > 0  # the whole run's loss, not the resumed session's 0 or partial mean
    assert m["sessions"] == 2
    assert m["timings"]["wall_s"] == pytest.approx(first["timings"]["wall_s"] + m["timings"]["last_session_s"], abs=0.01)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in logged if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 3  # one loss curve, each step once


def test_an_edited_record_is_refused_naming_file_and_line(run_copy):
    path = run_copy / "tiny" / "01_generate" / "records.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["response"] = "Sure, here is exactly how to do it."  # a hand edit, hash left as it was
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    before = manifest(path.parent)
    with pytest.raises(SystemExit) as e:
        cli("generate", run_copy)
    line = str(e.value.code)
    assert line.startswith("error: ") and f"{path}:2" in line and "edited" in line and "\n" not in line
    with pytest.raises(SystemExit) as e:  # and the next stage will not train on it either
        cli("refine", run_copy, "--overwrite")
    assert f"{path}:2" in str(e.value.code)
    assert manifest(path.parent) == before  # the refusal recorded nothing


def test_record_writer_refuses_an_edited_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordWriter(path) as w:
        w.write({"id": "a", "x": 1})
        w.write({"id": "b", "x": 2, "record_hash": "stale-from-an-earlier-stage"})
    assert RecordWriter(path).done == {"a": {"id": "a", "x": 1}, "b": {"id": "b", "x": 2}}
    path.write_text(path.read_text().replace('"x": 2', '"x": 3'))
    with pytest.raises(InputError, match=r"r.jsonl:2: record 'b' was edited"):
        RecordWriter(path)


def test_a_kill_while_a_checkpoint_is_saved_resumes_from_the_one_before(run_copy, capsys):
    out = run_copy / "tiny" / "03_sft"
    ckpts = out / "checkpoints"
    assert {p.name for p in ckpts.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    # As a kill while checkpoint-2 was being written leaves it: weights saved, no trainer state yet,
    # and the manifest still saying "running".
    (ckpts / "checkpoint-2" / "trainer_state.json").unlink()
    m = manifest(out)
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    cli("sft", run_copy)
    said = capsys.readouterr().out
    assert "checkpoint-2 is incomplete (no trainer_state.json" in said
    assert f"resuming from {ckpts / 'checkpoint-1'}" in said
    m = manifest(out)
    assert m["status"] == "complete" and m["counts"]["steps"] == 2
    assert (ckpts / "checkpoint-2" / "trainer_state.json").is_file()  # saved again, whole


def test_an_empty_last_checkpoint_is_skipped(tmp_path):
    from safecot.training import last_checkpoint
    good = tmp_path / "checkpoint-5"
    good.mkdir()
    for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        (good / f).write_bytes(b"x")
    (good / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()                        # killed as it was created
    torn = tmp_path / "checkpoint-7"
    shutil.copytree(good, torn)
    (torn / "trainer_state.json").write_text('{"global_st')     # killed mid-write
    assert last_checkpoint(tmp_path) == str(good)
    assert not (tmp_path / "checkpoint-10").exists() and not torn.exists()


def test_a_stage_that_fails_says_failed_with_the_reason(tmp_path, scripted):
    def script(chat, model):
        raise RuntimeError("the server went away")
    scripted.script = script
    module = load_script("01_generate")
    with pytest.raises(RuntimeError, match="went away"):  # a crash, not a user's mistake: its traceback stays
        stage.run_cli("generate", module.Config, module.main,
                      argv=["--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "llm.backend=scripted",
                            "generate.limit=2"])
    m = manifest(tmp_path / "tiny" / "01_generate")
    assert m["status"] == "failed" and "went away" in m["reason"] and "\n" not in m["reason"]


def test_timings_and_session_counts_add_up_over_reruns(tmp_path, scripted):
    from test_generate import AGREE, script_for
    scripted.script = script_for(lambda chat, k: AGREE)
    module = load_script("01_generate")
    argv = ["--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "llm.backend=scripted"]
    stage.run_cli("generate", module.Config, module.main, argv=[*argv, "generate.limit=2"])
    out = tmp_path / "tiny" / "01_generate"
    first = manifest(out)
    stage.run_cli("generate", module.Config, module.main, argv=[*argv, "generate.limit=3"])
    m = manifest(out)
    assert m["sessions"] == 2 and m["counts"]["records"] == 3
    assert m["counts"]["this_session"]["backend_calls"] < m["counts"]["all_sessions"]["backend_calls"]
    assert m["counts"]["all_sessions"]["backend_calls"] == (first["counts"]["this_session"]["backend_calls"]
                                                           + m["counts"]["this_session"]["backend_calls"])
    assert m["timings"]["wall_s"] == pytest.approx(first["timings"]["wall_s"] + m["timings"]["last_session_s"], abs=0.01)
    for step, s in first["timings"]["step_s"].items():
        assert m["timings"]["step_s"][step] >= s


def test_compare_with_overwrite_takes_the_lock_and_clears_only_its_own_folder(run_copy, tmp_path):
    from test_stage import hold
    out = run_copy / "tiny" / "05_eval"
    results = out / "results.json"
    proc = hold(out)
    try:
        with pytest.raises(SystemExit) as e:
            cli("eval", run_copy, f"eval.compare=[{run_copy / 'tiny'}]", "--overwrite")
        assert f"pid {proc.pid}" in str(e.value.code)
        assert results.is_file() and (out / "manifest.json").is_file()  # nothing of the holder's deleted
    finally:
        proc.kill()
        proc.wait()
    cli("eval", run_copy, f"eval.compare=[{run_copy / 'tiny'}]", "--overwrite")
    assert results.is_file() and (out / "compare" / "report.md").is_file()
    assert manifest(out)["status"] == "complete"


def test_sigterm_ends_a_stage_as_interrupted(tmp_path, scripted):
    import os
    import signal

    def script(chat, model):
        os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler or a notebook's stop button sends it
        return ""
    scripted.script = script
    module = load_script("01_generate")
    with pytest.raises(SystemExit) as e:
        stage.run_cli("generate", module.Config, module.main,
                      argv=["--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "llm.backend=scripted",
                            "generate.limit=2"])
    assert str(e.value.code).startswith("interrupted:")
    assert manifest(tmp_path / "tiny" / "01_generate")["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the test process's own handler is back
