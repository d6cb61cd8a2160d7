"""Shared fixtures: offline mode, the tiny model built once per session outside the repo, a
scripted backend for orchestration tests, loaders for the numbered stage scripts, and the `slow`
mark (`pytest -m "not slow"` skips the tests over ~5 s)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.chdir(ROOT)  # recipes name data files relative to the repository root
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safecot import backends  # noqa: E402
from safecot.backends import Backend, Generation  # noqa: E402
from safecot.config import load_recipe, section_config  # noqa: E402


def pytest_configure(config):
    # `pytest -m "not slow"` skips these while you work; `make test` runs everything.
    config.addinivalue_line("markers", "slow: a full stage run or training on the tiny model (over ~5 s)")


def load_script(name: str):
    """Import a stage script (01_generate.py ...) as a module, despite its leading digit."""
    path = ROOT / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def tiny_model_dir(tmp_path_factory):
    if "SAFECOT_TINY_DIR" not in os.environ:
        os.environ["SAFECOT_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny") / "model")
    from safecot.tiny import ensure_tiny
    return ensure_tiny()


@pytest.fixture(autouse=True)
def fresh_backends():
    backends.release_backends()
    yield
    backends.release_backends()


class ScriptedBackend(Backend):
    """Answers each chat with `script(chat, model)`; a test sets the script. Raising from the
    script simulates a crash mid-run. Counts batched calls like the real backends."""

    script = staticmethod(lambda chat, model: "")
    calls_log: list = []

    def __init__(self, cfg):
        self.model = cfg.model

    def generate(self, chats, cfg, schema=None):
        self.calls += 1
        ScriptedBackend.calls_log.append((self.model, len(chats)))
        out = []
        for chat in chats:
            reply = ScriptedBackend.script(chat, self.model)
            out.append(reply if isinstance(reply, Generation) else Generation(reply, len(reply.split())))
        return out

    def complete(self, prompts, cfg, candidates=None, special_tokens=True):
        """Raw prompts (the guard classifiers) reach the same script as a str instead of a chat; a
        reply with scores is a Generation(text, scores={token: logprob})."""
        self.calls += 1
        ScriptedBackend.calls_log.append((self.model, len(prompts)))
        return [r if isinstance(r, Generation) else Generation(r, len(r.split()))
                for r in (ScriptedBackend.script(p, self.model) for p in prompts)]


backends.BACKENDS["scripted"] = ScriptedBackend


@pytest.fixture
def scripted():
    """Set `scripted.script = fn(chat, model) -> str`; calls are in `scripted.calls_log`."""
    ScriptedBackend.calls_log = []
    yield ScriptedBackend
    ScriptedBackend.script = staticmethod(lambda chat, model: "")


def make_config(script: str, section: str, tmp_path: Path, *overrides: str, recipe: str = "configs/tiny.yaml"):
    module = load_script(script)
    r = load_recipe(ROOT / recipe, [f"runs_dir={tmp_path}", *overrides])
    return module, section_config(r, section, module.Config)


@pytest.fixture(scope="session", autouse=True)
def repository_runs_untouched():
    """Tests write only under their own tmp folders, never into a user's data/runs/."""
    runs = ROOT / "data" / "runs"

    def snapshot():
        return sorted((str(p), p.stat().st_mtime_ns) for p in runs.rglob("*")) if runs.exists() else []
    before = snapshot()
    yield
    assert snapshot() == before, "a test wrote into data/runs/; give it runs_dir=tmp_path"
