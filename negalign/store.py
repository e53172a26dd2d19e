"""Artifact I/O: the only module that reads or writes stage outputs (SPEC §2).

A stage output folder holds Parquet shards `part-NNNNN.parquet` and a `_manifest.json` (older folders:
`manifest.json`). Shards are written to a temporary name, fsynced and renamed. Bookkeeping costs the same for
every shard, however many there are: each writer appends one fsynced JSON line per finished shard to a journal of
its own (`_journal-HOST-PID-TOKEN.jsonl`; no two writers append to one file, so shard-parallel workers on several
hosts can share a folder), and the manifest is rewritten (atomically, under a file lock) only when a run starts,
at its first shard, and when it finishes: the fold. The manifest records how far each journal was folded, so a
reader (and a resumed run) sees `_manifest.json` plus every journal line beyond that, the same entries that a
manifest rewritten after every shard would hold; a torn last line (a writer killed mid-line) is ignored. The fold
that completes the output removes the journals, so a finished folder holds only the manifest and its shards, in the
same format as before. A shard counts as done only when the (folded) manifest lists it as complete *and* the file's
sha256 still matches; anything else is redone.

fsync policy: a shard's bytes are fsynced before its rename, its journal line after it; the folder itself is
fsynced at every manifest write (which makes the shard renames durable too: a rename lost by a power cut before
that leaves a journaled shard missing, which resume redoes, as it redoes any shard whose sha256 does not match).

The guarantee: a stage never runs on an input that is stale, unverified or mixed, and a failed or killed command
never destroys a complete output.
- stale: each manifest records its inputs' fingerprints and the whole upstream lineage; opening an input checks that
  every upstream output still holds what it was built from (`stale_reason`), and that the inputs a stage opens
  together were built from each other (`check_inputs`);
- unverified: shards are read only through `read_verified`, which checks the manifest's sha256 on the bytes it
  parses, and only the shards the manifest lists; a manifest is schema-checked when loaded;
- mixed: a run lock (`RunLock`) lets only writers of one config share an output folder;
- destroyed: `--overwrite` builds the new output beside the old one and swaps it in when complete (`StageOutput`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from negalign import __version__
from negalign.errors import BadInput, NegalignError, UsageError
from negalign.faults import crash_point
from negalign.schemas import PROMPTS_SCHEMA as PROMPTS_SCHEMA  # re-exported: callers import it from here
from negalign.schemas import REQUIRED
from negalign.stages import command_of  # the command that writes a kind of output, from the stage declarations
from negalign.versions import library_versions

MANIFEST = "_manifest.json"  # leading underscore: pyarrow, pandas and Spark skip it when reading the folder
LEGACY_MANIFEST = "manifest.json"  # the older name, still read
JOURNAL_PREFIX = "_journal-"  # + HOST-PID-TOKEN.jsonl: one per writer; leading underscore as for the manifest
HOST = socket.gethostname()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ----------------------------------------------------------------------------------------------- hashing

def _json_default(obj: Any) -> Any:
    return dict(obj) if isinstance(obj, ShardEntries) else str(obj)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


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
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """Call `write(tmp)`, fsync tmp, rename it over `path`, fsync the folder: readers see old or new, never half.
    `sync_dir=False` leaves the folder's fsync to a later write in it (shards: the next manifest write)."""
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
        if sync_dir:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_chunks(obj: Any) -> Iterator[str]:
    """JSON indented two levels deep, deeper values on one line: a manifest gets one line per shard. Readable and
    fast: json's C encoder runs only without `indent` (indenting a 444 KB manifest in pure Python took ~0.1 s).
    Yielded a line at a time, so that a manifest of 15,625 shards is written without being held whole."""
    one_line = json.JSONEncoder(default=_json_default).encode  # built once (json.dumps builds one per call)

    def encode(value: Any, depth: int) -> Iterator[str]:
        if not (isinstance(value, dict | ShardEntries) and depth < 2):
            yield one_line(value)
            return
        # ShardEntries hold each entry as compact JSON: written as it is
        raw = isinstance(value, ShardEntries)
        pad, sep = "  " * (depth + 1), "{\n"
        for k, v in value.raw_items() if raw else value.items():
            yield f"{sep}{pad}{one_line(k)}: "
            yield from [v] if raw else encode(v, depth + 1)
            sep = ",\n"
        yield "{}" if sep == "{\n" else "\n" + "  " * depth + "}"
    return encode(obj, 0)


def json_text(obj: Any) -> str:
    return "".join(_json_chunks(obj))


def atomic_write_json(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_json_chunks(obj))
            f.write("\n")
    atomic_write(path, write)


def _is_float_list(t: pa.DataType) -> bool:
    return ((pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t))
            and pa.types.is_floating(t.value_type))


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """`table` as a Parquet file, in memory: hashed without reading the file back. zstd with dictionaries, except
    for float vectors (embeddings): those are stored plain, without a dictionary or compression. Vectors of
    distinct floats neither repeat nor compress (zstd saved ~8 % of a 384-dim shard), and the dictionary attempt
    and the decompression were most of the time to write (54 -> 10 ms) and to read (6.8 -> 3.6 ms) a 3.6 MB
    embeddings shard."""
    sink = pa.BufferOutputStream()
    if not any(_is_float_list(f.type) for f in table.schema):
        pq.write_table(table, sink, compression="zstd")
    else:  # per-column settings name Parquet's leaf columns
        leaves = {leaf: _is_float_list(f.type) for f in table.schema for leaf in _leaves(f.name, f.type)}
        pq.write_table(table, sink, compression={leaf: "none" if vec else "zstd" for leaf, vec in leaves.items()},
                       use_dictionary=[leaf for leaf, vec in leaves.items() if not vec])
    return sink.getvalue()


