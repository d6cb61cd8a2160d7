"""Bad input exits non-zero with one clear line naming the file, line or key, and loses nothing.

Bad input is refused before any model loads: the tests that say so name a model that does not
exist (`NO_MODEL`), so a check that moved after model loading would fail on the model instead."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, load_script, make_config

TINY = ("--config", "configs/tiny.yaml")


def stage(script: str, *args, cwd=ROOT, prefix=()):
    return subprocess.run([*prefix, sys.executable, f"{script}.py", *args], cwd=cwd, capture_output=True, text=True)


def cli(*args, cwd=ROOT):
    return stage("01_generate", *args, cwd=cwd)


def error_line(proc) -> str:
    """The one line a bad input prints: stderr holds it and nothing else (no warnings, no traceback)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def no_model(tmp_path) -> str:
    return f"llm.model={tmp_path}/no-such-model"


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


# ---- files that are not UTF-8 -------------------------------------------------------------------

def test_non_utf8_prompt_file_names_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    line = error_line(cli(*TINY, f"runs_dir={tmp_path}", f"generate.prompts={p}", no_model(tmp_path)))
    assert f"{p}:2" in line and "UTF-8" in line


def test_non_utf8_recipe_names_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"seed: 0\nrun_name: caf\xe9\n")
    line = error_line(cli("--config", str(recipe)))
    assert f"{recipe}:2" in line and "UTF-8" in line


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_numbered_rows_names_the_line_of_a_non_utf8_byte(tmp_path, suffix):
    from safecot.records import InputError, numbered_rows
    p = tmp_path / f"rows{suffix}"
    p.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "\xff"}\n' if suffix == ".jsonl" else b"id,prompt\na,x\nb,\xc3(\n")
    with pytest.raises(InputError, match=rf"rows\{suffix}:3: not UTF-8"):
        numbered_rows(p)


def test_a_long_csv_field_is_a_row_not_an_error(tmp_path):
    from safecot.records import numbered_rows
    p = tmp_path / "long.csv"
    p.write_text("id,prompt\na," + "x" * 200_000 + "\n")
    assert len(numbered_rows(p)[0][1]["prompt"]) == 200_000


# ---- templates: checked when loaded, before any model -------------------------------------------

@pytest.fixture
def templates(tmp_path):
    """A copy of data/templates to break: edit(name, old, new) replaces text in <name>.txt."""
    folder = tmp_path / "templates"
    shutil.copytree(ROOT / "data" / "templates", folder)

    def edit(name: str, old: str, new: str):
        path = folder / f"{name}.txt"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
        return path
    edit.folder = folder
    return edit


def test_stray_dollar_in_a_template_names_file_and_line(tmp_path, templates):
    path = templates("deliberate", "[user]\n", "[user]\nEach review costs $5.\n")
    n = path.read_text().splitlines().index("Each review costs $5.") + 1
    line = error_line(cli(*TINY, f"runs_dir={tmp_path}", f"generate.templates={templates.folder}", no_model(tmp_path)))
    assert f"{path}:{n}" in line and "'$5'" in line and "$$" in line


def test_template_without_prompt_is_refused_when_loaded(tmp_path, templates):
    path = templates("intent", "${prompt}", "the request")
    line = error_line(cli(*TINY, f"runs_dir={tmp_path}", f"generate.templates={templates.folder}", no_model(tmp_path)))
    assert str(path) in line and "${prompt}" in line


def test_unknown_placeholder_is_refused_when_loaded(templates):
    from safecot.records import InputError
    from safecot.templates import load_template
    path = templates("initial_cot", "${intents}", "${intents} ${intent}")
    n = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "${intent}" in t)
    with pytest.raises(InputError, match=rf"initial_cot\.txt:{n}: unknown placeholder \$\{{intent\}}"):
        load_template("initial_cot", templates.folder)
    templates("plain_response", "${prompt}", "${prompt} costs $$5")  # $$ is a literal $
    assert "costs $5" in load_template("plain_response", templates.folder).chat(prompt="x")[-1]["content"]


