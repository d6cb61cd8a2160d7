"""Recipes parse into every stage's dataclass; overrides and unknown keys behave."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, load_script
from safecot.config import SECTIONS, ConfigError, load_recipe, section_config

STAGE_SCRIPTS = {"generate": "01_generate", "refine": "02_refine", "sft": "03_sft", "dpo": "04_dpo", "eval": "05_eval"}
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_tiny_and_real_recipes():
    names = {p.stem for p in RECIPES}
    assert {"tiny", "qwen2.5-7b", "mistral-7b"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses_into_every_stage(recipe):
    r = load_recipe(recipe)
    parsed = 0
    for section, script in STAGE_SCRIPTS.items():
        if not (ROOT / f"{script}.py").exists():
            assert section not in r, f"{recipe.name} has a '{section}' section but {script}.py does not exist"
            continue
        cfg = section_config(r, section, load_script(script).Config)
        assert cfg.run_name == r["run_name"]
        parsed += 1
    assert parsed >= 1


def test_overrides_reach_nested_fields():
    module = load_script("01_generate")
    r = load_recipe(ROOT / "configs/tiny.yaml", ["generate.limit=5", "llm.temperature=0", "run_name=x",
                                                 "generate.intent={max_new_tokens: 7}"])
    cfg = section_config(r, "generate", module.Config)
    assert cfg.limit == 5 and cfg.llm.temperature == 0.0 and isinstance(cfg.llm.temperature, float)
    assert cfg.run_name == "x" and cfg.llm.merged(cfg.intent).max_new_tokens == 7
    assert cfg.llm.merged(cfg.intent).model == cfg.llm.model


@pytest.mark.parametrize("override,named", [
    ("generate.limt=3", "generate.limit"), ("llm.modle=x", "llm.modle"), ("nosuch=1", "nosuch"),
    ("generate.intent={temprature: 1}", "temprature"), ("generate.n_agents=two", "generate.n_agents"),
    ("noequals", "noequals"),
])
def test_bad_overrides_name_the_key(override, named):
    module = load_script("01_generate")
    with pytest.raises(ConfigError, match=named.split(".")[-1][:5]):
        r = load_recipe(ROOT / "configs/tiny.yaml", [override])
        cfg = section_config(r, "generate", module.Config)
        cfg.llm.merged(cfg.intent)


def test_unknown_top_level_key_in_a_file(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("run_name: a\ngenerat: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'generat'"):
        load_recipe(p)
    assert "generate" in SECTIONS


CASES = "data/policies/cases.yaml"
DETAILED = "data/policies/detailed.yaml"


def test_the_cada_recipe_names_only_the_case_augmented_codes():
    """The codes are one top-level key that every stage training on them inherits: CADA's recipe
    names cases.yaml there and no stage overrides it; the detailed codes appear only where the
    comparison needs them (the DA arm's run, and the inference-time settings stage 5 evaluates
    under), and stage 5 judges under its own fixed standard, not the run's codes."""
    path = ROOT / "configs/cada-qwen2.5-7b.yaml"
    recipe = load_recipe(path)
    assert recipe["policies"] == CASES and not any("policies" in (recipe.get(s) or {}) for s in SECTIONS)
    configs = {section: section_config(recipe, section, load_script(script).Config)
               for section, script in STAGE_SCRIPTS.items()}
    found = {section: cfg.policies for section, cfg in configs.items() if hasattr(cfg, "policies")}
    assert found == {"generate": CASES, "refine": CASES, "dpo": CASES}
    assert configs["eval"].judge_policies == DETAILED
    assert configs["eval"].policy_prompt == ["none", DETAILED, CASES]
    elsewhere = [a for a in recipe["experiment"]["arms"] if any(DETAILED in o for o in a.get("overrides", []))]
    assert [a["arm"] for a in elsewhere] == ["DA"] and elsewhere[0]["run"]  # in a run of its own
    dpo = configs["dpo"]
    assert dpo.method == "grpo" and dpo.from_sft is False and dpo.judge and dpo.policies_in_prompt
    assert dpo.llm.model == "Qwen/Qwen2.5-7B-Instruct" and dpo.llm.load_in_4bit and dpo.load_in_4bit


def test_top_level_policies_reach_every_stage_and_a_section_may_override():
    recipe = load_recipe(ROOT / "configs/tiny.yaml", ["policies=data/policies/detailed.yaml",
                                                     "dpo.policies=data/policies/cases.yaml"])
    found = {section: section_config(recipe, section, load_script(script).Config).policies
             for section, script in STAGE_SCRIPTS.items() if section in ("generate", "refine", "dpo")}
    assert found == {"generate": DETAILED, "refine": DETAILED, "dpo": CASES}
    assert not hasattr(section_config(recipe, "sft", load_script("03_sft").Config), "policies")  # no codes, no key
    assert not hasattr(section_config(recipe, "eval", load_script("05_eval").Config), "policies")  # judges: judge_policies


