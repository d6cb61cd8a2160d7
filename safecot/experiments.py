"""A paper's table from one command: the arms of its main table are recipe data, run by the same
stage scripts, and the table is written from stage 5's results.

A recipe with an `experiment:` section lists the arms (safecot/experiments.py: Arm):

    experiment:
      paper: aidsafe                 # data/papers/aidsafe.yaml: the columns and the reported figures
      reported: Qwen2.5-7B           # whose figures stand beside ours
      arms:
        - {arm: Base}                                          # the model as it is
        - {arm: SFT_OG, run: og, stages: [03_sft], model: 03_sft,
           overrides: ["sft.source_run={run_name}", sft.dataset=sft_og]}
        - {arm: SFT_DB, model: 03_sft}                         # this run's own stage 3
        - {arm: DPO, model: 04_dpo}

`python -m safecot.experiments configs/aidsafe-qwen2.5-7b.yaml [key=value ...]` (what `make
reproduce` runs) then, as one commented pipeline would:
  1. runs the run's own stages (`experiment.stages`, 01-04 by default);
  2. runs each arm that needs a training run of its own in `<run_name>-<run>`, with the arm's
     overrides (`{run_name}` is the main run's name, so an arm reads the shared stage 1-2 data);
  3. runs stage 5 once on the main run with every arm as a model under test (`eval.models`), so all
     arms are generated and judged under one protocol, in every inference-time setting the recipe
     gives (`eval.policy_prompt`);
  4. writes 05_eval/paper_table.md and .csv (safecot/papers.py) from results.json: a row per arm
     (and setting), a column per benchmark of the paper with n and its interval, and the paper's
     figure beside ours where METHOD.md has one; AIDSAFE adds its CoT-quality table.
Every command is printed before it runs and can be run by hand (`--dry-run` prints them all). A
stage that finished before with the same config and inputs says so and changes nothing, so the
command can be rerun after an interruption, or after adding an arm, at little cost. Extra
`key=value` overrides go to every stage of every arm (the tests shrink the tiny variants so).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_recipe
from .dataclass_io import from_dict
from .records import InputError

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("01_generate", "02_refine", "03_sft", "04_dpo")


@dataclass
class Arm:
    arm: str                            # the row's name in the paper's table (Base, SFT_OG, SFT_DB, DPO ...)
    model: str | None = None            # the stage whose adapter is evaluated (03_sft | 04_dpo); none: the base model
    run: str | None = None              # a training run of its own, <run_name>-<run>; none: the main run
    stages: list = field(default_factory=list)      # the stages that run needs (its own run only)
    overrides: list = field(default_factory=list)   # key=value for those stages; {run_name} = the main run's name
    llm: dict = field(default_factory=dict)         # LLM overrides when it is evaluated (another base model ...)


@dataclass
class Experiment:
    paper: str                          # data/papers/<paper>.yaml: the table's columns and reported figures
    arms: list = field(default_factory=list)        # Arm mappings, in the table's row order
    reported: str | None = None         # which of the paper's models to print beside ours (none: no column)
    stages: list = field(default_factory=lambda: list(TRAINING))  # the main run's own stages, in order
    suites: dict = field(default_factory=dict)      # a paper column -> this recipe's suite, where they differ

    def __post_init__(self):
        self.arms = [a if isinstance(a, Arm) else from_dict(Arm, a, where="experiment.arms") for a in self.arms]
        names = [a.arm for a in self.arms]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"experiment.arms: give each arm once, got {names}")
        for a in self.arms:
            if a.model not in (None, "03_sft", "04_dpo"):
                raise ValueError(f"experiment.arms '{a.arm}': model must be 03_sft, 04_dpo or absent, got {a.model!r}")
            if any(s not in TRAINING for s in [*a.stages, *self.stages]):
                raise ValueError(f"experiment: stages are among {', '.join(TRAINING)}")
            if a.stages and not a.run:
                raise ValueError(f"experiment.arms '{a.arm}': stages of its own need a run of its own (run: <name>)")
            if a.run and not a.stages:
                raise ValueError(f"experiment.arms '{a.arm}': run '{a.run}' names no stages to run")


def load_experiment(recipe: dict) -> Experiment:
    body = recipe.get("experiment")
    if not isinstance(body, dict):
        raise ConfigError(f"{recipe.get('_source', 'recipe')}: no experiment section (a recipe that reproduces a paper's "
                          "table lists its arms there)")
    return from_dict(Experiment, body, where="experiment", source=recipe.get("_source", "recipe"))


def arm_run(main: str, arm: Arm) -> str:
    return f"{main}-{arm.run}" if arm.run else main


def eval_models(recipe: dict, exp: Experiment) -> list[dict]:
    """stage 5's `eval.models`: each arm under its own label, from its run's stage (or the base model)."""
    models = []
    for a in exp.arms:
        entry = {"label": a.arm}
        if a.model:
            entry["from_run"] = f"{arm_run(recipe['run_name'], a)}/{a.model}"
        if a.llm:
            entry["llm"] = a.llm
        models.append(entry)
    return models


def plan(config: str, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """[(what, command)]: every stage of the main run, of every arm's own run, then stage 5."""
    recipe = load_recipe(config, overrides)
    main = recipe.get("run_name")
    if not main:
        raise ConfigError(f"{config}: a recipe needs a run_name")

    def base(stage: str) -> list[str]:
        return [shown(sys.executable), f"{stage}.py", "--config", shown(config), *overrides]

    if "experiment" not in recipe:  # a plain recipe: its five stages, in order
        return [(f"{main}: {s}", base(s)) for s in (*TRAINING, "05_eval")]
    exp = load_experiment(recipe)
    steps = [(f"{main}: {s}", base(s)) for s in exp.stages]
    for a in exp.arms:
        if a.run:
            extra = [o.replace("{run_name}", main) for o in a.overrides] + [f"run_name={arm_run(main, a)}"]
            steps += [(f"arm {a.arm} ({arm_run(main, a)}): {s}", base(s) + extra) for s in a.stages]
    models = json.dumps(eval_models(recipe, exp))  # JSON is YAML: the override parses as it is
    steps.append((f"{main}: 05_eval, every arm", base("05_eval") + [f"eval.models={models}"]))
    return steps


