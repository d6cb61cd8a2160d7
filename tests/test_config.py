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


def test_the_cada_recipe_names_only_the_case_augmented_codes():
    """The codes are one top-level key that every stage using them inherits: CADA's recipe names
    cases.yaml there, no stage overrides it, and no other policy file appears anywhere (comments
    included); every stage's config resolves to it."""
    path = ROOT / "configs/cada-qwen2.5-7b.yaml"
    assert set(re.findall(r"data/policies/[\w./-]+", path.read_text())) == {CASES}
    recipe = load_recipe(path)
    assert recipe["policies"] == CASES and not any("policies" in (recipe.get(s) or {}) for s in SECTIONS)
    configs = {section: section_config(recipe, section, load_script(script).Config)
               for section, script in STAGE_SCRIPTS.items()}
    found = {section: cfg.policies for section, cfg in configs.items() if hasattr(cfg, "policies")}
    assert found == {"generate": CASES, "refine": CASES, "dpo": CASES, "eval": CASES}
    dpo = configs["dpo"]
    assert dpo.method == "grpo" and dpo.from_sft is False and dpo.judge and dpo.policies_in_prompt
    assert dpo.llm.model == "Qwen/Qwen2.5-7B-Instruct" and dpo.llm.load_in_4bit and dpo.load_in_4bit


def test_top_level_policies_reach_every_stage_and_a_section_may_override():
    recipe = load_recipe(ROOT / "configs/tiny.yaml", ["policies=data/policies/detailed.yaml",
                                                     "eval.policies=data/policies/cases.yaml"])
    found = {section: section_config(recipe, section, load_script(script).Config).policies
             for section, script in STAGE_SCRIPTS.items() if section != "sft"}
    assert found == {"generate": "data/policies/detailed.yaml", "refine": "data/policies/detailed.yaml",
                     "dpo": "data/policies/detailed.yaml", "eval": CASES}
    assert not hasattr(section_config(recipe, "sft", load_script("03_sft").Config), "policies")  # no codes, no key


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