def test_every_shipped_template_fills_with_what_its_stage_passes():
    from safecot.templates import PLACEHOLDERS, TEMPLATES, load_template
    names = sorted(p.stem for p in TEMPLATES.glob("*.txt"))
    assert names == sorted(PLACEHOLDERS)
    for name in names:
        needed, filled = PLACEHOLDERS[name]
        assert set(needed) <= set(filled)
        load_template(name).chat(**dict.fromkeys(filled, "v"))


def test_refine_templates_are_checked_before_any_model(tmp_path, templates):
    stage1 = tmp_path / "tiny" / "01_generate"
    stage1.mkdir(parents=True)
    (stage1 / "manifest.json").write_text('{"status": "complete"}')
    (stage1 / "records.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "label": "benign", "category": "c",
                                                      "thoughts": [], "response": "r", "deliberation_log": []}) + "\n")
    path = templates("belief_cot", "${belief}", "a belief")
    line = error_line(stage("02_refine", *TINY, f"runs_dir={tmp_path}", f"refine.templates={templates.folder}",
                            no_model(tmp_path)))
    assert str(path) in line and "${belief}" in line


def test_eval_judge_templates_are_checked_before_any_model(tmp_path, templates):
    path = templates("judge_safety", "${answer}", "${answer} $ok")
    line = error_line(stage("05_eval", *TINY, f"runs_dir={tmp_path}", "eval.models=[base]", "eval.suites=[harmful]",
                            "eval.judges={safety: llm}", "eval.allow_self_judge=true", no_model(tmp_path),
                            f"eval.judge_templates={templates.folder}"))
    assert str(path) in line and "${ok}" in line


def test_grpo_reward_judge_template_is_checked_before_anything_loads(tmp_path, templates):
    path = templates("reward_judge", "${response}", "the answer")
    line = error_line(stage("04_dpo", *TINY, f"runs_dir={tmp_path}", "dpo.method=grpo", "dpo.from_sft=false",
                            "dpo.judge={model: judge}", "dpo.policies=data/policies/cases.yaml",
                            f"dpo.templates={templates.folder}", no_model(tmp_path)))
    assert str(path) in line and "${response}" in line


# ---- paths stay inside their folders ------------------------------------------------------------

def test_eval_label_dotdot_is_refused(tmp_path):
    line = error_line(stage("05_eval", *TINY, f"runs_dir={tmp_path}", "eval.models=[{label: ..}]", no_model(tmp_path)))
    assert "label '..'" in line
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b"])
def test_suite_name_must_be_one_folder_name(tmp_path, name):
    suites = f"eval.suites=[{{name: '{name}', kind: harmful, source: data/eval/harmful.jsonl}}]"
    line = error_line(stage("05_eval", *TINY, f"runs_dir={tmp_path}", "eval.models=[base]", suites, no_model(tmp_path)))
    assert f"suite name '{name}'" in line
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("name", ["../../x", "..", "a/../../x", "/tmp/x", ""])
def test_run_name_must_stay_inside_runs_dir(tmp_path, name):
    runs = tmp_path / "a" / "runs"
    line = error_line(cli(*TINY, f"runs_dir={runs}", f"run_name={name}", no_model(tmp_path)))
    assert "run_name" in line
    assert not (tmp_path / "x").exists() and not runs.exists()


def test_run_name_may_nest_inside_runs_dir(tmp_path):
    from safecot.config import load_recipe, section_config
    module = load_script("01_generate")
    cfg = section_config(load_recipe(ROOT / "configs/tiny.yaml", [f"runs_dir={tmp_path}", "run_name=group/try.1"]),
                         "generate", module.Config)
    assert cfg.run_name == "group/try.1"


# ---- limits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,key,value,says", [
    ("01_generate", "generate.limit", "0", "positive"), ("05_eval", "eval.limit", "0", "positive"),
    ("05_eval", "eval.sample", "-3", "positive"), ("01_generate", "generate.limit", "true", "should be int")])
def test_limit_must_be_a_positive_number(tmp_path, script, key, value, says):
    line = error_line(stage(script, *TINY, f"runs_dir={tmp_path}", f"{key}={value}", no_model(tmp_path)))
    assert f"'{key}'" in line and says in line


