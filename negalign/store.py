"""Artifact I/O: the only module that reads or writes stage outputs (SPEC §2).

A stage output folder holds Parquet shards `part-NNNNN.parquet` and a `manifest.json`. Shards are written to a
temporary name, fsynced and renamed; the manifest is rewritten the same way under a file lock, so several
shard-parallel workers can share one folder. A shard counts as done only when the manifest lists it as
complete *and* the file's sha256 still matches; anything else is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from negalign import __version__
from negalign.errors import BadInput, NegalignError, UsageError
from negalign.faults import crash_point
from negalign.versions import library_versions

MANIFEST = "_manifest.json"  # leading underscore: pyarrow, pandas and Spark skip it when reading the folder
LEGACY_MANIFEST = "manifest.json"  # the older name, still read
LOCK = ".manifest.lock"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ----------------------------------------------------------------------------------------------- hashing

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (first 16 hex digits)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- atomic writes

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)`, fsync tmp, rename it over `path`, fsync the folder: readers see old or new, never half."""
    tmp = _tmp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("manifest-tmp-written" if path.name == MANIFEST else "shard-tmp-written")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(path: Path, table: pa.Table) -> str:
    """Write `table` atomically; return the file's sha256."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return sha256_file(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- schemas

# Required columns per stage and a predicate on their Arrow type. Extra columns are allowed.
def _is_list_of_str(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type)


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"role", "content"} <= names


def _is_float_vector(t: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)) and pa.types.is_float32(t.value_type)


_str, _int = pa.types.is_string, pa.types.is_integer
SCHEMAS: dict[str, dict[str, Callable[[pa.DataType], bool]]] = {
    "prompts": {"prompt_id": _str, "messages": _is_messages, "target": _str, "negatives": _is_list_of_str},
    "sample": {"prompt_id": _str, "sample_idx": _int, "text": _str, "num_tokens": _int, "finish_reason": _str,
               "seed": _int, "engine": _str, "model": _str},
    "embed": {"prompt_id": _str, "sample_idx": _int, "text_sha": _str, "embedding": _is_float_vector},
    "filter": {"prompt_id": _str, "sample_idx": _int, "sim_to_target": pa.types.is_floating, "rank": _int,
               "kept": pa.types.is_boolean, "drop_reason": _str},
    "pair": {"prompt_id": _str, "messages": _is_messages, "chosen": _str, "rejected": _is_list_of_str,
             "rejected_sim": lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type),
             "anchors": _is_list_of_str, "y_ref": _str},
}

PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("target", pa.string()),
    ("negatives", pa.list_(pa.string())),
    ("task", pa.string()),  # optional family name for per-family eval; older prompts folders lack it
])


def check_schema(schema: pa.Schema, stage: str, file: Path) -> None:
    for column, ok in SCHEMAS.get(stage, {}).items():
        if column not in schema.names:
            raise BadInput(f"missing column (a '{stage}' artifact needs {', '.join(SCHEMAS[stage])})",
                           file=str(file), column=column)
        if not ok(schema.field(column).type):
            raise BadInput(f"wrong type {schema.field(column).type} for a '{stage}' artifact",
                           file=str(file), column=column)


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class StageInput:
    """A complete stage output, opened for reading."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def shard_files(self) -> list[Path]:
        return [self.path / name for name in sorted(self.manifest["shards"])]

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
        for f in self.shard_files():
            yield f, pq.read_table(f, columns=columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [t for _, t in self.iter_shards(columns)]
        return pa.concat_tables(tables) if tables else pa.table({})

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"].values())


def manifest_file(path: Path) -> Path | None:
    """The folder's manifest file (`_manifest.json`, or the older `manifest.json`), or None."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def read_manifest(path: Path) -> dict[str, Any] | None:
    f = manifest_file(path)
    if f is None:
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise NegalignError(f"{f}: unreadable manifest ({e})") from e


def open_stage(path: Path, stage: str | None = None, *, verify: bool = False) -> StageInput:
    """Open a finished stage output; refuse a missing, unfinished or wrong-kind one. `verify` re-hashes shards."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise UsageError(f"{path}: no {MANIFEST} here; run the stage that writes it first")
    if stage is not None and manifest.get("stage") != stage:
        raise UsageError(f"{path}: holds a '{manifest.get('stage')}' output, expected '{stage}'")
    if manifest.get("status") != "complete":
        done = sum(1 for s in manifest["shards"].values() if s["status"] == "complete")
        raise UsageError(f"{path}: stage '{manifest['stage']}' is not finished ({done}/{manifest.get('num_shards')} "
                         "shards); re-run it to resume")
    for name, entry in manifest["shards"].items():
        f = path / name
        if not f.exists():
            raise NegalignError(f"{f}: shard listed in the manifest is missing; re-run the stage to redo it")
        if verify and sha256_file(f) != entry["sha256"]:
            raise NegalignError(f"{f}: sha256 does not match the manifest; re-run the stage to redo it")
    opened = StageInput(path, manifest)
    kind = manifest["stage"] if manifest["stage"] in SCHEMAS else stage
    if kind and opened.shard_files():
        check_schema(pq.read_schema(opened.shard_files()[0]), kind, opened.shard_files()[0])
    return opened


def open_optional_stage(path: Path, stage: str) -> StageInput | None:
    """Like open_stage, but None when the folder holds no output (e.g. RUN/greedy before `sample --greedy`)."""
    return open_stage(path, stage) if read_manifest(path) is not None else None


# ----------------------------------------------------------------------------------------------- writing

def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changed[:5]) + (" …" if len(changed) > 5 else "")