def _leaves(name: str, t: pa.DataType) -> list[str]:
    """The Parquet leaf column paths of an Arrow field (as pyarrow writes them: `x.list.element`, ...)."""
    if pa.types.is_struct(t):
        return [leaf for i in range(t.num_fields) for leaf in _leaves(f"{name}.{t.field(i).name}", t.field(i).type)]
    if pa.types.is_map(t):
        return _leaves(f"{name}.key_value.key", t.key_type) + _leaves(f"{name}.key_value.value", t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaves(f"{name}.list.element", t.value_type)
    return [name]


def write_parquet(path: Path, table: pa.Table, *, sync_dir: bool = True) -> str:
    """Write `table` atomically; return the file's sha256 (of the bytes in memory: each byte hashed once)."""
    data = parquet_bytes(table)
    sha = hashlib.sha256(data).hexdigest()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), sync_dir=sync_dir)
    return sha


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- schemas

# The required columns per stage kind live in negalign.schemas, with every written schema.
SCHEMAS = REQUIRED


def check_schema(schema: pa.Schema, stage: str, file: Path) -> None:
    for column, ok in SCHEMAS.get(stage, {}).items():
        if column not in schema.names:
            raise BadInput(f"missing column (a '{stage}' artifact needs {', '.join(SCHEMAS[stage])})",
                           file=str(file), column=column)
        if not ok(schema.field(column).type):
            raise BadInput(f"wrong type {schema.field(column).type} for a '{stage}' artifact",
                           file=str(file), column=column)


# ----------------------------------------------------------------------------------------------- manifests

_REQUIRED = {"stage": str, "status": str, "config": dict, "config_fingerprint": str, "inputs": dict,
             "shards": Mapping}  # a dict as parsed whole, ShardEntries as read a line at a time


