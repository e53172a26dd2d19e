"""`prepare`: read a dataset (Parquet, JSONL, a `datasets` folder) and write the prompts schema (SPEC §2).

prompt_id = sha256 of the normalised messages (roles lower-cased, contents stripped, canonical JSON), so the same
prompt gets the same id in every run. Duplicate prompts collapse into the first; their given negatives are merged.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from negalign import adapters
from negalign.config import PrepareConfig
from negalign.console import console
from negalign.errors import BadInput, UsageError
from negalign.stages import output_dirs
from negalign.store import PROMPTS_SCHEMA, StageOutput, fingerprint, sha256_file


def normalise_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]).strip().lower(), "content": str(m["content"]).strip()} for m in messages]


def prompt_id(messages: list[dict[str, str]]) -> str:
    """sha256 of the canonical JSON of the normalised messages."""
    canon = json.dumps(normalise_messages(messages), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted([*path.rglob("*.parquet"), *path.rglob("*.jsonl"), *path.rglob("*.json")])
    files = [f for f in files if f.name not in ("dataset_info.json", "state.json", "dataset_dict.json")]
    if not files:
        raise BadInput("no .parquet, .jsonl or datasets files in this folder", file=str(path))
    return files


@dataclass
class InputFile:
    """The rows of one input file; `row_numbers[i]` names row i in errors (JSONL: its line number, from 1)."""

    file: str
    rows: list[dict[str, Any]]
    row_numbers: list[int] | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_jsonl(f: Path, on_bad_row: str) -> InputFile:
    """A JSONL file, line by line: rows are numbered by line (1-based, as an editor shows), a UTF-8 BOM is accepted.

    A line that is not UTF-8, not JSON or not an object is a bad row (`not_utf8`, `invalid_json`, `not_an_object`):
    BadInput naming its line, or, with on_bad_row="skip", skipped and counted like any other bad row.
    """
    out = InputFile(str(f), [], [])
    skipped: Counter[str] = Counter()
    with open(f, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            reason = detail = None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason, detail = "not_utf8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
            else:
                if not text.strip():
                    continue
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    reason, detail = "invalid_json", f"not valid JSON ({e.msg} at character {e.colno})"
                else:
                    if not isinstance(row, dict):
                        reason, detail = "not_an_object", f"each line must be a JSON object, not {type(row).__name__}"
            if reason is None:
                out.rows.append(row)
                out.row_numbers.append(line_no)
            elif on_bad_row == "skip":
                skipped[reason] += 1
            else:
                raise BadInput(f"{detail} [{reason}]", file=str(f), row=line_no)
    out.skipped = dict(skipped)
    return out


def read_rows(path: Path, on_bad_row: str = "fail") -> list[InputFile]:
    """The rows of a Parquet file, a JSONL file, a `datasets` save_to_disk folder, or a folder of such files."""
    if not path.exists():
        raise BadInput("input not found", file=str(path))
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 — any failure here means the folder is unreadable
            raise BadInput(f"unreadable datasets folder ({_one_line(e)})", file=str(path)) from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise BadInput(f"DatasetDict without a 'train' split (splits: {list(ds)})", file=str(path))
            ds = ds["train"]
        return [InputFile(str(path), ds.to_list())]
    out = []
    for f in _data_files(path):
        if f.suffix == ".parquet":
            try:
                out.append(InputFile(str(f), pq.read_table(f).to_pylist()))
            except Exception as e:  # noqa: BLE001
                raise BadInput(f"unreadable Parquet file ({_one_line(e)})", file=str(f)) from e
        elif f.suffix in (".jsonl", ".json"):
            out.append(_read_jsonl(f, on_bad_row))
        else:
            raise BadInput(f"unsupported file type '{f.suffix}' (use .parquet, .jsonl or a datasets folder)",
                           file=str(f))
    return out


def is_test(pid: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out split: a uniform number from sha256(seed, prompt_id) below `fraction`."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big") / 2**64
    return u < fraction


def build_prompts(cfg: PrepareConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read and convert the input; return unique prompt records and a summary."""
    fields = adapters.FieldNames(prompt=cfg.prompt_field, messages=cfg.messages_field, target=cfg.target_field,
                                 negatives=cfg.negatives_field)
    by_id: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"input_rows": 0, "bad_rows": {}, "duplicates": 0}
    for part in read_rows(Path(cfg.input), cfg.on_bad_row):
        source, rows = part.file, part.rows
        summary["input_rows"] += len(rows) + sum(part.skipped.values())
        for reason, n in part.skipped.items():
            summary["bad_rows"][reason] = summary["bad_rows"].get(reason, 0) + n
        if not rows:
            continue
        fmt = cfg.format
        if fmt == "auto":
            columns = list(rows[0].keys()) if rows else []
            fmt = adapters.detect_format(columns, fields)
            summary["format"] = fmt
        elif fmt not in adapters.FORMATS:
            raise UsageError(f"unknown --format '{fmt}' (choose from auto, {', '.join(adapters.FORMATS)})")
        summary["format"] = fmt
        records, bad = adapters.convert_rows(rows, fmt, fields, source=source, on_bad_row=cfg.on_bad_row,
                                             task_field=getattr(cfg, "task_field", None),
                                             row_numbers=part.row_numbers, max_prompt_chars=cfg.max_prompt_chars)
        for reason, n in bad.items():
            summary["bad_rows"][reason] = summary["bad_rows"].get(reason, 0) + n
        for rec in records:
            messages = normalise_messages(rec["messages"])
            if cfg.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system_prompt.strip()})
            pid = prompt_id(messages)
            negatives = rec.get("negatives")
            if pid in by_id:
                summary["duplicates"] += 1
                kept = by_id[pid]
                if negatives:
                    merged = list(dict.fromkeys((kept["negatives"] or []) + list(negatives)))
                    kept["negatives"] = merged
                if kept["target"] is None and rec.get("target"):
                    kept["target"] = rec["target"]
                if kept.get("task") is None and rec.get("task"):
                    kept["task"] = rec["task"]
                continue
            by_id[pid] = {"prompt_id": pid, "messages": messages, "target": rec.get("target"),
                          "negatives": list(negatives) if negatives is not None else None,
                          "task": rec.get("task")}
    if summary["input_rows"] == 0:
        raise BadInput("the input has no rows (empty file)", file=str(cfg.input))
    if not by_id:
        bad = ", ".join(f"{k}: {v}" for k, v in summary["bad_rows"].items())
        raise BadInput(f"no usable prompts in the input (skipped: {bad or 'none'})", file=str(cfg.input))
    return list(by_id.values()), summary