@dataclass
class StageOutput:
    """A stage output folder being written. Use `StageOutput.open(...)`, then `done()` / `write_shard()` / `finish()`.

    `config` is what the output depends on (fingerprinted); `inputs` maps input names to their fingerprints.
    `info` is recorded but not fingerprinted (e.g. a sample count that may grow by top-up).
    """

    path: Path
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @classmethod
    def open(cls, path: Path, stage: str, config: dict[str, Any], inputs: dict[str, str] | None = None, *,
             overwrite: bool = False, info: dict[str, Any] | None = None) -> StageOutput:
        out = cls(Path(path), stage, config, inputs or {}, info or {})
        out.path.mkdir(parents=True, exist_ok=True)
        with out._locked():
            manifest = read_manifest(out.path)
            if manifest is not None and (manifest.get("stage") != stage
                                         or manifest.get("config_fingerprint") != fingerprint(config)
                                         or manifest.get("inputs") != out.inputs):
                if not overwrite:
                    if manifest.get("stage") != stage:
                        why = f"it holds a '{manifest.get('stage')}' output"
                    elif manifest.get("config_fingerprint") != fingerprint(config):
                        why = f"it was made with another config ({_config_diff(manifest.get('config', {}), config)})"
                    else:
                        why = "its inputs changed since it was made"
                    raise UsageError(f"{out.path}: {why}; pass --overwrite to redo it, or write elsewhere")
                out._clear()
                manifest = None
            if manifest is None:
                manifest = {"stage": stage, "negalign_version": __version__, "config": config,
                            "config_fingerprint": fingerprint(config), "inputs": out.inputs, "info": out.info,
                            "status": "running", "num_shards": None, "shards": {}, "created_at": _now(),
                            "timings": {}, "versions": library_versions()}
            else:
                manifest["info"] = {**manifest.get("info", {}), **out.info}
            manifest["updated_at"] = _now()
            atomic_write_json(out.path / MANIFEST, manifest)
        return out

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _clear(self) -> None:
        for f in self.path.iterdir():
            if f.name == LOCK:
                continue
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()

    def manifest(self) -> dict[str, Any]:
        manifest = read_manifest(self.path)
        assert manifest is not None
        return manifest

    def shard_entry(self, index: int) -> dict[str, Any] | None:
        """The manifest entry of a shard if it is complete and its file is intact, else None."""
        entry = self.manifest()["shards"].get(shard_name(index))
        f = self.path / shard_name(index)
        if entry is None or entry.get("status") != "complete" or not f.exists():
            return None
        if sha256_file(f) != entry["sha256"]:
            return None
        return entry

    def done(self, index: int) -> bool:
        return self.shard_entry(index) is not None

    def read_shard(self, index: int) -> pa.Table:
        return pq.read_table(self.path / shard_name(index))

    def write_shard(self, index: int, table: pa.Table, meta: dict[str, Any] | None = None) -> None:
        """Write shard `index` atomically, then record it in the manifest (also atomically, under the lock)."""
        name = shard_name(index)
        sha = write_parquet(self.path / name, table)
        crash_point("shard-renamed")
        with self._locked():
            manifest = self.manifest()
            manifest["shards"][name] = {"rows": table.num_rows, "sha256": sha, "status": "complete",
                                        "meta": meta or {}, "written_at": _now()}
            manifest["updated_at"] = _now()
            atomic_write_json(self.path / MANIFEST, manifest)
        crash_point("between-shards")

    def finish(self, num_shards: int, timings: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> bool:
        """Mark the output complete if all `num_shards` shards are done; return whether it is complete."""
        with self._locked():
            manifest = self.manifest()
            expected = {shard_name(i) for i in range(num_shards)}
            # Shards beyond the expected range come from an earlier, larger plan: drop them.
            for extra in set(manifest["shards"]) - expected:
                del manifest["shards"][extra]
                (self.path / extra).unlink(missing_ok=True)
            manifest["num_shards"] = num_shards
            complete = all(manifest["shards"].get(n, {}).get("status") == "complete" for n in expected)
            manifest["timings"] = {**manifest.get("timings", {}), **(timings or {}),
                                   "last_run_s": round(time.time() - self.started, 3)}
            if summary is not None:
                manifest["summary"] = summary
            manifest["status"] = "complete" if complete else "running"
            if complete:
                shas = [manifest["shards"][n]["sha256"] for n in sorted(expected)]
                manifest["fingerprint"] = fingerprint([manifest["config_fingerprint"], manifest["inputs"], shas])
            manifest["updated_at"] = _now()
            atomic_write_json(self.path / MANIFEST, manifest)
        return complete


def my_shards(num_shards: int, shard_index: int = 0, num_workers: int = 1) -> list[int]:
    """Shards this worker owns under `--shard-index i --num-shards n`: every n-th shard starting at i."""
    if not 0 <= shard_index < num_workers:
        raise UsageError(f"--shard-index must be in [0, {num_workers}), got {shard_index}")
    return [s for s in range(num_shards) if s % num_workers == shard_index]


def stage_dir(run: Path, name: str) -> Path:
    return Path(run) / name
