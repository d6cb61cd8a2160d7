"""A paper's table from one command (safecot/experiments.py, safecot/papers.py): every recipe with
an experiment plans its arms, a variant recipe extends its parent, the table reads stage 5's
results in the paper's units, and each tiny variant runs every arm offline and writes its table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import ROOT, load_script
from safecot import experiments, papers
from safecot.config import ConfigError, load_recipe
from safecot.records import InputError

RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "experiment" in load_recipe(p))
# The tiny variants shrunk further for the tests: 3 prompts, 8 tokens, 2 training steps, 2 suites of 1 row
# (the other columns of the table then say `not run`).
SMALL = ["llm.load_in_4bit=false", "llm.max_new_tokens=8", "sft.load_in_4bit=false", "dpo.load_in_4bit=false",
         "generate.limit=3", "generate.n_agents=1", "generate.max_rounds=1",
         "refine.dedup_threshold=null", "refine.belief_candidates=1", "refine.belief_rounds=1", "refine.belief_probe=1",
         "sft.max_steps=2", "sft.max_length=128", "dpo.max_steps=2", "dpo.max_length=128", "dpo.num_generations=2",
         "dpo.max_completion_length=8", "eval.limit=1", "eval.suites=[harmful, xstest]", "eval.bootstrap_samples=20",
         "eval.generation={temperature: 0.0, max_new_tokens: 8}"]


def test_every_paper_has_a_recipe_and_a_tiny_variant():
    names = {p.name for p in RECIPES}
    assert {"tiny-aidsafe.yaml", "tiny-cada.yaml", "tiny-saro.yaml"} <= names
    papers_run = {load_recipe(p)["experiment"]["paper"] for p in RECIPES}
    assert papers_run == {"aidsafe", "cada", "saro"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_experiment_plans_its_arms(recipe):
    steps = experiments.plan(str(recipe.relative_to(ROOT)), [])
    exp = experiments.load_experiment(load_recipe(recipe))
    main = load_recipe(recipe)["run_name"]
    commands = [" ".join(cmd) for _, cmd in steps]
    for stage in exp.stages:
        assert any(f"{stage}.py" in c and "run_name=" not in c for c in commands)
    for arm in exp.arms:
        if arm.run:  # its own run, reading the main run's data through {run_name}
            own = [c for c in commands if f"run_name={main}-{arm.run}" in c]
            assert len(own) == len(arm.stages) and "{run_name}" not in " ".join(own)
    last = steps[-1][1]
    assert last[1] == "05_eval.py"
    models = json.loads(last[-1].split("=", 1)[1])
    assert [m["label"] for m in models] == [a.arm for a in exp.arms]
    papers.load_paper(exp.paper)  # the columns and reported figures parse, one figure per column


def test_a_variant_recipe_extends_its_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("run_name: p\nseed: 3\nsft: {epochs: 2, lora: {r: 8, alpha: 16}}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nrun_name: c\nsft: {lora: {r: 4}}\n")
    r = load_recipe(tmp_path / "child.yaml", ["sft.epochs=5"])
    assert (r["run_name"], r["seed"], r["sft"]) == ("c", 3, {"epochs": 5, "lora": {"r": 4, "alpha": 16}})
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_recipe(tmp_path / "loop.yaml")


def test_bad_experiments_are_refused_with_the_key(tmp_path):
    for body, match in (("arms: [{arm: A}, {arm: A}]", "each arm once"),
                        ("arms: [{arm: A, model: 05_eval}]", "model must be"),
                        ("arms: [{arm: A, stages: [03_sft]}]", "run of its own"),
                        ("arms: [{arm: A, run: x}]", "names no stages"),
                        ("arms: [{arm: A, modle: 03_sft}]", "modle")):
        (tmp_path / "r.yaml").write_text(f"run_name: r\nexperiment:\n  paper: aidsafe\n  {body}\n")
        with pytest.raises(ConfigError, match=match):
            experiments.plan(str(tmp_path / "r.yaml"), [])


def metric(value, n=10, truncated=0):
    return {"overall": {"value": value, "low": None if value is None else value - 0.05,
                        "high": None if value is None else value + 0.05, "n": n, "truncated": truncated}}


def test_the_paper_table_is_in_the_papers_units_with_its_figures_beside(tmp_path):
    out = tmp_path / "r" / "05_eval"
    out.mkdir(parents=True)
    block = {"Base": {"harmful": {"safe_rate": metric(0.5)}, "xstest": {"over_refusal_rate": metric(0.1)},
                      "mmlu": {"accuracy": metric(None, n=0, truncated=7)}},
             "SFT_DB": {"harmful": {"safe_rate": metric(0.9)}}}
    (out / "results.json").write_text(json.dumps({"run_name": "r", "models": block, "settings": {
        "none": {"policy_prompt": None, "models": block},
        "cases": {"policy_prompt": "data/policies/cases.yaml", "models": {"Base": {"harmful": {"safe_rate": metric(0.7)}}}}}}))
    exp = experiments.Experiment(paper="aidsafe", reported="Qwen2.5-7B",
                                 suites={"BeaverTails": "harmful", "WildChat": None, "StrongREJECT": "jailbreak",
                                         "XSTest": "xstest", "MMLU": "mmlu"},
                                 arms=[{"arm": "Base"}, {"arm": "SFT_DB", "model": "03_sft"},
                                       {"arm": "SFT_OG", "run": "og", "stages": ["03_sft"], "model": "03_sft"}])
    md = papers.write_paper_table(out, exp, {"run_name": "r"}).read_text()
    assert "| Base | none | 50.0 [45.0, 55.0] n=10 (paper 94.14) |" in md
    assert "90.0 [85.0, 95.0] n=10 (paper 97.00)" in md                 # SFT_DB's BeaverTails beside the paper's
    assert "| Base | cases | 70.0" in md                                 # one row per inference-time setting
    assert "n/a (no judged answer, 7 truncated) (paper 75.78)" in md     # MMLU: all truncated, said so
    assert "n/a (not run) (paper 95.50)" in md                           # WildChat: not in this recipe
    assert "n/a (arm not evaluated)" in md and "**SFT_OG**: the adapter of 03_sft, run `r-og`" in md
    rows = {(r["arm"], r["setting"]): r for r in csv.DictReader((out / "paper_table.csv").open())}
    base = rows[("Base", "none")]
    assert float(base["XSTest"]) == pytest.approx(90.0)                  # 100 - over-refusal, interval flipped
    assert (float(base["XSTest_low"]), float(base["XSTest_high"])) == (pytest.approx(85.0), pytest.approx(95.0))
    assert base["BeaverTails_paper"] == "94.14" and base["MMLU"] == "" and base["MMLU_truncated"] == "7"
    assert "## CoT quality" in md and "refine.grade_baseline: true" in md   # AIDSAFE's second table, said missing


def test_the_table_needs_stage_5_and_a_known_paper(tmp_path):
    exp = experiments.Experiment(paper="aidsafe", arms=[{"arm": "Base"}])
    with pytest.raises(InputError, match="no results.json"):
        papers.write_paper_table(tmp_path, exp, {"run_name": "r"})
    with pytest.raises(InputError, match="known: aidsafe, cada, saro"):
        papers.load_paper("nope")


def in_process(cmd: list[str]) -> int:
    """A stage command of the plan run in this process (its command line, its summary): the tests
    spare the seconds each new process spends importing torch; tiny-aidsafe keeps real processes."""
    from safecot.config import STAGE_OF
    from safecot.stage import run_cli
    script = cmd[1][:-3]
    module = load_script(script)
    try:
        run_cli({v: k for k, v in STAGE_OF.items()}[script], module.Config, module.main, argv=cmd[2:])
    except SystemExit as e:
        return 1 if e.code else 0
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("variant, extra, run", [
    ("tiny-aidsafe", [], experiments.run_command), ("tiny-cada", [], in_process),
    ("tiny-saro", ["llm.max_new_tokens=64"], in_process)])  # process pairs need a task CoT that parses
def test_each_tiny_variant_runs_every_arm_and_writes_its_table(variant, extra, run, tmp_path, capfd):
    table = experiments.main([f"configs/{variant}.yaml", f"runs_dir={tmp_path}", *SMALL, *extra], run=run)
    exp = experiments.load_experiment(load_recipe(ROOT / "configs" / f"{variant}.yaml"))
    rows = list(csv.DictReader((table.parent / "paper_table.csv").open()))
    settings = {r["setting"] for r in rows}
    assert {r["arm"] for r in rows} == {a.arm for a in exp.arms}
    assert len(rows) == len(exp.arms) * len(settings)
    results = json.loads((table.parent / "results.json").read_text())
    for arm in exp.arms:  # each arm was generated and judged as its own model under test
        assert arm.arm in results["models"]
        if arm.model:
            assert results["model_info"][arm.arm]["adapter"]
    # A second run finds every stage complete and rewrites nothing but the table.
    before = {p: p.stat().st_mtime_ns for p in Path(tmp_path).rglob("manifest.json")}
    capfd.readouterr()
    experiments.main([f"configs/{variant}.yaml", f"runs_dir={tmp_path}", *SMALL, *extra], run=run)
    assert {p: p.stat().st_mtime_ns for p in Path(tmp_path).rglob("manifest.json")} == before
    said = capfd.readouterr().out  # the stages run as subprocesses: their output is on the file descriptor
    assert said.count("nothing to redo") == len(experiments.plan(f"configs/{variant}.yaml", [f"runs_dir={tmp_path}", *SMALL]))


def test_every_reproduce_command_in_the_readme_plans():
    readme = (ROOT / "README.md").read_text()
    configs = set(__import__("re").findall(r"make reproduce CONFIG=(configs/[\w.-]+\.yaml)", readme))
    assert {"configs/aidsafe-qwen2.5-7b.yaml", "configs/cada-qwen2.5-7b.yaml", "configs/saro-qwen2.5-7b.yaml"} <= configs
    for config in configs:
        assert experiments.plan(config, [])
