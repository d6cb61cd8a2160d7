"""The plumbing every stage script shares, so that its `main` reads as the method: the command line,
the seed, the stage folder (created, cleared by --overwrite, locked while this process writes it),
its manifest, the partial-status tail, and the trained model an earlier stage left.

    def main(cfg: Config, overwrite: bool = False) -> Path:
        rows = load_inputs(cfg)                                    # bad input fails before any output
        with open_stage(cfg, "01_generate", overwrite, resume_ignores=("limit",)) as st:
            st.manifest.input("prompts", cfg.prompts, len(rows))
            if st.unchanged():                                     # finished before, same config and inputs:
                return st.out                                      # nothing is redone or rewritten
            missing = the_method(cfg, rows, st.out, st.manifest)  # write records, count what failed
            st.finish(missing=missing, what="prompts", **counts)  # "partial" + a rerun warning if any failed
        return st.out

    if __name__ == "__main__":
        run_cli("generate", Config, main, __doc__)

The lock: while a process writes a stage folder it holds an exclusive flock on `<folder>/.lock`,
which names it (pid, host, start time, command). A second process on the same run and stage stops
with one line naming the holder instead of writing the same records again. The OS drops the lock
when the holder exits or is killed, so a kill -9 never leaves a stale lock behind; leaving the
`with` block drops it too, so one process (a test, a notebook) may run the same stage again. Locks
are per machine: processes on two hosts sharing a network folder may not see each other's.

Reruns: a stage whose manifest says complete, rerun with the same config and inputs and with its
outputs as it wrote them, says so and stops (`Stage.unchanged`) without touching a file; otherwise
it carries on where it stopped, and its timings and session counts add up. A stage that stops on an
error leaves its manifest saying "failed" (or "interrupted") with the reason, never "running".
When the stage ends, the command line prints a short summary (records, failures, truncations,
where the outputs are) and the next command.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .config import STAGE_OF, ConfigError, load_recipe, section_config
from .records import InputError, Manifest, require_complete, stage_dir

LOCK = ".lock"


# ---- the command line ------------------------------------------------------------------------

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


def run_cli(section: str, cls: type, main, doc: str | None = None, argv: list[str] | None = None) -> None:
    """Parse, run `main(cfg, overwrite=...)`, turn known failures into one clear line, and end with
    the stage's summary and the next command."""
    main_thread = threading.current_thread() is threading.main_thread()
    # A job scheduler's or a notebook's SIGTERM ends the stage like Ctrl-C: the manifest says "interrupted".
    before = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        _run(section, cls, main, doc, argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


def _run(section: str, cls: type, main, doc: str | None, argv: list[str] | None) -> None:
    from .backends import BackendError

    try:
        cfg, args = parse_args(section, cls, doc, argv)
        out = stage_dir(cfg, STAGE_OF[section])
        if args.skip_complete and not args.overwrite and is_complete(out):
            print(f"skip: {out} is complete")
            return
        out = main(cfg, overwrite=args.overwrite)
    except (ConfigError, InputError, BackendError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f"error: {e.filename or 'a run file'}: {e.strerror} (check the folder's permissions and free space, "
                 "or set runs_dir to a writable folder)")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished records are saved; rerun the same command to continue")
    if int(os.environ.get("RANK", "0")) == 0:  # the other processes of `accelerate launch` wrote nothing to sum up
        print("\n".join(summary(Path(out), section, args)))


def _nonzero(value) -> bool:
    if isinstance(value, dict):
        return any(_nonzero(v) for v in value.values())
    return bool(value)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


NEXT = {"generate": "02_refine", "refine": "03_sft", "sft": "04_dpo", "dpo": "05_eval"}


def summary(out: Path, section: str, args) -> list[str]:
    """A few lines on what the stage left: status, records, failures, truncations, outputs, and the
    command that comes next (the same recipe and overrides)."""
    path = out / "manifest.json"
    if not path.is_file():
        return [f"done: {out}"]
    m = json.loads(path.read_text())
    counts, timings = m.get("counts") or {}, m.get("timings") or {}
    lines = [f"{m.get('stage', out.name)}: {m.get('status')} in {timings.get('last_session_s', 0):.1f} s "
             f"({m.get('sessions', 1)} session(s), {timings.get('wall_s', 0):.1f} s in all) -> {out}"]
    made = {k: counts[k] for k in ("prompts", "records", "sft_rows", "sft_og_rows", "dpo_rows", "examples", "pairs",
                                   "prompts_used", "models", "items", "steps", "planned_steps", "train_loss")
            if isinstance(counts.get(k), (int, float)) and not isinstance(counts.get(k), bool)}
    if made:
        lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else
                                      f"{k.replace('_', ' ')} {v}" for k, v in made.items()))
    truncated = {k: v for k, v in counts.items() if "truncated" in k and _nonzero(v)}
    if truncated:
        lines.append("  truncated: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in truncated.items()))
    failures = counts.get("failures") or {}
    if failures:
        from .scheduler import failure_lines
        lines += ["  failed requests:"] + [f"    {line}" for line in failure_lines(failures)]
    outputs = [Path(o["path"]).name for o in (m.get("outputs") or {}).values() if o.get("path")]
    if outputs:
        lines.append(f"  outputs: {', '.join(outputs)}")
    if m.get("status") == "partial":
        lines.append("  some items failed: rerun the same command to retry them")
    again = ["--config", args.config, *args.overrides]
    if section in NEXT:
        lines.append(f"next: python {NEXT[section]}.py {shlex.join(again)}")
    elif (out / "report.md").is_file():
        lines.append(f"next: read {out / 'report.md'}; the notebooks draw every stage (RUN_DIR={out.parent})")
    return lines


def is_complete(stage_out: Path) -> bool:
    path = Path(stage_out) / "manifest.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def set_seed(seed: int) -> None:
    """Python, NumPy and torch (all devices) seeded alike, as trl's scripts do."""
    import transformers
    transformers.set_seed(seed)


def seed_agents(seed: int, agents) -> None:
    """Seed what the agents sample with. A server samples with its own seed: only local models
    need torch's generators seeded, so a stage whose agents are all `openai` skips importing
    transformers (seconds on a small machine) and seeds Python's `random` alone."""
    import random

    from .scheduler import concurrent
    random.seed(seed)
    if not all(concurrent(a) for a in agents):
        set_seed(seed)


# ---- the stage folder ------------------------------------------------------------------------

@contextmanager
def lock_stage(out: Path) -> Iterator[Path]:
    """Hold `<out>/.lock` exclusively for the block, or stop with an InputError naming the holder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out} is being written by another process ({holder(out)}); wait for it to finish "
                             "or stop it, then rerun") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield out
        finally:
            os.ftruncate(fd, 0)  # the lock file outlives us; it names no one once we let go
    finally:
        os.close(fd)             # closing drops the flock (so does the process dying)


def holder(out: Path) -> str:
    """Who holds `<out>/.lock`, in words, as the holder wrote it."""
    try:
        h = json.loads((Path(out) / LOCK).read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {' '.join(map(str, h['argv']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has only just started"


def clear_stage(out: Path) -> None:
    """--overwrite: everything in the folder but the lock we hold (a new lock file would be another lock)."""
    import shutil
    for p in Path(out).iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@dataclasses.dataclass
class Stage:
    """A stage folder this process writes: `out`, and its `manifest` (None on the non-main processes
    of a multi-process training run, which write nothing but compare like the main one)."""
    out: Path
    record: Manifest                    # this session's manifest (on every process)
    main_process: bool = True

    @property
    def manifest(self) -> Manifest | None:
        return self.record if self.main_process else None

    def input(self, name: str, path, rows: int | None = None, **info) -> None:
        self.record.input(name, path, rows, **info)

    def unchanged(self) -> bool:
        """True, with one line, when the stage finished before under exactly this config and these
        inputs (record them first) and its outputs are as it wrote them: the caller returns, and no
        file is touched. Otherwise the manifest says "running" from here on."""
        if self.record.up_to_date():
            if self.main_process:
                print(f"{self.out}: complete, with the same config and inputs; nothing to redo "
                      "(--overwrite starts it over)")
            return True
        self.record.start()
        return False

    def finish(self, missing: int = 0, what: str = "records", **counts) -> None:
        """The manifest's end: "complete", or "partial" with a warning when `missing` items (prompts,
        records, generations) failed and a rerun of the same command would retry them."""
        if self.manifest is None:
            return
        self.manifest.finish(status="partial" if missing else "complete", missing=missing, **counts)
        if missing:
            print(f"warning: {missing} {what} failed on the backend; rerun the same command to retry them")


@contextmanager
def open_stage(cfg, stage: str, overwrite: bool = False, config: dict | None = None, resume_ignores: tuple = (),
               seed: bool = True, main_process: bool = True) -> Iterator[Stage]:
    """`<runs_dir>/<run_name>/<stage>/` locked for the block, cleared first with `overwrite`, with a
    Manifest of `config` (default: the whole cfg) that refuses to resume under another config except
    for `resume_ignores`; the seed set from cfg.seed. An error inside the block leaves the manifest
    "failed" with its reason (if this session had started writing). With `main_process=False` (the
    other processes of `accelerate launch`): no lock, no clearing, a manifest that is never written."""
    out = stage_dir(cfg, stage)
    if seed:
        set_seed(cfg.seed)
    config = dataclasses.asdict(cfg) if config is None else config
    if not main_process:
        out.mkdir(parents=True, exist_ok=True)
        yield Stage(out, Manifest(out, stage, config, resume_ignores, write=False), main_process=False)
        return
    with lock_stage(out):
        if overwrite:
            clear_stage(out)
        manifest = Manifest(out, stage, config, resume_ignores)
        try:
            yield Stage(out, manifest)
        except BaseException as e:
            if manifest.started and manifest.data["status"] == "running":
                interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
                manifest.fail(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                              status="interrupted" if interrupted else "failed")
            raise


def done_before(cfg, stage: str, inputs: dict, config: dict | None = None, resume_ignores: tuple = ()) -> bool:
    """`Stage.unchanged` before anything heavy loads (torch, a tokenizer, a model): True, with its one
    line, when the stage finished before under this config, from these inputs ({name: (path, rows)}),
    with its outputs as it wrote them. Nothing is locked or written: it only spares a rerun the
    seconds of imports, and the stage's own check under the lock still decides."""
    out = stage_dir(cfg, stage)
    if not (out / "manifest.json").is_file():
        return False
    try:
        record = Manifest(out, stage, dataclasses.asdict(cfg) if config is None else config, resume_ignores, write=False)
    except InputError:
        return False  # a changed config: the stage itself says which keys
    for name, (path, rows) in inputs.items():
        record.input(name, path, rows)
    return Stage(out, record, main_process=int(os.environ.get("RANK", "0")) == 0).unchanged()


# ---- what earlier stages left ----------------------------------------------------------------

def trained_model(folder: Path, adapter: str | Path | None = None, what: str | None = None) -> tuple[str, Path]:
    """(base model, adapter folder) of a finished 03_sft or 04_dpo folder, as its manifest's `model`
    names them (older manifests: `base_model`, then the config's `model` / `llm.model`); `adapter`
    replaces the recorded one. Stops with one line if the stage did not finish or left no adapter."""
    folder = Path(folder)
    manifest = require_complete(folder, what or f"stage {folder.name}")
    model, cfg = manifest.get("model") or {}, manifest.get("config") or {}
    bases = (model.get("base"), manifest.get("base_model"), cfg.get("base_model"), cfg.get("model"),
             (cfg.get("llm") or {}).get("model"))
    base = next((b for b in bases if isinstance(b, str) and b), None)
    if base is None:
        raise InputError(f"{folder}/manifest.json: names no base model")
    recorded = Path(model["adapter"]) if model.get("adapter") else None
    adapter = Path(adapter) if adapter else recorded if recorded and recorded.is_dir() else folder / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{folder}: no LoRA adapter at {adapter} (adapter_config.json missing); rerun that stage")
    return base, adapter