def _write(records: list[dict[str, Any]], out_dir: Path, cfg: PrepareConfig, inputs: dict[str, str],
           stage_config: dict[str, Any], bad_rows: dict[str, int]) -> None:
    out = StageOutput.open(out_dir, "prompts", stage_config, inputs, overwrite=cfg.overwrite)
    num_shards = max(1, -(-len(records) // cfg.shard_size))
    for s in range(num_shards):
        chunk = records[s * cfg.shard_size:(s + 1) * cfg.shard_size]
        table = pa.Table.from_pylist(chunk, schema=PROMPTS_SCHEMA)
        if out.done(s):
            continue
        out.write_shard(s, table, {"first_prompt_id": chunk[0]["prompt_id"] if chunk else None})
    out.finish(num_shards, summary={"prompts": len(records),
                                    "with_target": sum(r["target"] is not None for r in records),
                                    "with_negatives": sum(bool(r["negatives"]) for r in records),
                                    "bad_rows": bad_rows})


def run(cfg: PrepareConfig) -> None:
    if not cfg.input:
        raise UsageError("prepare needs --input FILE (Parquet, JSONL or a datasets folder)")
    records, summary = build_prompts(cfg)
    input_path = Path(cfg.input)
    input_fp = fingerprint([sha256_file(Path(f)) for f in (
        sorted(p for p in input_path.rglob("*") if p.is_file()) if input_path.is_dir() else [input_path])])
    stage_config = {k: getattr(cfg, k) for k in ("format", "prompt_field", "messages_field", "target_field",
                                                 "negatives_field", "system_prompt", "test_fraction", "on_bad_row",
                                                 "shard_size", "seed")}
    if getattr(cfg, "task_field", None):  # only when set, so runs prepared before the option keep their fingerprint
        stage_config["task_field"] = cfg.task_field
    if cfg.max_prompt_chars != PrepareConfig.max_prompt_chars:  # likewise, only when not the default
        stage_config["max_prompt_chars"] = cfg.max_prompt_chars
    train = [r for r in records if not is_test(r["prompt_id"], cfg.test_fraction, cfg.seed)]
    test = [r for r in records if is_test(r["prompt_id"], cfg.test_fraction, cfg.seed)]
    if not train:
        raise UsageError("--test-fraction leaves no training prompts")
    train_dir, *test_dir = output_dirs(cfg)  # RUN/prompts, and RUN/prompts_test with --test-fraction
    _write(train, train_dir, cfg, {"input": input_fp}, stage_config, summary["bad_rows"])
    if test_dir:
        _write(test, test_dir[0], cfg, {"input": input_fp}, stage_config, summary["bad_rows"])
    n_neg = sum(len(r["negatives"] or []) for r in records)
    bad = ", ".join(f"{k}: {v}" for k, v in summary["bad_rows"].items()) or "none"
    console.print(
        f"prepare ({summary.get('format')}): {summary['input_rows']} rows -> {len(records)} prompts "
        f"({summary['duplicates']} duplicates collapsed; bad rows skipped: {bad}); "
        f"{sum(r['target'] is not None for r in records)} targets, {n_neg} given negatives; "
        f"train {len(train)} -> {train_dir}" + (f", test {len(test)} -> {test_dir[0]}" if test_dir else ""))