@pytest.mark.parametrize("section,override,key", [
    ("refine", "refine.limit=0", "refine.limit"), ("sft", "sft.limit=-1", "sft.limit"), ("dpo", "dpo.limit=0", "dpo.limit"),
    ("generate", "generate.prompts=[{source: data/prompts/seed.jsonl, limit: 0}]", "generate.prompts[0].limit"),
    ("eval", "eval.suites=[{name: harmful, limit: 0}]", "eval.suites 'harmful': limit")])
def test_every_limit_is_checked(tmp_path, section, override, key):
    from safecot.config import ConfigError
    from safecot.prompt_sets import prompt_sources
    from safecot.records import InputError
    from safecot.suites import suite_spec
    script = {"generate": "01_generate", "refine": "02_refine", "sft": "03_sft", "dpo": "04_dpo", "eval": "05_eval"}[section]
    with pytest.raises((ConfigError, InputError), match="positive") as err:
        _, cfg = make_config(script, section, tmp_path, override)
        prompt_sources(cfg.prompts) if section == "generate" else [suite_spec(s) for s in cfg.suites]
    assert key in str(err.value)


# ---- a run folder that cannot be written --------------------------------------------------------

def test_read_only_run_folder_is_one_line(tmp_path):
    """Needs stage.run_cli to turn OSError into one line. Root ignores permissions: it runs the stage
    without the capability that lets it (setpriv)."""
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: a read-only folder cannot stop it")
        caps = "-dac_override,-dac_read_search"
        prefix = ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--")
    folder = tmp_path / "tiny" / "01_generate"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        line = error_line(stage("01_generate", *TINY, f"runs_dir={tmp_path}", no_model(tmp_path), prefix=prefix))
    finally:
        folder.chmod(0o755)
    assert str(folder) in line and "ermission" in line


# ---- prompts past the model's context window ----------------------------------------------------

def test_a_prompt_past_the_context_window_is_counted_not_generated():
    from safecot import scheduler
    from safecot.backends import Agent, LLMConfig
    agent = Agent("writer", LLMConfig(model="tiny", max_new_tokens=4, temperature=0.0))
    assert agent.backend.context == 8192  # the tiny model's max_position_embeddings and model_max_length
    long, short = "word " * 4200, "hello there"
    n = len(agent.backend.chat.prompt_ids([[{"role": "user", "content": long}]])[0])
    assert n + 4 > 8192

    def method(text):
        gen = yield scheduler.Request(agent, [{"role": "user", "content": text}], step="write")
        return text, gen

    done = []
    usage = scheduler.run([long, short], method, done.append, max_records=2)
    gens = dict(done)
    assert gens[long].error == f"context: prompt of {n} tokens + 4 new > 8192" and gens[long].text == ""
    assert gens[short].error is None and gens[short].tokens > 0   # the rest of the batch still ran
    assert usage.failures == {"context": {"count": 1, "example": gens[long].error}}
    # alone in its call it is still the prompt's failure, not the backend's: no BackendError
    assert agent([[{"role": "user", "content": long}]])[0].error.startswith("context: ")


# ---- failures shown, and the bar counts what was written ----------------------------------------

def test_failed_requests_are_counted_by_kind_and_the_bar_counts_written_prompts(tmp_path, scripted, monkeypatch):
    from safecot.backends import Generation
    from test_generate import AGREE, script_for

    def flaky(chat, model):
        if "Why" in chat[-1]["content"]:
            return Generation("", 0, error="status 500: InternalServerError: overloaded")
        return script_for(lambda c, k: AGREE)(chat, model)

    bars = []

    class Bar:
        def __init__(self, total, initial=0, **_):
            self.n, self.postfix = initial, {}
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix = kw

        def close(self):
            pass

    scripted.script = flaky
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=12")
    monkeypatch.setattr(module, "tqdm", Bar)
    out = module.main(cfg)
    written = len((out / "records.jsonl").read_text().splitlines())
    failed = 12 - written
    assert 0 < failed < 12
    assert bars[0].n == written and bars[0].postfix == {"failed": failed}
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["failures"]["status 500"]["count"] == failed  # a prompt stops at its first failed request
    assert counts["failures"]["status 500"]["example"] == "status 500: InternalServerError: overloaded"
