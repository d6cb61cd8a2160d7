"""The README cannot drift from the code: the files and functions its map names exist, and every
stage command it (or a stage script's docstring) shows parses into that stage's config."""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import ROOT, load_script
from safecot.config import STAGE_OF, load_recipe, section_config

README = (ROOT / "README.md").read_text()
SCRIPTS = {v: k for k, v in STAGE_OF.items()}  # 01_generate -> generate


def code_refs() -> list[tuple[str, str]]:
    """(file, name) pairs written as `path.py: name, name` or `path.py` + a name column."""
    refs = []
    for path, names in re.findall(r"`((?:safecot/)?[\w/]+\.py): ([\w, ]+)`", README):
        refs += [(path, n.strip()) for n in names.split(",") if n.strip()]
    return refs


def test_readme_map_names_exist():
    refs = code_refs()
    assert len(refs) >= 20
    for path, name in refs:
        file = ROOT / path
        assert file.is_file(), f"README names {path}, which does not exist"
        module = load_script(file.stem) if file.parent == ROOT else __import__(
            path[:-3].replace("/", "."), fromlist=[name])
        assert hasattr(module, name), f"README names {path}: {name}, which does not exist"


@pytest.mark.parametrize("stage", list(SCRIPTS))
def test_stage_sections_name_their_functions(stage):
    """Function names in backticks in a stage's README section are defined by its script."""
    module = load_script(stage)
    section = README.split(f"`{stage}.py`", 1)
    assert len(section) == 2, f"README has no section on {stage}.py"
    body = section[1].split("\n## ", 1)[0]
    # two-column "paper step | code" rows whose code cell starts with a bare function name
    names = re.findall(r"^\| [^|]*\| `(\w+)`[^|]*\|$", body, re.M)
    for name in names:
        assert hasattr(module, name), f"README's {stage} section names {name}, which {stage}.py does not define"


def commands() -> list[list[str]]:
    texts = [README] + [(ROOT / f"{s}.py").read_text().split('"""')[1] for s in SCRIPTS]
    found = []
    for text in texts:
        for line in text.splitlines():
            m = re.search(r"(?:python|\.venv/bin/python|(?:accelerate launch|torchrun)(?: --\S+ \S+)+) (0\d_\w+\.py .*)$", line.strip().strip("`"))
            if m:
                found.append(shlex.split(m.group(1).split("`")[0]))
    return found


def test_every_documented_command_parses():
    cmds = commands()
    assert len(cmds) >= 10
    for argv in cmds:
        stage = argv[0][:-3]
        args = argv[1:]
        config = args[args.index("--config") + 1]
        overrides = [a for a in args[args.index("--config") + 2:] if not a.startswith("--")]
        recipe = load_recipe(ROOT / config, overrides)
        section_config(recipe, SCRIPTS[stage], load_script(stage).Config)
