"""Records and manifests: the files a stage reads and writes under data/runs/<run>/<stage>/.

Records are JSON Lines with a stable `id`. A stage appends each finished record as one line and
flushes it to disk, so a kill loses at most the work in flight; a torn last line (killed
mid-write) is cut off on the next start, and ids already written are skipped, so a rerun neither
loses nor duplicates records. Every stage folder has a `manifest.json`, written atomically.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

STAGES = ("01_generate", "02_refine", "03_sft", "04_dpo", "05_eval")
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "openai", "vllm")


class InputError(ValueError):
    """Bad input the user can fix: the message names the file, line and field."""


def stage_dir(cfg, stage: str) -> Path:
    assert stage in STAGES, stage
    return Path(cfg.runs_dir) / cfg.run_name / stage


# ---- reading ---------------------------------------------------------------------------------

def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    return [row for _, row in numbered_rows(path, required)]


def read_csv(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    return [row for _, row in numbered_rows(path, required)]


def numbered_rows(path: str | Path, required: Iterable[str] = ()) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a .jsonl or .csv file, so errors can name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
        else:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object")
                rows.append((n, row))
    for n, row in rows:
        _check_fields(row, required, f"{path}:{n}")
    return rows


def _check_fields(row: dict, required: Iterable[str], where: str) -> None:
    for key in required:
        if key not in row:
            raise InputError(f"{where}: missing field '{key}'")


# ---- writing ---------------------------------------------------------------------------------

class RecordWriter:
    """Append-only JSONL file that survives kills: see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            self._recover()
        self._f = self.path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # keep whole lines only; a torn tail is work in flight
        if good < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good)
        for n, line in enumerate(data[:good].decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    self.done[row["id"]] = row
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    # Only a torn last line is ours to cut; a bad whole line was edited by hand.
                    raise InputError(f"{self.path}:{n}: not a record ({type(e).__name__}); "
                                     "fix or delete the line, or use --overwrite") from None

    def check_inputs(self, inputs: list[dict], fields: tuple[str, ...]) -> None:
        """Finished records must still match the input rows they were made from (same id, same
        `fields`): an earlier stage rerun with --overwrite, or an edited prompt file, would
        otherwise mix two experiments in one file."""
        changed = [r["id"] for r in inputs if r["id"] in self.done
                   and any(self.done[r["id"]].get(f) != r.get(f) for f in fields)]
        if changed:
            raise InputError(f"{self.path}: {len(changed)} finished records (first: id {changed[0]}) no longer match "
                             f"their input ({', '.join(fields)} changed); use --overwrite or another run_name")

    def write(self, record: dict) -> None:
        if record["id"] in self.done:
            return
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[record["id"]] = record

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write a whole file atomically (for derived files that are cheap to recompute)."""
    tmp = Path(path).with_suffix(".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def prepare_stage(out: Path, overwrite: bool) -> Path:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def batched(items: list, size: int) -> Iterator[list]:
    size = size or len(items) or 1
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---- manifests -------------------------------------------------------------------------------

def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def folder_hash(path: str | Path) -> str:
    """One hash over every file of a folder (names and contents): an edited template shows."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_hash(f)}\0".encode())
    return h.hexdigest()[:16]


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else ""
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or None, "dirty": dirty}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class Manifest:
    """What a stage did: config, inputs and outputs with hashes, counters, timings, versions.

    It is written at the start (status "running") and at the end ("complete"), so a later stage
    can tell a finished stage from an interrupted one.
    """

    def __init__(self, out: Path, stage: str, config: dict, resume_ignores: tuple = ()):
        self.path = Path(out) / "manifest.json"
        # Compared as it reads back from the file: a YAML {false: harmful} key is "false" there.
        config = json.loads(json.dumps(config, default=str))
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        if previous.get("config"):
            # Resuming under another config would mix two experiments in one file.
            changed = sorted(k for k in set(config) | set(previous["config"])
                             if k not in resume_ignores and config.get(k) != previous["config"].get(k))
            if changed:
                raise InputError(f"{out}: existing outputs were made with a different config "
                                 f"({', '.join(changed)}); use --overwrite or another run_name")
        self.data = {
            "stage": stage, "status": "running", "argv": sys.argv,
            "config": config, "seed": config.get("seed"),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None, "sessions": previous.get("sessions", 0) + 1,
            "git": git_state(), "versions": versions(),
            "inputs": {}, "outputs": {}, "counts": {}, "timings": {},
        }
        self._t0 = time.perf_counter()
        self.save()

    def input(self, name: str, path: str | Path, rows: int | None = None, **info) -> None:
        """A local file or folder with its hash; a Hub dataset (`hf:<id>`) by id, split and row count."""
        digest = None if str(path).startswith("hf:") else folder_hash(path) if Path(path).is_dir() else file_hash(path)
        self.data["inputs"][name] = {"path": str(path), "sha256": digest, "rows": rows, **info}

    def output(self, name: str, path: Path) -> None:
        self.data["outputs"][name] = {"path": str(path), "sha256": file_hash(path), "rows": count_lines(path)}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, self.path)

    def finish(self, **counts) -> None:
        self.data["counts"].update(counts)
        self.data["timings"]["wall_s"] = round(time.perf_counter() - self._t0, 3)
        self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.data["status"] = "complete"
        self.save()


def require_complete(stage_out: Path, what: str) -> dict:
    """The manifest of an earlier stage, or a clear error if that stage is missing or unfinished."""
    path = Path(stage_out) / "manifest.json"
    if not path.exists():
        raise InputError(f"{stage_out}: no {what} output here; run that stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("status") != "complete":
        raise InputError(f"{stage_out}: {what} did not finish (status {manifest.get('status')}); rerun it to complete it")
    return manifest
