"""Recipes: one YAML file per experiment, a section per stage, parsed into the stage's dataclass.

    extends: tiny.yaml      # optional: a parent recipe (beside this one) that this one changes
    run_name: tiny          # names data/runs/<run_name>/
    seed: 0
    llm: {backend: hf, model: tiny}   # the default LLM for every agent role
    policies: data/policies/cases.yaml  # the codes every stage reasons or judges under
    generate: {...}         # -> 01_generate.Config
    refine: {...}           # -> 02_refine.Config, and so on

Every stage dataclass has the common fields `run_name`, `seed`, `runs_dir` (and `llm` where it
uses agents, `policies` where it uses the codes); they are filled from the recipe's top level, and
a stage's section may still override one (`dpo: {policies: ...}`), which a recipe should need
rarely: stages that disagree on the codes make a run that trains on another set than it made
data with. Stage 5 judges under its own fixed standard, `eval.judge_policies`, not the run's codes.
Unknown keys are errors that name the key, so recipes cannot drift from the code. Command-line overrides are `key=value` or
`section.key=value` (values parsed as YAML: `generate.limit=8`, `llm.temperature=0.2`).
The command line itself is safecot/stage.py's; building typed dataclasses is safecot/dataclass_io.py's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .dataclass_io import ConfigError, from_dict  # noqa: F401 (re-exported: recipes raise ConfigError)
from .records import InputError, read_text

COMMON_KEYS = ("run_name", "seed", "runs_dir", "llm", "policies")
SECTIONS = ("generate", "refine", "sft", "dpo", "eval")
EXPERIMENT = ("experiment",)  # a paper's arms, read by safecot/experiments.py, not by any stage


def load_recipe(path: str | Path, overrides: list[str] = (), _depth: int = 0) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        recipe = yaml.safe_load(read_text(path)) or {}
    except InputError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    if "extends" in recipe:  # a variant names its parent and says only what differs
        parent = path.parent / str(recipe.pop("extends"))
        if parent.resolve() == path.resolve() or _depth > 8:
            raise ConfigError(f"{path}: 'extends' goes round in a circle")
        recipe = merged(load_recipe(parent, _depth=_depth + 1), recipe)
        recipe.pop("_source", None)
    for key in recipe:
        if key not in COMMON_KEYS + SECTIONS + EXPERIMENT:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(COMMON_KEYS + SECTIONS + EXPERIMENT)})")
    for item in overrides:
        apply_override(recipe, item)
    recipe["_source"] = str(path)
    return recipe


def merged(parent: dict, child: dict) -> dict:
    """`child` over `parent`, mapping by mapping; a child's list or value replaces the parent's."""
    out = dict(parent)
    for key, value in child.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(recipe: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    parts = key.split(".")
    if parts[0] not in COMMON_KEYS + SECTIONS + EXPERIMENT:
        raise ConfigError(f"override '{item}': unknown key '{parts[0]}'")
    node = recipe
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def section_config(recipe: dict, section: str, cls: type) -> Any:
    """Build the stage dataclass `cls` from the common keys plus the recipe's `section`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: recipe[k] for k in COMMON_KEYS if k in recipe and k in fields}
    body = recipe.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{recipe.get('_source', 'recipe')}: section '{section}' must be a mapping")
    values.update(body)
    return from_dict(cls, values, where=section, source=recipe.get("_source", "recipe"))


STAGE_OF = {"generate": "01_generate", "refine": "02_refine", "sft": "03_sft", "dpo": "04_dpo", "eval": "05_eval"}

