"""The artifact store: atomic shards, manifests, resume, refusal to mix configs, schema checks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign.errors import BadInput, UsageError
from negalign.store import MANIFEST, StageOutput, my_shards, open_stage, shard_name


def _table(start: int, n: int) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(start, start + n)], "x": list(range(start, start + n))})


def _write_all(path: Path, config: dict, shards: int = 3, overwrite: bool = False) -> tuple[StageOutput, list[int]]:
    out = StageOutput.open(path, "toy", config, {"input": "abc"}, overwrite=overwrite)
    written = []
    for s in range(shards):
        if out.done(s):
            continue
        out.write_shard(s, _table(10 * s, 10))
        written.append(s)
    out.finish(shards)
    return out, written


def test_write_then_resume_skips_complete_shards(tmp_path: Path) -> None:
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [0, 1, 2]
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["num_shards"] == 3
    assert {e["rows"] for e in manifest["shards"].values()} == {10}
    assert manifest["config"] == {"a": 1} and manifest["inputs"] == {"input": "abc"}
    assert "fingerprint" in manifest and manifest["versions"]["pyarrow"]
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == []
    assert open_stage(tmp_path / "o", "toy").read().num_rows == 30


def test_truncated_shard_is_detected_and_redone(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    f = tmp_path / "o" / shard_name(1)
    f.write_bytes(f.read_bytes()[:50])  # a half-written file, as after a crash
    with pytest.raises(Exception, match="sha256"):
        open_stage(tmp_path / "o", verify=True)
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [1]
    assert pq.read_table(f).column("x").to_pylist() == list(range(10, 20))


def test_missing_shard_and_unlisted_file_are_redone(tmp_path: Path) -> None:
    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    out.write_shard(0, _table(0, 10))
    # A shard renamed into place but killed before the manifest update: on disk, not in the manifest.
    pq.write_table(_table(10, 10), tmp_path / "o" / shard_name(1))
    assert not out.finish(3)
    with pytest.raises(UsageError, match="not finished"):
        open_stage(tmp_path / "o")
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [1, 2]


def test_config_change_is_refused_without_overwrite(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"temperature": 1.0})
    before = (tmp_path / "o" / MANIFEST).read_text()
    with pytest.raises(UsageError, match=r"another config \(temperature: 1.0 -> 0.7\).*--overwrite"):
        StageOutput.open(tmp_path / "o", "toy", {"temperature": 0.7}, {"input": "abc"})
    assert (tmp_path / "o" / MANIFEST).read_text() == before  # nothing on disk was touched
    with pytest.raises(UsageError, match="inputs changed"):
        StageOutput.open(tmp_path / "o", "toy", {"temperature": 1.0}, {"input": "other"})
    _, written = _write_all(tmp_path / "o", {"temperature": 0.7}, overwrite=True)
    assert written == [0, 1, 2]
    assert json.loads((tmp_path / "o" / MANIFEST).read_text())["config"] == {"temperature": 0.7}


def test_shrinking_plan_drops_extra_shards(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1}, shards=3)
    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    assert out.finish(2)
    assert not (tmp_path / "o" / shard_name(2)).exists()
    assert open_stage(tmp_path / "o").num_rows == 20


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    assert not [p for p in (tmp_path / "o").iterdir() if ".tmp-" in p.name]


def test_schema_check_names_the_column(tmp_path: Path) -> None:
    out = StageOutput.open(tmp_path / "s", "sample", {"a": 1})
    out.write_shard(0, pa.table({"prompt_id": ["p"], "sample_idx": [0], "text": ["t"]}))
    out.finish(1)
    with pytest.raises(BadInput, match="column 'num_tokens'"):
        open_stage(tmp_path / "s", "sample")


def test_shard_parallel_split_is_disjoint_and_complete() -> None:
    parts = [my_shards(10, i, 3) for i in range(3)]
    assert sorted(s for p in parts for s in p) == list(range(10))
    with pytest.raises(UsageError):
        my_shards(10, 3, 3)