@pytest.mark.parametrize("name", ["qwen2.5-7b", "mistral-7b", "cada-qwen2.5-7b"])
def test_real_recipes_train_for_well_over_100_steps(name):
    """Recipe scale: the prompt mix gives stage 4 hundreds of optimiser steps, even if only half the
    prompts end as preference pairs (GRPO samples on every prompt), and stage 3 too."""
    from safecot.training import planned_steps
    recipe = load_recipe(ROOT / f"configs/{name}.yaml")
    sources = recipe["generate"]["prompts"]
    assert isinstance(sources, list) and all(s.get("limit") for s in sources)  # Hub sets are large: each is limited
    prompts = sum(s["limit"] for s in sources)
    sft = section_config(recipe, "sft", load_script("03_sft").Config)
    dpo = section_config(recipe, "dpo", load_script("04_dpo").Config)
    grpo = dpo.method == "grpo"
    assert planned_steps(prompts // 2, sft.batch_size, sft.grad_accum, sft.epochs, sft.max_steps, n_proc=1) >= 150
    assert planned_steps(prompts if grpo else prompts // 2, dpo.batch_size, dpo.grad_accum, dpo.epochs, dpo.max_steps,
                         dpo.num_generations if grpo else 1, n_proc=1) >= 250


def is_real(path: Path) -> bool:
    """A recipe that makes the papers' data: its generator is not the random `tiny` model, and it
    is not the Colab smoke run (colab-*.yaml), whose 0.5B model stands in for every role."""
    return (load_recipe(path).get("llm") or {}).get("model", "tiny") != "tiny" and not path.stem.startswith("colab")


REAL = [p for p in RECIPES if is_real(p)]


def test_the_real_recipes_are_told_apart_from_the_tiny_and_colab_ones():
    names = {p.stem for p in REAL}
    assert {"qwen2.5-7b", "mistral-7b", "cada-qwen2.5-7b"} <= names
    assert not names & {"tiny", "colab-qwen2.5-0.5b"} and not any(n.startswith("tiny") for n in names)


@pytest.mark.parametrize("recipe", REAL, ids=[p.stem for p in REAL])
def test_real_recipes_grade_stage_2_and_rank_beliefs_with_another_model(recipe):
    """Stage 2's grades gate the training rows and pairs, and its belief judge ranks the beliefs
    that make the rejected sides: a generator judging its own text is lenient, so in a real recipe
    both resolve to a model other than `llm.model`."""
    cfg = section_config(load_recipe(recipe), "refine", load_script("02_refine").Config)
    generator = cfg.llm.model
    assert cfg.llm.merged(cfg.grader).model != generator, f"{recipe.name}: refine.grader is the generator {generator}"
    assert cfg.belief_judge_llm().model != generator, f"{recipe.name}: refine.belief_judge is the generator {generator}"


@pytest.mark.parametrize("recipe", REAL, ids=[p.stem for p in REAL])
def test_real_recipes_judge_with_the_fields_classifiers_on_the_same_gpu(recipe):
    """Stage 5's safety, refusal and StrongREJECT verdicts come from the published classifiers
    (numbers comparable with the papers'), stage 2's beliefs are ranked by ShieldGemma as in
    AIDSAFE, and no judge of any stage needs a server: one GPU runs the whole recipe."""
    from safecot.judges import judge_kind
    r = load_recipe(recipe)
    ev = section_config(r, "eval", load_script("05_eval").Config)
    kinds = {task: judge_kind(spec)[0] for task, spec in ev.judges.items()}
    assert kinds == {"safety": "llamaguard3", "refusal": "wildguard", "strongreject": "strongreject", "cot": "llm"}
    from safecot.suites import suite_spec
    jailbreaks = [s for s in map(suite_spec, ev.suites) if s.kind == "jailbreak"]
    assert jailbreaks and all(judge_kind(s.judges.get("safety"))[0] == "harmbench" for s in jailbreaks)
    refine = section_config(r, "refine", load_script("02_refine").Config)
    assert refine.belief_guard() == "shieldgemma"
    llms = [ev.llm.merged(ev.judge), refine.llm.merged(refine.grader), refine.belief_judge_llm()]
    dpo = section_config(r, "dpo", load_script("04_dpo").Config)
    if dpo.method == "grpo":
        llms.append(dpo.llm.merged(dpo.judge))
    assert all(llm.backend == "hf" and llm.load_in_4bit for llm in llms), [(l.model, l.backend) for l in llms]
