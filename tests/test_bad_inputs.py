"""Bad input exits non-zero with one clear line naming the file, line or key, and loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "01_generate.py", *args], cwd=cwd, capture_output=True, text=True)


def error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


@pytest.fixture
def prompts(tmp_path):
    def write(text: str, name="p.jsonl"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def test_missing_prompt_file(tmp_path):
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.prompts=nope.jsonl"))
    assert "nope.jsonl" in line and "not found" in line


def test_malformed_line_names_file_and_line(tmp_path, prompts):
    p = prompts('{"id": "a", "prompt": "hi", "label": "benign", "category": "general"}\n{"id": "b", "prompt": \n')
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"generate.prompts={p}"))
    assert f"{p}:2" in line and "malformed JSON" in line


def test_missing_field_and_empty_prompt(tmp_path, prompts):
    p = prompts('{"id": "a", "text": "hi"}\n')
    assert "missing field 'prompt'" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"generate.prompts={p}"))
    p = prompts('{"id": "a", "prompt": "   "}\n', "e.jsonl")
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"generate.prompts={p}"))
    assert f"{p}:1" in line and "empty prompt" in line


def test_csv_missing_column(tmp_path, prompts):
    p = prompts("question,label\nhello,benign\n", "p.csv")
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"generate.prompts={p}",
                          "generate.prompt_columns={prompt: text}"))
    assert f"{p}:2" in line and "'text'" in line


def test_unknown_config_keys(tmp_path):
    assert "generate.n_agent" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.n_agent=2"))
    assert "'genrate'" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "genrate.limit=2"))
    assert "llm.temprature" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "llm.temprature=0.1"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\ngenerate:\n  limitt: 3\n")
    assert "generate.limitt" in error_line(cli("--config", str(bad)))
    assert "recipe not found" in error_line(cli("--config", "configs/nope.yaml"))


def test_unknown_backend_and_bad_types(tmp_path):
    assert "unknown backend 'gpt'" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "llm.backend=gpt"))
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.deliberators=[{backend: nope}]"))
    assert "unknown backend 'nope'" in line
    assert "generate.limit" in error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.limit=many"))


@pytest.mark.slow
def test_missing_model_and_policies(tmp_path):
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.limit=1",
                          f"llm.model={tmp_path}/no-such-model"))
    assert "no-such-model" in line and "cannot be loaded" in line
    line = error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.policies=none.yaml"))
    assert "none.yaml" in line


@pytest.mark.slow
def test_bad_input_after_a_run_loses_nothing(tmp_path, prompts):
    ok = cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.limit=2", "generate.max_rounds=0",
             "llm.max_new_tokens=4")
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "tiny" / "01_generate" / "records.jsonl"
    before = out.read_text()
    p = prompts("not json\n")
    error_line(cli("--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "generate.limit=2",
                   "generate.max_rounds=0", "llm.max_new_tokens=4", f"generate.prompts={p}"))
    assert out.read_text() == before


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from conftest import ScriptedBackend, load_script
    from test_generate import AGREE, script_for
    from safecot.config import load_recipe, section_config
    calls = []
    def script(chat, model):
        calls.append(1)
        if len(calls) == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return script_for(lambda c, k: AGREE)(chat, model)
    ScriptedBackend.script = staticmethod(script)
    module = load_script("01_generate")
    recipe = load_recipe("configs/tiny.yaml", sys.argv[1:])
    module.main(section_config(recipe, "generate", module.Config))
""")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, scripted):
    args = [f"runs_dir={tmp_path}", "llm.backend=scripted", "generate.limit=9", "generate.chunk_size=3"]
    # each chunk of 3 takes 3 + 3 + 3 script calls; die during the third chunk's initial CoT
    code = KILLER.format(root=str(ROOT), tests=str(ROOT / "tests"), kill_at=22)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = tmp_path / "tiny" / "01_generate"
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["stop_reason"] == "agreement" for line in lines)

    from conftest import make_config
    from test_generate import AGREE, script_for
    scripted.script = script_for(lambda c, k: AGREE)
    module, cfg = make_config("01_generate", "generate", tmp_path, *args[1:])
    module.main(cfg)
    ids = [json.loads(line)["id"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 9
    assert (out / "records.jsonl").read_text().splitlines()[:6] == lines
