"""Recipes: one YAML file per experiment, a section per stage, parsed into the stage's dataclass.

    run_name: tiny          # names data/runs/<run_name>/
    seed: 0
    llm: {backend: hf, model: tiny}   # the default LLM for every agent role
    generate: {...}         # -> 01_generate.Config
    refine: {...}           # -> 02_refine.Config, and so on

Every stage dataclass has the common fields `run_name`, `seed`, `runs_dir` (and `llm` where it
uses agents); they are filled from the recipe's top level. Unknown keys are errors that name the
key, so recipes cannot drift from the code. Command-line overrides are `key=value` or
`section.key=value` (values parsed as YAML: `generate.limit=8`, `llm.temperature=0.2`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

COMMON_KEYS = ("run_name", "seed", "runs_dir", "llm")
SECTIONS = ("generate", "refine", "sft", "dpo", "eval")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file and key."""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    for key in recipe:
        if key not in COMMON_KEYS + SECTIONS:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(COMMON_KEYS + SECTIONS)})")
    for item in overrides:
        apply_override(recipe, item)
    recipe["_source"] = str(path)
    return recipe


def apply_override(recipe: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    parts = key.split(".")
    if parts[0] not in COMMON_KEYS + SECTIONS:
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


def from_dict(cls: type, values: dict, where: str, source: str = "recipe") -> Any:
    """Instantiate a (possibly nested) dataclass, refusing unknown keys with their dotted name."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: {', '.join(known)})")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}", source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {where}: {e}") from e


def _coerce(hint, value, where, source):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping")
        return from_dict(hint, value, where, source)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, source) if len(inner) == 1 else value
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be a list")
        return [_coerce(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and value is not None and not isinstance(value, hint):
        raise ConfigError(f"{source}: '{where}' should be {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_args(section: str, cls: type, doc: str | None = None, argv: list[str] | None = None):
    """The command line every stage shares: --config RECIPE [--overwrite | --skip-complete] [key=value ...]."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe in configs/, e.g. configs/tiny.yaml")
    parser.add_argument("--overwrite", action="store_true", help="delete this stage's outputs and start over")
    parser.add_argument("--skip-complete", action="store_true",
                        help="do nothing if this stage's manifest says complete (make reproduce uses it)")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config, args.overrides)
    return section_config(recipe, section, cls), args


def run_cli(section: str, cls: type, main, doc: str | None = None) -> None:
    """Parse, run `main(cfg, overwrite=...)`, and turn known failures into one clear line."""
    from .backends import BackendError
    from .records import InputError, stage_dir

    try:
        cfg, args = parse_args(section, cls, doc)
        out = stage_dir(cfg, STAGE_OF[section])
        if args.skip_complete and not args.overwrite and is_complete(out):
            print(f"skip: {out} is complete")
            return
        out = main(cfg, overwrite=args.overwrite)
    except (ConfigError, InputError, BackendError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished records are saved; rerun the same command to continue")
    print(f"done: {out}")


STAGE_OF = {"generate": "01_generate", "refine": "02_refine", "sft": "03_sft", "dpo": "04_dpo", "eval": "05_eval"}


def is_complete(stage_out: Path) -> bool:
    import json
    path = Path(stage_out) / "manifest.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"
