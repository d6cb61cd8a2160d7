"""Records and manifests: the files a stage reads and writes under data/runs/<run>/<stage>/.

Records are JSON Lines with a stable `id`. A stage appends each finished record as one line and
flushes it to disk, so a kill loses at most the work in flight; a torn last line (killed
mid-write) is cut off on the next start, and ids already written are skipped, so a rerun neither
loses nor duplicates records. Each written record carries `record_hash`, a hash of its content, so a
record edited by hand after it was written is refused when the file is read again (a rerun, or the
next stage) instead of passing for the stage's own work. Every stage folder has a `manifest.json`,
written atomically; its timings and per-session counts add up over the sessions that made the folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
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


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a byte that is not UTF-8 stops with the file and line it is on."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def numbered_rows(path: str | Path, required: Iterable[str] = ()) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a .jsonl or .csv file, so errors can name the line. The file
    must be UTF-8: a byte that is not stops with the line it is on."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows = []
    f = io.StringIO(read_text(path), newline="")
    if path.suffix == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long prompt is a row, not an error
        reader = csv.DictReader(f)
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
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


# ---- record hashes ---------------------------------------------------------------------------

HASH = "record_hash"


def record_hash(record: dict) -> str:
    """A hash of a record's content as it reads back from JSON (keys sorted, the hash field left out)."""
    body = {k: v for k, v in json.loads(json.dumps(record, ensure_ascii=False)).items() if k != HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def checked_record(row: dict, where: str) -> dict:
    """The record without its hash, or an InputError naming `where` if its content no longer matches
    the hash it was written with (records written before hashes existed have none and pass)."""
    stored = row.get(HASH)
    if stored is not None and stored != record_hash(row):
        raise InputError(f"{where}: record {row.get('id')!r} was edited after it was written (its content no longer "
                         "matches its record_hash); undo the edit, delete the line to make the record again, "
                         "or use --overwrite")
    return {k: v for k, v in row.items() if k != HASH}


def read_records(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """A stage's records.jsonl, each checked against its record_hash (see checked_record)."""
    return [checked_record(row, f"{path}:{n}") for n, row in numbered_rows(path, required)]


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
                    rid = row["id"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    # Only a torn last line is ours to cut; a bad whole line was edited by hand.
                    raise InputError(f"{self.path}:{n}: not a record ({type(e).__name__}); "
                                     "fix or delete the line, or use --overwrite") from None
                self.done[rid] = checked_record(row, f"{self.path}:{n}")

    def check_inputs(self, inputs: list[dict], fields: tuple[str, ...]) -> None:
        """Finished records must still match the input rows they were made from (same id, same
        `fields`): an earlier stage rerun with --overwrite, or an edited prompt file, would
        otherwise mix two experiments in one file."""
        changed = [r["id"] for r in inputs if r["id"] in self.done
                   and any(self.done[r["id"]].get(f) != r.get(f) for f in fields)]
        if changed:
            raise InputError(f"{self.path}: {len(changed)} finished records (first: id {changed[0]}) no longer match "
                             f"their input ({', '.join(fields)} changed); use --overwrite or another run_name")

    def write(self, record: dict) -> bool:
        """Append a finished record (with its record_hash); False if its id is already written."""
        if record["id"] in self.done:
            return False
        record = {k: v for k, v in record.items() if k != HASH}  # an earlier stage's hash is not this record's
        self._f.write(json.dumps({**record, HASH: record_hash(record)}, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[record["id"]] = record
        return True

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


PLACE = ("runs_dir",)  # where a run folder lives is no part of its experiment: a moved run still resumes


def unplaced(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PLACE}


class Manifest:
    """What a stage did: config, inputs and outputs with hashes, counters, timings, versions.

    A session's manifest is written at its start (status "running") and at its end ("complete",
    "partial", or "failed" with the reason), so a later stage can tell a finished stage from an
    interrupted one. Over a complete manifest nothing is written until the session starts work
    (`start`): a finished stage rerun as it was (`up_to_date`) changes nothing it recorded.
    Timings and the counts of `this_session` add up over sessions (`timings`, `counts.all_sessions`).
    """

    def __init__(self, out: Path, stage: str, config: dict, resume_ignores: tuple = (), write: bool = True):
        self.path = Path(out) / "manifest.json"
        self.write = write      # False on the other processes of a multi-process run: they compare, never write
        # Compared as it reads back from the file: a YAML {false: harmful} key is "false" there.
        config = json.loads(json.dumps(config, default=str))
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        if previous.get("config"):
            # Resuming under another config would mix two experiments in one file.
            changed = sorted(k for k in set(config) | set(previous["config"]) if k not in resume_ignores + PLACE
                             and config.get(k) != previous["config"].get(k))
            if changed:
                raise InputError(f"{out}: existing outputs were made with a different config "
                                 f"({', '.join(changed)}); use --overwrite or another run_name")
        self.previous = previous
        self.data = {
            "stage": stage, "status": "running", "argv": sys.argv,
            "config": config, "seed": config.get("seed"),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None, "sessions": previous.get("sessions", 0) + 1,
            "git": git_state(), "versions": versions(),
            "inputs": {}, "outputs": {}, "counts": {}, "timings": {},
        }
        self._t0 = time.perf_counter()
        self.started = False
        if previous.get("status") != "complete":
            self.start()

    def input(self, name: str, path: str | Path, rows: int | None = None, **info) -> None:
        """A local file or folder with its hash; a Hub dataset (`hf:<id>`) by id, split and row count."""
        digest = None if str(path).startswith("hf:") else folder_hash(path) if Path(path).is_dir() else file_hash(path)
        self.data["inputs"][name] = {"path": str(path), "sha256": digest, "rows": rows, **info}

    def output(self, name: str, path: Path) -> None:
        self.data["outputs"][name] = {"path": str(path), "sha256": file_hash(path), "rows": count_lines(path)}

    def up_to_date(self) -> bool:
        """The previous session finished ("complete") under exactly this config (the keys a resume
        ignores included), from the same inputs (the ones recorded so far), and every output it
        recorded is still on disk as it wrote it: rerunning would only redo the same work."""
        prev = self.previous
        if prev.get("status") != "complete" or unplaced(prev.get("config") or {}) != unplaced(self.data["config"]):
            return False
        same = lambda a, b: all(a.get(k) == b.get(k) for k in ("path", "sha256", "rows"))  # noqa: E731
        old = prev.get("inputs") or {}
        if any(name not in old or not same(entry, old[name]) for name, entry in self.data["inputs"].items()):
            return False
        for entry in (prev.get("outputs") or {}).values():
            path = self.path.parent / Path(entry.get("path", "")).name  # outputs live in the stage folder
            if not path.is_file() or file_hash(path) != entry.get("sha256"):
                return False
        return True

    def start(self) -> None:
        """Say "running" on disk: from here on this session changes the folder."""
        self.started = True
        self.save()

    def save(self) -> None:
        if not self.write:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, self.path)

    def finish(self, status: str = "complete", **counts) -> None:
        """The session's end: counts (the stage's totals, `this_session` added to `all_sessions`)
        and timings added to the earlier sessions' (`last_session_s` is this one's wall time)."""
        prev_counts, prev_timings = self.previous.get("counts") or {}, self.previous.get("timings") or {}
        self.data["counts"].update(counts)
        if "this_session" in counts:
            earlier = prev_counts.get("all_sessions", prev_counts.get("this_session")) or {}
            self.data["counts"]["all_sessions"] = added(earlier, counts["this_session"])
        wall = round(time.perf_counter() - self._t0, 3)
        timings = {**self.data["timings"], "wall_s": wall}
        timings = added({k: v for k, v in prev_timings.items() if k != "last_session_s"}, timings)
        self.data["timings"] = {**timings, "last_session_s": wall}
        self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.data["status"] = status
        self.start()

    def fail(self, reason: str, status: str = "failed") -> None:
        """A session that stopped on an error (or an interrupt): the reason on one line, and the
        time it ran added like a finished one's, so the folder never says "running" for ever."""
        self.data["reason"] = " ".join(str(reason).split())[:500]
        self.finish(status=status)


def added(a, b):
    """Numbers added leaf by leaf (nested dicts of counts or seconds); what is not a number is b's."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: added(a[k], b[k]) if k in a and k in b else b.get(k, a.get(k)) for k in {**a, **b}}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return round(a + b, 3) if isinstance(a, float) or isinstance(b, float) else a + b
    return b


def require_complete(stage_out: Path, what: str) -> dict:
    """The manifest of an earlier stage, or a clear error if that stage is missing or unfinished."""
    path = Path(stage_out) / "manifest.json"
    if not path.exists():
        raise InputError(f"{stage_out}: no {what} output here; run that stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("status") != "complete":
        raise InputError(f"{stage_out}: {what} did not finish (status {manifest.get('status')}); rerun it to complete it")
    return manifest