class ShardEntries(MutableMapping[str, dict[str, Any]]):
    """A manifest's `shards`, {file name: entry}, each entry held as its compact JSON: ~0.4 KB a shard against
    ~1.8 KB as dicts (pair-like meta, tracemalloc), so a process holding the manifests of 15,625-shard outputs (a
    writer's own, its inputs') stays small. Entries are decoded on access: changing a returned entry changes
    nothing; assign it back."""

    __slots__ = ("_raw",)

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None) -> None:
        self._raw: dict[str, str] = {}
        for name, entry in (entries or {}).items():
            self[name] = entry

    def __getitem__(self, name: str) -> dict[str, Any]:
        return json.loads(self._raw[name])

    def __setitem__(self, name: str, entry: dict[str, Any]) -> None:
        self._raw[name] = json.dumps(entry, separators=(",", ":"), default=str)

    def __delitem__(self, name: str) -> None:
        del self._raw[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __repr__(self) -> str:
        return f"ShardEntries({len(self)} shards)"

    def raw_items(self) -> Iterator[tuple[str, str]]:
        return iter(self._raw.items())


def manifest_file(path: Path) -> Path | None:
    """The folder's manifest file (`_manifest.json`, or the older `manifest.json`), or None."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def _entry_ok(e: Any) -> bool:
    return isinstance(e, dict) and isinstance(e.get("rows"), int) and isinstance(e.get("sha256"), str) and "status" in e


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a parsed manifest, or None. A complete one must list exactly shards 0..num_shards-1."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__} instead of an object"
    for key, kind in _REQUIRED.items():
        if not isinstance(m.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    if m["status"] not in ("running", "complete"):
        return f"unknown status '{m['status']}'"
    journals = m.get("journals", {})
    if not (isinstance(journals, dict) and all(isinstance(v, int) for v in journals.values())):
        return "'journals' is not a map of journal names to offsets"
    if isinstance(m["shards"], dict):  # (ShardEntries were checked as they were read)
        for name, e in m["shards"].items():
            if not _entry_ok(e):
                return f"shard entry '{name}' lacks rows, sha256 or status"
    if m["status"] == "complete":
        n = m.get("num_shards")
        if not isinstance(m.get("fingerprint"), str) or not isinstance(n, int):
            return "complete without fingerprint or num_shards"
        if set(m["shards"]) != {shard_name(i) for i in range(n)}:
            return f"complete, but lists {len(m['shards'])} shards where {n} are expected"
    return None


_SHARDS_OPEN = b'\n  "shards": {\n'  # how `_json_chunks` opens a manifest's shards: then one line per shard


def _parse_by_line(text: bytes) -> dict[str, Any] | None:
    """A manifest laid out as `_json_chunks` writes it, its shards parsed a line at a time into `ShardEntries`
    (parsing the whole file at once would hold every entry as a dict); None for any other layout or a line that
    does not parse as an entry (the caller then parses it whole, and reports what is wrong)."""
    start = text.find(_SHARDS_OPEN)
    if start < 0:
        return None
    shards, pos = ShardEntries(), start + len(_SHARDS_OPEN)
    while not text.startswith(b"  }", pos):
        end = text.find(b"\n", pos)
        try:
            item = json.loads(b"{" + text[pos:end if end >= 0 else None].rstrip(b",") + b"}")
        except ValueError:
            return None
        for name, entry in item.items():
            if not _entry_ok(entry):
                return None
            shards[name] = entry
        if end < 0:
            return None
        pos = end + 1
    try:
        m = json.loads(text[:start] + b'\n  "shards": {}' + text[pos + 3:])
    except ValueError:
        return None
    if not isinstance(m, dict):
        return None
    m["shards"] = shards
    return m


def _parse_manifest(f: Path, text: bytes) -> dict[str, Any]:
    m: Any = None
    try:
        m = _parse_by_line(text)
        if m is None:
            m = json.loads(text)
        why = _manifest_problem(m)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = f"not valid JSON: {e}"
    if why is not None:
        stage = m.get("stage") if isinstance(m, dict) else None
        rerun = f"negalign {command_of(stage)}" if isinstance(stage, str) else "the stage that writes it"
        raise UsageError(f"{f}: broken manifest ({why}); re-run {rerun} with --overwrite to rebuild this output")
    if isinstance(m["shards"], dict):
        m["shards"] = ShardEntries(m["shards"])
    return m


# ----------------------------------------------------------------------------------------------- journals
# One line per finished shard: {"shard": NAME, "t": ns since the epoch, "entry": {rows, sha256, status, meta,
# written_at}}, the entry exactly as the manifest lists it.

def journal_files(folder: Path) -> list[Path]:
    """The folder's journals (one per writer), by name."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.startswith(JOURNAL_PREFIX) and e.name.endswith(".jsonl")]
    except FileNotFoundError:
        return []
    return [Path(folder) / n for n in sorted(names)]


def _journal_line(line: bytes) -> tuple[int, str, dict[str, Any]] | None:
    """(t, shard name, entry) of a journal line, or None for a line that is not one (torn, damaged)."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    shard, t, e = rec.get("shard"), rec.get("t"), rec.get("entry")
    if not (isinstance(shard, str) and isinstance(t, int) and _entry_ok(e)):
        return None
    return t, shard, e


def _journal_tail(file: Path, offset: int, ends: dict[str, int]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """The journal's lines after byte `offset`, read as they are used, up to its last newline (a line still being
    written, or torn by a kill, is not one yet); then `ends[file.name]` is the offset after them."""
    pos = offset
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                pos += len(line)
                if (rec := _journal_line(line)) is not None:
                    yield rec
    except FileNotFoundError:
        pass
    ends[file.name] = pos


def _fold(folder: Path, base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """`base` (a parsed manifest, changed in place) with every journal line beyond what it folded applied, and how
    far each journal has now been read. Lines are applied in time order, journals merged as they are read (each
    journal is in time order: one writer appends it), so the fold holds no more than the manifest. A complete
    manifest holds everything: journals beside it are leftovers of a fold killed before it removed them, and are
    ignored."""
    if base["status"] == "complete":
        return base, {}
    folded = base.get("journals") or {}
    offsets: dict[str, int] = {}
    tails = [_journal_tail(f, int(folded.get(f.name, 0)), offsets) for f in journal_files(folder)]
    for _, shard, entry in heapq.merge(*tails, key=lambda rec: rec[0]):
        base["shards"][shard] = entry
    return base, offsets


def _load(path: Path) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """(the folder's manifest with its journals folded in, how far each journal was read). Consistent without a
    lock: a fold writes the manifest before it removes journals, so if the manifest file we read is still in place
    after reading the journals, nothing we read was removed meanwhile; otherwise read again."""
    f = manifest_file(path)
    if f is None:
        return None, {}
    for _ in range(100):
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:  # replaced between the two calls: read again
            f = manifest_file(path)
            if f is None:
                return None, {}
            continue
        try:
            with os.fdopen(os.dup(fd), "rb") as fh:
                text = fh.read()
            base = _parse_manifest(f, text)
            if f.name != MANIFEST:
                return base, {}
            view, offsets = _fold(Path(path), base)
            with contextlib.suppress(FileNotFoundError):
                st, held = os.stat(f), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    return view, offsets
        finally:
            os.close(fd)
    raise NegalignError(f"{path}: the manifest keeps changing while it is read; try again")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove_journals(files: list[Path]) -> None:
    """Remove folded journals (under the lock), with a crash point after each: a fold killed half-way."""
    for f in files:
        f.unlink(missing_ok=True)
        crash_point("journal-removed")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The folder's manifest with its journals folded in (what a manifest rewritten after every shard would say),
    checked against the schema above; None when the folder has none."""
    return _load(path)[0]


# ----------------------------------------------------------------------------------------------- reading

def read_verified(file: Path, entry: dict[str, Any], kind: str | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Read a shard's bytes once, check them against the manifest's sha256, then parse them (and check the schema
    of a known stage kind). A damaged or missing shard is an error, never data."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise NegalignError(f"{file}: shard listed in the manifest is missing; re-run the stage to redo it") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise NegalignError(f"{file}: damaged (sha256 does not match the manifest); re-run the stage to redo it")
    parquet = pq.ParquetFile(pa.BufferReader(data))
    if kind in SCHEMAS:
        check_schema(parquet.schema_arrow, kind, file)
    # One thread: a shard is one row group of a few MB; Arrow's thread pool cost more than it saved here (3.3 MB
    # embeddings shard on 2 busy cores: 11.0 -> 4.6 ms median).
    return parquet.read(columns=columns, use_threads=False)


@dataclass
class StageInput:
    """A complete stage output, opened for reading. Every shard is verified against its sha256 as it is read."""

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

    @property
    def inputs(self) -> dict[str, str]:
        """Fingerprints of the inputs this output was built from, by input name."""
        return self.manifest["inputs"]

    @property
    def lineage(self) -> dict[str, dict[str, Any]]:
        """Every upstream output, {path relative to this folder: {stage, fingerprint, inputs}} (empty if older)."""
        return self.manifest.get("lineage", {})

    @property
    def num_shards(self) -> int:
        return self.manifest["num_shards"]

    def shard_files(self) -> list[Path]:
        return [self.path / name for name in sorted(self.manifest["shards"])]

    def read_shard(self, shard: int | str, columns: list[str] | None = None) -> pa.Table:
        """One listed shard (by index or file name), verified; refuses a shard the manifest does not list."""
        name = shard_name(shard) if isinstance(shard, int) else shard
        entry = self.manifest["shards"].get(name)
        if entry is None:
            raise NegalignError(f"{self.path / name}: not listed in {self.path}'s manifest")
        return read_verified(self.path / name, entry, self.stage, columns)

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
        for name in sorted(self.manifest["shards"]):
            yield self.path / name, self.read_shard(name, columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [t for _, t in self.iter_shards(columns)]
        return pa.concat_tables(tables) if tables else pa.table({})

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"].values())


class PromptRows:
    """The prompts rows (`columns`, by prompt_id) that one samples shard needs, read a prompts shard at a time so that
    `filter` and `pair` hold a constant amount of prompts whatever the run's size.

    Samples shard s holds the prompts rows [s·shard_size, (s+1)·shard_size) of the prompts it was sampled from, in
    their stored order (sample.py). When `prompts` is that output (same fingerprint), only the prompts shards
    covering that range are read, and the last one is kept for the next samples shard. Any other prompts folder
    (e.g. a superset passed with --prompts) is indexed whole, once, on first use."""

    def __init__(self, prompts: StageInput, columns: list[str], samples: StageInput) -> None:
        self.prompts, self.columns = prompts, columns
        size = samples.config.get("shard_size")
        self.shard_size: int | None = size if size and samples.inputs.get("prompts") == prompts.fingerprint else None
        self.names = sorted(prompts.manifest["shards"])
        self.starts = [0]
        for name in self.names:
            self.starts.append(self.starts[-1] + int(prompts.manifest["shards"][name]["rows"]))
        self._kept: tuple[str, pa.Table] | None = None
        self._whole: dict[str, dict[str, Any]] | None = None

    def _shard(self, name: str) -> pa.Table:
        if self._kept is None or self._kept[0] != name:
            self._kept = (name, self.prompts.read_shard(name, self.columns))
        return self._kept[1]

    def _range(self, lo: int, hi: int) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.names):
            a, b = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if a < b:
                part = self._shard(name).slice(a - self.starts[i], b - a)
                rows.update((r["prompt_id"], r) for r in part.to_pylist())
        return rows

    def for_shard(self, shard: int, prompt_ids: list[str]) -> dict[str, dict[str, Any]]:
        """{prompt_id: row} for the ids of samples shard `shard`; an id the prompts do not hold is left out."""
        wanted = set(prompt_ids)
        if self.shard_size:
            rows = self._range(shard * self.shard_size, (shard + 1) * self.shard_size)
            if wanted <= rows.keys():
                return rows
        if self._whole is None:
            self._whole = {r["prompt_id"]: r for r in self.prompts.read(self.columns).to_pylist()}
        return {pid: self._whole[pid] for pid in wanted if pid in self._whole}

    def values(self, column: str) -> set[Any]:
        """The distinct values of one column over all prompts, a shard at a time."""
        seen: set[Any] = set()
        for _, table in self.prompts.iter_shards([column]):
            seen.update(table.column(column).unique().to_pylist())
        return seen


def damaged_shards(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Listed shards that are missing or whose bytes no longer match their sha256 (reads every byte)."""
    bad = []
    for name, entry in sorted(manifest["shards"].items()):
        f = Path(path) / name
        if entry.get("status") == "complete" and (not f.is_file() or sha256_file(f) != entry["sha256"]):
            bad.append(name)
    return bad


def _norm(path: Path | str) -> Path:
    """Collapse `a/../b` lexically, so that `--run ../dd/../dd2` never creates a stray `dd/`."""
    return Path(os.path.normpath(path))


def _rel(target: Path | str, start: Path | str) -> str:
    return os.path.relpath(os.path.abspath(target), os.path.abspath(start))


def _ancestors(x: StageInput, rel: str) -> set[str]:
    """The outputs in x's lineage that `rel` (a lineage key, or "." for x) was built from, directly or not."""
    graph = {r: e.get("inputs", []) for r, e in x.lineage.items()} | {".": list(x.manifest.get("input_paths",
                                                                                              {}).values())}
    seen: set[str] = set()
    todo = list(graph.get(rel, []))
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo += graph.get(r, [])
    return seen


def _rerun_plan(x: StageInput, changed: set[str]) -> str:
    """The commands to re-run, in order: the stages of x's chain (x included) built on a changed output that
    are not themselves rebuilt already."""
    stages = {rel: e["stage"] for rel, e in x.lineage.items()} | {".": x.stage}
    todo = sorted((rel for rel in stages if rel not in changed and _ancestors(x, rel) & changed),
                  key=lambda rel: len(_ancestors(x, rel)))
    return ", then ".join(f"`negalign {command_of(stages[rel])} --overwrite`" for rel in todo)


def stale_reason(x: StageInput) -> str | None:
    """Why x is stale, or None: an upstream output recorded in x's lineage now holds something else (re-run,
    unfinished or broken). Upstream folders that no longer exist are not checked (nothing to compare with)."""
    changed: dict[str, str] = {}
    for rel, entry in x.lineage.items():
        try:
            m = read_manifest(_norm(x.path / rel))
        except UsageError:
            changed[rel] = "broken"
            continue
        if m is None:
            continue
        if m["status"] != "complete":
            changed[rel] = "unfinished"
        elif m["fingerprint"] != entry["fingerprint"]:
            changed[rel] = "changed"
    if not changed:
        return None
    first = min(changed, key=lambda rel: len(_ancestors(x, rel)))  # the most upstream change
    what = {"changed": "has changed since", "unfinished": "is being rebuilt or unfinished", "broken": "is broken"}
    return (f"{x.path} was built from an older {_norm(x.path / first)} (it {what[changed[first]]}); "
            f"re-run {_rerun_plan(x, set(changed))}")


def check_inputs(inputs: dict[str, StageInput | None]) -> None:
    """Refuse a set of inputs that do not belong together: input B recorded input `name` with another fingerprint
    than the `name` opened now (e.g. filter given embeddings made from other samples)."""
    for b in inputs.values():
        if b is None:
            continue
        for name, fp in b.inputs.items():
            a = inputs.get(name)
            if a is not None and a is not b and a.fingerprint != fp:
                raise UsageError(f"{b.path} was made from other {name} than {a.path} holds now; re-run "
                                 f"`negalign {command_of(b.stage)} --overwrite`, or point at the {name} it was made "
                                 "from")


def open_stage(path: Path, stage: str | None = None, *, verify: bool = False,
               check_lineage: bool = True) -> StageInput:
    """Open a finished stage output; refuse a missing, unfinished, broken, wrong-kind or stale one.
    `verify` re-hashes every shard now (reads do it anyway, shard by shard)."""
    path = _norm(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise UsageError(f"{path}: no {MANIFEST} here; run the stage that writes it first")
    if stage is not None and manifest["stage"] != stage:
        raise UsageError(f"{path}: holds a '{manifest['stage']}' output, expected '{stage}'")
    if manifest["status"] != "complete":
        done = sum(1 for s in manifest["shards"].values() if s["status"] == "complete")
        total = manifest.get("num_shards")
        raise UsageError(f"{path}: stage '{manifest['stage']}' is not finished ({done}/{total or '?'} shards); "
                         f"re-run `negalign {command_of(manifest['stage'])}` to resume")
    for name in manifest["shards"]:
        if not (path / name).is_file():
            raise NegalignError(f"{path / name}: shard listed in the manifest is missing; re-run the stage to redo it")
    if verify and (bad := damaged_shards(path, manifest)):
        raise NegalignError(f"{path / bad[0]}: sha256 does not match the manifest; re-run the stage to redo it")
    opened = StageInput(path, manifest)
    kind = manifest["stage"] if manifest["stage"] in SCHEMAS else stage
    if kind and opened.shard_files():  # fail early, before any model loads; reads check every shard again
        first = opened.shard_files()[0]
        try:
            schema = pq.read_schema(first)
        except (OSError, pa.ArrowException) as e:
            raise NegalignError(f"{first}: damaged (unreadable Parquet footer); re-run the stage to redo it") from e
        check_schema(schema, kind, first)
    if check_lineage and (why := stale_reason(opened)):
        raise UsageError(why)
    return opened


def open_optional_stage(path: Path, stage: str) -> StageInput | None:
    """Like open_stage, but None when the folder holds no output (e.g. RUN/greedy before `sample --greedy`)."""
    return open_stage(path, stage) if read_manifest(path) is not None else None


# ----------------------------------------------------------------------------------------------- run lock

def is_main_process() -> bool:
    """False on the non-zero ranks of a torch.distributed / accelerate launch: only rank 0 writes or clears."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_alive(h: dict[str, Any]) -> bool:
    return h.get("host") != HOST or _pid_alive(int(h.get("pid", 0)))


@contextlib.contextmanager
def flock(file: Path) -> Iterator[None]:
    with open(file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunLock:
    """Who writes an output folder. Every writer holds a shared flock on `PARENT/.NAME.lock` for its whole run;
    the file names the holders (pid, host, start time) and the key (stage, config, inputs) they write. A newcomer
    with the same key joins (shard-parallel workers); one with another key is refused while any holder lives. The
    kernel drops a dead process's flock, so a lock left by a killed run is stale: an exclusive try-lock succeeds.
    `PARENT/.NAME.mutex` serialises joining and every manifest update."""

    _held: dict[str, RunLock] = {}  # this process's locks; a process runs one stage at a time

    def __init__(self, final: Path, key: str) -> None:
        self.file = final.parent / f".{final.name}.lock"
        self.mutex_file = final.parent / f".{final.name}.mutex"
        self.key = key
        self.fd: int | None = None
        self.alone = False  # nobody else held the output when we took it

    def mutex(self) -> contextlib.AbstractContextManager[None]:
        return flock(self.mutex_file)

    def _write_info(self, info: dict[str, Any]) -> None:
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info, indent=1) + "\n").encode(), 0)

    def _read_info(self, fd: int) -> dict[str, Any]:
        raw = os.pread(fd, 1 << 20, 0)
        with contextlib.suppress(ValueError):
            info = json.loads(raw or b"{}")
            if isinstance(info, dict):
                return info
        return {}

    @classmethod
    def get(cls, final: Path, key: str) -> RunLock:
        """This process's lock on the output if it holds one for this key (a stage may open its output twice),
        else a new one to `take`."""
        held = cls._held.get(os.path.abspath(final))
        if held is not None and held.key == key and held.fd is not None:
            held.alone = False  # others may have joined since we took it
            return held
        if held is not None:  # an earlier stage run in this process stopped without finish(): it is over
            held.release()
        return cls(final, key)

    def take(self, final: Path, config: dict[str, Any]) -> None:
        """With the mutex held: hold the output for a run with this key, or raise UsageError naming the live
        holders. Tidying and the first manifest write happen under the same mutex, before anyone can join."""
        if self.fd is not None:
            return
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except BlockingIOError:
            self.alone = False
        info = {} if self.alone else self._read_info(fd)
        if not self.alone and info.get("key") != self.key:
            os.close(fd)
            live = [h for h in info.get("holders", []) if _holder_alive(h)] or [{"pid": "?", "host": "?"}]
            who = "; ".join(f"pid {h.get('pid')} on {h.get('host')} since {h.get('started', '?')}" for h in live)
            diff = _config_diff(info.get("config") or {}, config) or "other inputs"
            raise UsageError(f"{final}: in use by {who}, writing another config ({diff}); wait for it to finish, "
                             "or write elsewhere")
        fcntl.flock(fd, fcntl.LOCK_SH)  # the exclusive try-lock becomes shared; joiners queue on the mutex
        self.fd = fd
        me = {"pid": os.getpid(), "host": HOST, "started": _now()}
        holders = [h for h in info.get("holders", []) if _holder_alive(h)]
        self._write_info({"key": self.key, "config": config, "holders": holders + [me]})
        self._held[os.path.abspath(final)] = self

    def release(self) -> None:
        if self.fd is None:
            return
        with self.mutex():
            info = self._read_info(self.fd)
            info["holders"] = [h for h in info.get("holders", [])
                               if not (h.get("pid") == os.getpid() and h.get("host") == HOST) and _holder_alive(h)]
            self._write_info(info)
            os.close(self.fd)
        self.fd = None
        for final, lock in list(self._held.items()):
            if lock is self:
                del self._held[final]


def _tmp_owner_dead(name: str, alone: bool) -> bool:
    """A `.X.tmp-HOST-PID` file left by a dead writer (any host's, when nobody else holds the output)."""
    host, _, pid = name.rpartition(".tmp-")[2].rpartition("-")
    return alone or (host == HOST and pid.isdigit() and not _pid_alive(int(pid)))


# ----------------------------------------------------------------------------------------------- writing

def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changed[:5]) + (" …" if len(changed) > 5 else "")


def _describe_inputs(inputs: dict[str, str | StageInput], dest: Path
                     ) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, Any]]]:
    """(fingerprints by name, paths by name, lineage) for an output at `dest`; paths are relative to `dest`, so
    a run directory can move as a whole. A plain string input (e.g. a source file's hash) has no lineage."""
    fps, paths, lineage = {}, {}, {}
    for name, inp in inputs.items():
        if isinstance(inp, str):
            fps[name] = inp
            continue
        fps[name] = inp.fingerprint
        paths[name] = _rel(inp.path, dest)

        def rebase(rel: str, src: Path = inp.path) -> str:
            return _rel(_norm(src / rel), dest)

        for rel, entry in inp.lineage.items():
            lineage[rebase(rel)] = {**entry, "inputs": [rebase(r) for r in entry.get("inputs", [])]}
        lineage[paths[name]] = {"stage": inp.stage, "fingerprint": inp.fingerprint,
                                "inputs": [rebase(r) for r in inp.manifest.get("input_paths", {}).values()]}
    return fps, paths, lineage


@dataclass
class StageOutput:
    """A stage output folder being written. Use `StageOutput.open(...)`, then `done()` / `write_shard()` / `finish()`.

    `config` is what the output depends on (fingerprinted); `inputs` maps input names to opened inputs (their
    fingerprints and lineage are recorded) or to plain fingerprints. `info` is recorded but not fingerprinted
    (e.g. a sample count that may grow by top-up).

    Replacing an output (`--overwrite` with another config or inputs) writes into a staging folder
    `PARENT/.NAME.new-KEY` beside the old output, and swaps it in only when it is complete: a failed or killed
    `--overwrite` leaves the old output as it was. KEY is the fingerprint of (stage, config, inputs), so
    shard-parallel workers of one config share one staging folder and resume it after a crash; the worker that
    completes the last shard swaps it in. Workers started later with the same config find the new output in place.
    """

    path: Path  # where shards go: the output folder, or its staging folder while it is being replaced
    final: Path
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    input_paths: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    readonly: bool = False
    _lock: RunLock | None = None
    _marked_running: bool = False
    # The manifest as this writer last folded or wrote it, plus the shards it journaled since: `done` and
    # `shard_entry` cost a dict lookup, not a parse of a manifest that grows with every shard. Other workers'
    # shards appear in it at the next fold (open, first write, finish) or `manifest()`.
    _view: dict[str, Any] | None = None
    _journal: tuple[int, Path] | None = None  # this writer's journal: (descriptor open for appending, path)
    # The shard being written and journaled in the background while the stage computes the next one: at most one,
    # so memory holds one extra shard and journal lines keep shard order. Collected (its error raised) by `flush`.
    _writer: ThreadPoolExecutor | None = None
    _pending: tuple[str, Future[dict[str, Any]]] | None = None

    @classmethod
    def open(cls, path: Path, stage: str, config: dict[str, Any],
             inputs: dict[str, str | StageInput] | None = None, *, overwrite: bool = False,
             info: dict[str, Any] | None = None) -> StageOutput:
        final = _norm(path)
        inputs = inputs or {}
        check_inputs({k: v for k, v in inputs.items() if isinstance(v, StageInput)})
        fps, paths, lineage = _describe_inputs(inputs, final)
        out = cls(final, final, stage, config, fps, info or {}, paths, lineage)
        key = fingerprint([stage, fingerprint(config), fps])
        if not is_main_process():
            return out._wait_for_main_process()
        final.parent.mkdir(parents=True, exist_ok=True)
        out._lock = RunLock.get(final, key)
        try:
            with out._lock.mutex():
                out._lock.take(final, config)
                out.path = out._choose_folder(key, overwrite, out._lock.alone)
                out.path.mkdir(parents=True, exist_ok=True)
                if manifest_file(out.path) is None:
                    out._view = {"stage": stage, "negalign_version": __version__, "config": config,
                                 "config_fingerprint": fingerprint(config), "inputs": fps, "input_paths": paths,
                                 "lineage": lineage, "info": out.info, "status": "running", "num_shards": None,
                                 "shards": ShardEntries(), "created_at": _now(), "timings": {},
                                 "versions": library_versions()}
                # Nobody else holds the output: every journal is a dead writer's, folded now and removed.
                with out._editing(drop="all" if out._lock.alone else "none") as manifest:
                    manifest["info"] = {**manifest.get("info", {}), **out.info}
                    manifest.update(input_paths=paths, lineage=lineage)
                (out.path / LEGACY_MANIFEST).unlink(missing_ok=True)
        except BaseException:
            out._lock.release()
            raise
        return out

    def _choose_folder(self, key: str, overwrite: bool, alone: bool) -> Path:
        """Where this run writes (called with the mutex held): the output folder if it is empty or matches,
        else this key's staging folder (an --overwrite in progress, or a new one with --overwrite)."""
        final, staging = self.final, self.final.parent / f".{self.final.name}.new-{key}"
        self._tidy(key, alone)
        try:
            current = read_manifest(final)
            broken = None
        except UsageError as e:
            current, broken = None, str(e)
        if current is not None and (current["stage"], current["config_fingerprint"], current["inputs"]) == (
                self.stage, fingerprint(self.config), self.inputs):
            return final
        if staging.is_dir() or (overwrite and (current is not None or broken is not None)):
            return staging
        if broken is None and current is None:
            return final
        if broken is not None:
            raise UsageError(broken)
        assert current is not None
        if current["stage"] != self.stage:
            why = f"it holds a '{current['stage']}' output"
        elif current["config_fingerprint"] != fingerprint(self.config):
            why = f"it was made with another config ({_config_diff(current['config'], self.config)})"
        else:
            why = "its inputs changed since it was made"
        raise UsageError(f"{final}: {why}; pass --overwrite to redo it, or write elsewhere")

    def _tidy(self, key: str, alone: bool) -> None:
        """Finish a swap that a crash interrupted, then remove what dead writers left: `.tmp-*` files, and (when
        nobody else holds the output) staging folders of other keys and old outputs being swapped out."""
        final, parent = self.final, self.final.parent
        if not final.exists():  # a swap was cut between its two renames: the new output is complete
            for s in sorted(parent.glob(f".{final.name}.new-*")):
                with contextlib.suppress(UsageError):
                    if (read_manifest(s) or {}).get("status") == "complete":
                        os.replace(s, final)
                        break
        if not final.exists():  # (not expected) no complete new output: put the old one back
            for old in sorted(parent.glob(f".{final.name}.old-*"))[:1]:
                os.replace(old, final)
        for old in parent.glob(f".{final.name}.old-*"):  # swaps happen under the mutex we hold: these are over
            shutil.rmtree(old, ignore_errors=True)
        if alone:
            for s in parent.glob(f".{final.name}.new-*"):
                if s.name != f".{final.name}.new-{key}":
                    shutil.rmtree(s, ignore_errors=True)
        for folder in (final, parent / f".{final.name}.new-{key}"):
            for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else []:
                if _tmp_owner_dead(tmp.name, alone):
                    tmp.unlink(missing_ok=True)

    def _wait_for_main_process(self) -> StageOutput:
        """Non-zero ranks: wait until rank 0 has completed this output, then act as if every shard were done."""
        key = (self.stage, fingerprint(self.config), self.inputs)
        deadline = time.time() + float(os.environ.get("NEGALIGN_RANK_WAIT_S", 24 * 3600))
        while True:
            with contextlib.suppress(UsageError):
                m = read_manifest(self.final)
                if m and m["status"] == "complete" and (m["stage"], m["config_fingerprint"], m["inputs"]) == key:
                    self.readonly = True
                    return self
            if time.time() > deadline:
                raise NegalignError(f"{self.final}: rank 0 did not complete this output in time")
            time.sleep(2)

    def _follow_swap(self) -> None:
        """After another worker swapped our staging folder in, the output folder is where our shards are."""
        if self.path != self.final and not self.path.exists():
            self.path = self.final

    def _update(self) -> contextlib.AbstractContextManager[None]:
        if self.readonly or self._lock is None or self._lock.fd is None:
            raise NegalignError(f"{self.final}: not open for writing (finished, or not the main process)")
        return self._lock.mutex()

    def manifest(self) -> dict[str, Any]:
        """The output's manifest with every journal folded in, read now (not to be modified: use `_editing`)."""
        self.flush()
        self._follow_swap()
        self._view = None  # not two copies at once: at 15,625 shards each is ~20 MB
        manifest = read_manifest(self.path)
        assert manifest is not None
        self._view = manifest
        return manifest

    def _current(self) -> dict[str, Any]:
        """The manifest as this writer knows it (see `_view`): no read."""
        self.flush()
        self._follow_swap()
        return self._view if self._view is not None else self.manifest()

    @contextlib.contextmanager
    def _editing(self, drop: str = "none") -> Iterator[dict[str, Any]]:
        """The manifest with every journal folded in, to change (hold the lock: `_update`); written atomically,
        with how far each journal was folded, when the block ends without an error: the fold. Then journals are
        removed: all of them if the manifest is now complete or `drop` is "all" (nobody else writes), this writer's
        own if `drop` is "own" (it writes no more)."""
        self.flush()
        self._follow_swap()
        view, self._view = self._view, None  # until written: a failed edit must not leave its half-changes in view
        if manifest_file(self.path) is not None:
            view = None                      # read again below: not two copies at once
        manifest, offsets = _load(self.path)
        if manifest is None:  # a new output (`open` put its first manifest in view)
            assert view is not None
            manifest, offsets = view, {}
        if manifest["status"] == "complete":  # journals beside a complete manifest are leftovers of a killed fold
            _remove_journals(journal_files(self.path))
        yield manifest
        manifest["updated_at"] = _now()
        if manifest["status"] == "complete":
            manifest.pop("journals", None)
        else:
            manifest["journals"] = offsets
        atomic_write_json(self.path / MANIFEST, manifest)
        if offsets:  # a fold of journals (a stage without shards, e.g. train, has none)
            crash_point("fold-written")
        self._view = manifest
        if manifest["status"] == "complete" or drop == "all":
            self._close_journal()
            _remove_journals(journal_files(self.path))
        elif drop == "own" and self._journal is not None:
            own = self._journal[1]
            self._close_journal()
            _remove_journals([own])

    def _append_journal(self, name: str, entry: dict[str, Any], folder: Path) -> None:
        """One line for a finished shard in this writer's journal, fsynced. Written in two halves, with a crash
        point between them, so that the crash tests can tear a line as a kill in the middle of a write would."""
        if self._journal is None:
            path = folder / f"{JOURNAL_PREFIX}{HOST.replace('-', '_')}-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            _fsync_dir(folder)
            self._journal = (fd, path)
        fd = self._journal[0]
        line = (json.dumps({"shard": name, "t": time.time_ns(), "entry": entry}, separators=(",", ":"),
                           default=str) + "\n").encode()
        half = len(line) // 2
        _write_all(fd, line[:half])
        crash_point("journal-torn")
        _write_all(fd, line[half:])
        os.fsync(fd)

    def _close_journal(self) -> None:
        if self._journal is not None:
            os.close(self._journal[0])
            self._journal = None

    def listed(self, index: int) -> dict[str, Any] | None:
        """The shard's manifest entry as listed, its file not checked (`shard_entry` checks it)."""
        return self._current()["shards"].get(shard_name(index))

    def shard_entry(self, index: int) -> dict[str, Any] | None:
        """The manifest entry of a shard if it is complete and its file is intact, else None."""
        entry = self.listed(index)
        f = self.path / shard_name(index)
        if entry is None or entry.get("status") != "complete" or not f.exists():
            return None
        if sha256_file(f) != entry["sha256"]:
            return None
        return entry

    def done(self, index: int) -> bool:
        return self.readonly or self.shard_entry(index) is not None

    def read_shard(self, index: int) -> pa.Table:
        """A shard this output holds, verified against its sha256."""
        entry = self.listed(index)
        if entry is None:
            raise NegalignError(f"{self.path / shard_name(index)}: not written yet")
        return read_verified(self.path / shard_name(index), entry)

    def write_shard(self, index: int, table: pa.Table, meta: dict[str, Any] | None = None) -> None:
        """Write shard `index` atomically, then journal it (one fsynced line: constant cost per shard). The first
        write of a run marks the output `running` (no fingerprint): a run killed half-way never leaves it looking
        complete."""
        name = shard_name(index)
        if self.readonly or self._lock is None or self._lock.fd is None:
            raise NegalignError(f"{self.final}: not open for writing (finished, or not the main process)")
        if not self._marked_running:
            with self._update(), self._editing() as manifest:
                manifest["status"] = "running"
                manifest.pop("fingerprint", None)
            self._marked_running = True
        self.flush()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="negalign-shard-writer")
        self._pending = (name, self._writer.submit(self._write_and_journal, self.path, name, table, meta or {}))

    def _write_and_journal(self, folder: Path, name: str, table: pa.Table, meta: dict[str, Any]) -> dict[str, Any]:
        """In the writer thread: the shard file (atomic, fsynced), then its journal line (fsynced)."""
        sha = write_parquet(folder / name, table, sync_dir=False)
        crash_point("shard-renamed")
        entry = {"rows": table.num_rows, "sha256": sha, "status": "complete", "meta": meta, "written_at": _now()}
        self._append_journal(name, entry, folder)
        crash_point("between-shards")
        return entry

    def flush(self) -> None:
        """Wait until every shard written so far is on disk and journaled (readers in other processes see it); put
        its entry in view, or raise its error (e.g. a full disk) here. Called before the next shard, and by `finish`."""
        if self._pending is None:
            return
        name, future = self._pending
        self._pending = None
        entry = future.result()
        if self._view is not None:
            self._view["shards"][name] = entry

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def finish(self, num_shards: int, timings: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> bool:
        """Mark the output complete if all `num_shards` shards are done (swapping a staging folder in), release
        the run lock, and return whether it is complete."""
        if self.readonly:
            return True
        try:
            self.flush()
            with self._update():
                with self._editing(drop="own") as manifest:
                    complete, extras = self._finish_locked(manifest, num_shards, timings, summary)
                for extra in extras:  # files after the manifest
                    (self.path / extra).unlink(missing_ok=True)
                if complete and self.path != self.final:
                    self._swap_in()
        finally:
            self._stop_writer()
            self._close_journal()
            self._view = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        return complete

    def _finish_locked(self, manifest: dict[str, Any], num_shards: int, timings: dict[str, Any] | None,
                       summary: dict[str, Any] | None) -> tuple[bool, set[str]]:
        """Record the end of a run in `manifest`; return whether the output is complete, and the names of shards
        beyond `num_shards` dropped from it (from an earlier, larger plan)."""
        expected = {shard_name(i) for i in range(num_shards)}
        extras = set(manifest["shards"]) - expected
        for extra in extras:
            del manifest["shards"][extra]
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
        return complete, extras

    def _swap_in(self) -> None:
        """Replace the output folder by the complete staging folder: two renames, then the old one is removed.
        A crash between the renames leaves no output folder and a complete staging one; the next open finishes
        the swap (`_tidy`)."""
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        if self.final.exists():
            # A stage that also writes files of its own into the output folder (train: the model) wrote them
            # during this run: they belong to the new output.
            for entry in self.final.iterdir():
                if (entry.name not in (MANIFEST, LEGACY_MANIFEST) and not (self.path / entry.name).exists()
                        and entry.stat().st_mtime >= self.started):
                    os.replace(entry, self.path / entry.name)
            os.replace(self.final, old)
        crash_point("swap-half-done")
        os.replace(self.path, self.final)
        _fsync_dir(self.final.parent)
        shutil.rmtree(old, ignore_errors=True)
        self.path = self.final


def my_shards(num_shards: int, shard_index: int = 0, num_workers: int = 1) -> list[int]:
    """Shards this worker owns under `--shard-index i --num-shards n`: every n-th shard starting at i."""
    if not 0 <= shard_index < num_workers:
        raise UsageError(f"--shard-index must be in [0, {num_workers}), got {shard_index}")
    return [s for s in range(num_shards) if s % num_workers == shard_index]
