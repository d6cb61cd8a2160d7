"""Recipes parse into every stage's dataclass; overrides and unknown keys behave."""
from __future__ import annotations

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