def shown(path: str) -> str:
    """A path as the commands give it: relative to the repository, where they run."""
    full = Path(path).absolute()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def run_command(cmd: list[str]) -> int:
    """One stage command, as a process of its own in the repository (as a user would type it)."""
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str] | None = None, run=run_command) -> Path | None:
    """`run(cmd) -> exit code` runs one stage command (the tests pass one that runs it in-process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a recipe with an experiment section, e.g. configs/tiny-aidsafe.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value for every stage of every arm")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table-only", action="store_true", help="only write the paper table from stage 5's results")
    args = parser.parse_args(argv)
    try:
        steps = plan(args.config, args.overrides)
        recipe = load_recipe(args.config, args.overrides)
        exp = load_experiment(recipe) if "experiment" in recipe else None
    except (ConfigError, InputError) as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        for what, cmd in steps:
            print(f"# {what}\n{shlex.join(cmd)}")
        return None
    if not args.table_only:
        for i, (what, cmd) in enumerate(steps, 1):
            print(f"\n== [{i}/{len(steps)}] {what}\n$ {shlex.join(cmd)}", flush=True)
            if run(cmd) != 0:
                sys.exit(f"error: {what} failed (the command above); fix it and rerun: finished stages are kept")
    if exp is None:
        return None
    from .papers import write_paper_table
    out = ROOT / recipe.get("runs_dir", "data/runs") / recipe["run_name"] / "05_eval"  # an absolute runs_dir stays itself
    try:
        table = write_paper_table(out, exp, recipe)
    except InputError as e:
        sys.exit(f"error: {e}")
    print(f"\npaper table: {table}\n{table.read_text(encoding='utf-8')}")
    return table


if __name__ == "__main__":
    main()
