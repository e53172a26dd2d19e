"""The artifact store: atomic shards, manifests, resume, refusal to mix configs, schema checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign.errors import BadInput, NegalignError, UsageError
from negalign.store import MANIFEST, StageOutput, json_text, my_shards, open_stage, shard_name


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


# ------------------------------------------------------------------------------------------------ issue 8 / 14
# A writer in its own process, so that it can be killed (NEGALIGN_CRASH_AT) or hold the output while we try ours.
WRITER = """
import json, sys, time
from pathlib import Path
import pyarrow as pa
from negalign.store import StageOutput
path, config, shards, hold = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
overwrite = sys.argv[4] == "1"
out = StageOutput.open(path, "toy", config, {"input": "abc"}, overwrite=overwrite)
for s in range(shards):
    if not out.done(s):
        out.write_shard(s, pa.table({"prompt_id": [f"p{i}" for i in range(10 * s, 10 * s + 10)],
                                     "x": [config.get("a", 0) * 1000 + i for i in range(10 * s, 10 * s + 10)]}))
    if hold and s == 0:
        Path(hold).write_text("holding")
        while Path(hold).exists():
            time.sleep(0.05)
print("finished", out.finish(shards))
"""


def _writer(path: Path, config: dict, shards: int = 3, overwrite: bool = False, crash: str = "",
            hold: Path | None = None, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    args = [sys.executable, "-c", WRITER, str(path), json.dumps(config), str(shards), "1" if overwrite else "0",
            str(hold or "")]
    env = {**os.environ, "NEGALIGN_CRASH_AT": crash}
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def _rows(path: Path) -> list[int]:
    return open_stage(path, "toy").read().column("x").to_pylist()


def _wait_for(file: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


def test_stage_folders_read_with_pandas_polars_duckdb(tmp_path: Path) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    _write_all(tmp_path / "o", {"a": 1})
    assert (tmp_path / "o" / "_manifest.json").exists() and not (tmp_path / "o" / "manifest.json").exists()
    assert len(pd.read_parquet(tmp_path / "o")) == 30
    assert pl.scan_parquet(str(tmp_path / "o" / "*.parquet")).collect().height == 30
    assert duckdb.sql(f"select count(*) from '{tmp_path / 'o'}/*.parquet'").fetchall() == [(30,)]


def test_legacy_manifest_name_is_read_and_renamed_on_write(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    (tmp_path / "o" / MANIFEST).rename(tmp_path / "o" / "manifest.json")  # a folder written before the rename
    assert open_stage(tmp_path / "o", "toy").num_rows == 30
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [] and (tmp_path / "o" / MANIFEST).exists() and not (tmp_path / "o" / "manifest.json").exists()


def _flip_readable_bit(f: Path) -> None:
    """Flip one bit of a shard such that Parquet still reads it, as different data (found by trying)."""
    data, before = f.read_bytes(), pq.read_table(f)
    for pos in range(4, len(data) - 8):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        try:
            after = pq.read_table(pa.BufferReader(bytes(flipped)))
        except Exception:  # noqa: BLE001 - most flips make the file unreadable; we want one that does not
            continue
        if after.schema == before.schema and not after.equals(before):
            f.write_bytes(bytes(flipped))
            return
    raise AssertionError("no readable flip found")


def test_flipped_bit_is_refused_on_read_flagged_by_inspect_and_redone(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    f = tmp_path / "o" / shard_name(1)
    _flip_readable_bit(f)
    stage = open_stage(tmp_path / "o", "toy")  # cheap open; the check happens on the bytes that are read
    with pytest.raises(NegalignError, match=r"part-00001.parquet: damaged \(sha256"):
        stage.read()
    assert stage.read_shard(0).num_rows == 10
    proc = subprocess.run([sys.executable, "-m", "negalign", "inspect", str(tmp_path)], capture_output=True,
                          text=True)
    assert "damaged" in proc.stdout + proc.stderr and "part-00001" in proc.stdout + proc.stderr
    assert proc.returncode == 1
    one = subprocess.run([sys.executable, "-m", "negalign", "inspect", str(tmp_path / "o")], capture_output=True,
                         text=True)
    assert one.returncode == 1 and "damaged: part-00001.parquet" in one.stdout + one.stderr
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [1] and _rows(tmp_path / "o") == list(range(30))
    healthy = subprocess.run([sys.executable, "-m", "negalign", "inspect", str(tmp_path)], capture_output=True)
    assert healthy.returncode == 0


def test_unlisted_shards_are_never_read(tmp_path: Path) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    pq.write_table(_table(90, 10), tmp_path / "o" / shard_name(3))  # a stray file, not in the manifest
    stage = open_stage(tmp_path / "o", "toy")
    assert stage.num_rows == 30 and stage.read().num_rows == 30
    with pytest.raises(NegalignError, match="not listed"):
        stage.read_shard(3)


@pytest.mark.parametrize("point", ["shard-tmp-written", "shard-renamed", "manifest-tmp-written", "between-shards"])
def test_kill_at_each_point_then_resume(tmp_path: Path, point: str) -> None:
    killed = _writer(tmp_path / "o", {"a": 1}, crash=f"{point}:2")
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(UsageError, match="not finished"):
        open_stage(tmp_path / "o", "toy")
    done = _writer(tmp_path / "o", {"a": 1})
    assert done.returncode == 0 and "finished True" in done.stdout, done.stderr
    assert _rows(tmp_path / "o") == [1000 + i for i in range(30)]
    # The killed writer's temporary files are removed when the output is next opened for writing.
    assert not [p for p in (tmp_path / "o").iterdir() if ".tmp-" in p.name]


def test_rerun_killed_after_rewriting_a_shard_is_not_complete(tmp_path: Path) -> None:
    _writer(tmp_path / "o", {"a": 1})
    f = tmp_path / "o" / shard_name(1)
    f.write_bytes(f.read_bytes()[:50])  # damaged: the re-run redoes it
    killed = _writer(tmp_path / "o", {"a": 1}, crash="shard-renamed")
    assert killed.returncode == -9
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["status"] == "running" and "fingerprint" not in manifest
    with pytest.raises(UsageError, match="not finished"):
        open_stage(tmp_path / "o", "toy")


@pytest.mark.parametrize("how", ["error", "kill", "kill-mid-swap"])
def test_failed_or_killed_overwrite_keeps_the_old_output(tmp_path: Path, how: str) -> None:
    _writer(tmp_path / "o", {"a": 1})
    before = _rows(tmp_path / "o")
    if how == "error":  # fails after writing a shard, as a run that dies on bad data would
        out = StageOutput.open(tmp_path / "o", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
        out.write_shard(0, _table(2000, 10))
    else:
        crash = "between-shards:2" if how == "kill" else "swap-half-done"
        assert _writer(tmp_path / "o", {"a": 2}, overwrite=True, crash=crash).returncode == -9
    if how != "kill-mid-swap":
        assert _rows(tmp_path / "o") == before  # untouched, and still complete
        assert json.loads((tmp_path / "o" / MANIFEST).read_text())["config"] == {"a": 1}
    # Re-running the new config completes it (resuming the staging folder) and swaps it in.
    done = _writer(tmp_path / "o", {"a": 2}, overwrite=True)
    assert done.returncode == 0, done.stderr
    assert _rows(tmp_path / "o") == [2000 + i for i in range(30)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["o"]  # no staging or old folder left


def test_overwrite_with_shard_parallel_workers_shares_one_staging_folder(tmp_path: Path) -> None:
    _writer(tmp_path / "o", {"a": 1})
    for worker in (0, 1):  # two workers of the new config, each doing its own shards, both with --overwrite
        out = StageOutput.open(tmp_path / "o", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
        assert out.path != out.final
        for s in my_shards(3, worker, 2):
            out.write_shard(s, _table(10 * s, 10))
        assert out.finish(3) == (worker == 1)
        if worker == 0:
            assert _rows(tmp_path / "o")[0] == 1000  # the old output stays until the new one is complete
    assert open_stage(tmp_path / "o", "toy").config == {"a": 2}
    # A late worker of the same config finds the new output in place and has nothing to do.
    late = StageOutput.open(tmp_path / "o", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
    assert late.path == late.final and all(late.done(s) for s in range(3))
    late.finish(3)


def test_concurrent_other_config_is_refused_and_a_dead_holder_is_stale(tmp_path: Path) -> None:
    hold = tmp_path / "holding"
    holder = _writer(tmp_path / "o", {"a": 1}, hold=hold, wait=False)
    _wait_for(hold, holder)
    with pytest.raises(UsageError, match=rf"in use by pid {holder.pid} on .* since .*another config \(a: 1 -> 2\)"):
        StageOutput.open(tmp_path / "o", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
    # A worker of the same config may share the output.
    same = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    same.finish(3)
    holder.kill()  # SIGKILL: its flock goes with it
    holder.wait()
    hold.unlink()
    done = _writer(tmp_path / "o", {"a": 2}, overwrite=True)
    assert done.returncode == 0, done.stderr
    assert _rows(tmp_path / "o") == [2000 + i for i in range(30)]


BROKEN = {
    "truncated": lambda text: text[: len(text) // 2],
    "list": lambda text: "[]",
    "no fingerprint": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "fingerprint"}),
    "no shards": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "shards"}),
    "no status": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "status"}),
    "stub": lambda text: json.dumps({**json.loads(text), "shards": {shard_name(0): json.loads(text)["shards"][
        shard_name(0)]}}),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_manifest_one_line_and_overwrite_replaces_it(tmp_path: Path, kind: str) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    m = tmp_path / "o" / MANIFEST
    m.write_text(BROKEN[kind](m.read_text()))
    with pytest.raises(UsageError, match=r"broken manifest \(.*\); re-run .* with --overwrite") as e:
        open_stage(tmp_path / "o", "toy")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="broken manifest"):
        StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    proc = subprocess.run([sys.executable, "-m", "negalign", "inspect", str(tmp_path / "o")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "broken manifest" in proc.stderr and "Traceback" not in proc.stderr
    _, written = _write_all(tmp_path / "o", {"a": 1}, overwrite=True)
    assert written == [0, 1, 2] and _rows(tmp_path / "o") == list(range(30))


def test_non_main_rank_never_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_all(tmp_path / "o", {"a": 1})
    before = (tmp_path / "o" / MANIFEST).read_text()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("NEGALIGN_RANK_WAIT_S", "0.1")
    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"}, overwrite=True)
    assert all(out.done(s) for s in range(3)) and out.finish(3)
    assert (tmp_path / "o" / MANIFEST).read_text() == before
    with pytest.raises(NegalignError, match="rank 0"):  # waits for rank 0's output of this config; none comes
        StageOutput.open(tmp_path / "o", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
    assert (tmp_path / "o" / MANIFEST).read_text() == before and not list(tmp_path.glob(".o.new-*"))


def test_dotdot_path_makes_no_stray_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = StageOutput.open(Path("dd/../dd2/samples"), "toy", {"a": 1})
    out.finish(0)
    assert (tmp_path / "dd2" / "samples" / MANIFEST).exists() and not (tmp_path / "dd").exists()


def test_inspect_shows_unknown_shard_total(tmp_path: Path) -> None:
    out = StageOutput.open(tmp_path / "run" / "o", "toy", {"a": 1})
    out.write_shard(0, _table(0, 10))  # killed before finish: the total is not known yet
    out._lock.release()
    proc = subprocess.run([sys.executable, "-m", "negalign", "inspect", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1/?" in proc.stdout + proc.stderr and "None" not in proc.stdout + proc.stderr


def test_files_a_stage_writes_into_its_folder_survive_the_swap(tmp_path: Path) -> None:
    """`train` writes its model into the output folder itself, not as shards: --overwrite keeps what it wrote."""
    _write_all(tmp_path / "m", {"a": 1}, shards=0)
    (tmp_path / "m" / "old-weights.bin").write_text("old")
    time.sleep(0.05)
    out = StageOutput.open(tmp_path / "m", "toy", {"a": 2}, {"input": "abc"}, overwrite=True)
    (out.final / "model.safetensors").write_text("new")
    assert out.finish(0)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [MANIFEST, "model.safetensors"]
    assert open_stage(tmp_path / "m").config == {"a": 2}


def test_interleaved_workers_keep_each_others_shards(tmp_path: Path) -> None:
    """Each writer caches the manifest it wrote; another writer's update must be seen, not overwritten. (Two
    writers in one process share the run lock, so only one finishes.)"""
    a = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    b = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    for s, worker in enumerate([a, b, a, b, a]):
        worker.write_shard(s, _table(10 * s, 10))
    b.flush()  # b's last shard is written in its background thread; a can only fold what b has journaled
    assert a.finish(5)
    assert open_stage(tmp_path / "o", "toy").read().column("x").to_pylist() == list(range(50))


def test_manifest_json_is_one_line_per_shard_and_round_trips() -> None:
    manifest = {"stage": "toy", "config": {"a": 1, "nested": {"b": [1, 2]}}, "empty": {},
                "shards": {shard_name(i): {"rows": i, "sha256": "x" * 64, "meta": {"k": [i]}} for i in range(20)}}
    text = json_text(manifest)
    assert json.loads(text) == manifest
    assert sum(line.strip().startswith('"part-') for line in text.splitlines()) == 20
    assert '"nested": {' in text  # small dicts stay indented, one key per line


def test_manifest_is_read_a_shard_line_at_a_time_and_any_other_layout_whole(tmp_path: Path) -> None:
    """Entries are held as compact JSON (`ShardEntries`), parsed a line at a time from the layout the store writes;
    a manifest laid out otherwise (re-indented by hand) reads the same, and a bad entry is refused either way."""
    from negalign.store import ShardEntries, read_manifest

    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    for s in range(3):
        out.write_shard(s, _table(10 * s, 10), {"k": [s, {"deep": "x\n}"}]})
    out.finish(3)
    f = tmp_path / "o" / MANIFEST
    raw = json.loads(f.read_text())
    by_line = read_manifest(tmp_path / "o")
    assert isinstance(by_line["shards"], ShardEntries) and by_line == raw and by_line["shards"] == raw["shards"]
    f.write_text(json.dumps(raw, indent=4))
    assert read_manifest(tmp_path / "o") == raw
    bad = {**raw, "shards": {**raw["shards"], shard_name(1): {"rows": 10, "status": "complete"}}}
    for text in (json.dumps(bad, indent=4), json_text(bad)):
        f.write_text(text)
        with pytest.raises(UsageError, match=f"shard entry '{shard_name(1)}' lacks rows, sha256 or status"):
            read_manifest(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ issue 20: journals

def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("_journal-*.jsonl"))


def test_manifest_writes_per_run_do_not_grow_with_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping per shard is one journal line: the manifest is written a fixed number of times per run."""
    import negalign.store as store

    writes: list[Path] = []
    real = store.atomic_write_json
    monkeypatch.setattr(store, "atomic_write_json", lambda path, obj: (writes.append(path), real(path, obj)))
    counts = []
    for n in (2, 40):
        writes.clear()
        _write_all(tmp_path / f"o{n}", {"a": 1}, shards=n)
        counts.append(len(writes))
    assert counts[0] == counts[1] <= 4, counts


def test_unfolded_folder_reads_as_the_manifest_would(tmp_path: Path) -> None:
    from negalign.store import read_manifest

    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    for s in range(3):
        out.write_shard(s, _table(10 * s, 10), {"k": s})
    out.flush()                                                  # the last shard is written in the background
    on_disk = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert on_disk["shards"] == {} and len(_journals(tmp_path / "o")) == 1  # journaled, not yet folded
    folded = read_manifest(tmp_path / "o")
    assert sorted(folded["shards"]) == [shard_name(s) for s in range(3)]
    assert folded["shards"][shard_name(2)]["meta"] == {"k": 2} and folded["status"] == "running"
    with pytest.raises(UsageError, match=r"not finished \(3/\? shards\)"):
        open_stage(tmp_path / "o", "toy")
    assert out.finish(3)
    final = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert not _journals(tmp_path / "o") and "journals" not in final  # the fold removed them
    assert {k: v for k, v in final["shards"][shard_name(2)].items() if k != "written_at"} == {
        "rows": 10, "sha256": folded["shards"][shard_name(2)]["sha256"], "status": "complete", "meta": {"k": 2}}
    assert set(final) == {"stage", "negalign_version", "config", "config_fingerprint", "inputs", "input_paths",
                          "lineage", "info", "status", "num_shards", "shards", "created_at", "timings", "versions",
                          "updated_at", "fingerprint"}  # the format of a finished manifest is unchanged


def test_torn_last_journal_line_is_ignored_and_the_shard_redone(tmp_path: Path) -> None:
    out = StageOutput.open(tmp_path / "o", "toy", {"a": 1}, {"input": "abc"})
    out.write_shard(0, _table(0, 10))
    out.write_shard(1, _table(10, 10))
    out.flush()
    out._lock.release()  # as if killed: no finish
    journal = _journals(tmp_path / "o")[0]
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 40])  # the second line torn
    from negalign.store import read_manifest

    assert sorted(read_manifest(tmp_path / "o")["shards"]) == [shard_name(0)]
    _, written = _write_all(tmp_path / "o", {"a": 1})
    assert written == [1, 2] and _rows(tmp_path / "o") == list(range(30)) and not _journals(tmp_path / "o")


@pytest.mark.parametrize("point", ["journal-torn:1", "journal-torn:2", "shard-renamed:2", "fold-written:1",
                                   "journal-removed:1"])
def test_kill_at_each_journal_point_then_resume(tmp_path: Path, point: str) -> None:
    """Killed mid-line, between a shard's rename and its line, after a fold wrote the manifest, or while it removes
    journals: the output is never complete early, and a re-run completes it to the clean result."""
    killed = _writer(tmp_path / "o", {"a": 1}, crash=point)
    assert killed.returncode == -9, killed.stderr
    from negalign.store import read_manifest

    m = read_manifest(tmp_path / "o")
    for name, entry in m["shards"].items():  # every journaled shard is intact
        assert pq.read_table(tmp_path / "o" / name).num_rows == entry["rows"]
    if m["status"] != "complete":
        with pytest.raises(UsageError, match="not finished"):
            open_stage(tmp_path / "o", "toy")
    done = _writer(tmp_path / "o", {"a": 1})
    assert done.returncode == 0 and "finished True" in done.stdout, done.stderr
    assert _rows(tmp_path / "o") == [1000 + i for i in range(30)]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [MANIFEST] + [shard_name(s) for s in range(3)]


PARALLEL_WORKER = """
import sys
import pyarrow as pa
from negalign.store import StageOutput, my_shards
path, worker, workers, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = StageOutput.open(path, "toy", {"a": 1}, {"input": "abc"})
for s in my_shards(shards, worker, workers):
    out.write_shard(s, pa.table({"prompt_id": [f"p{s}"], "x": [s]}))
print("finished", out.finish(shards))
"""


def test_shard_parallel_processes_share_a_folder(tmp_path: Path) -> None:
    """Four worker processes at once, each journaling its own shards into a file of its own; the one that finds
    every shard done completes the output."""
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL_WORKER, str(tmp_path / "o"), str(w), "4", "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert any("finished True" in o for o, _ in outs)
    assert _rows(tmp_path / "o") == list(range(40)) and not _journals(tmp_path / "o")


def test_float_vectors_are_stored_plain_and_everything_else_zstd() -> None:
    """Embeddings neither repeat nor compress: no dictionary, no compression for them (faster to write and read);
    the leaf paths the settings name are the ones pyarrow writes, nested columns included."""
    from negalign.store import parquet_bytes

    t = pa.table({"prompt_id": ["a", "b"], "messages": [[{"role": "user", "content": "x"}]] * 2,
                  "meta": pa.array([{"k": 1}] * 2, pa.map_(pa.string(), pa.int64())),
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 8, pa.float32()), 4),
                  "rejected_sim": pa.array([[0.1], [0.2]], pa.list_(pa.float32()))})
    data = parquet_bytes(t)
    assert pq.read_table(pa.BufferReader(data)).equals(t)
    rg = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0)
    codecs = {rg.column(i).path_in_schema: rg.column(i).compression for i in range(rg.num_columns)}
    assert codecs == {"prompt_id": "ZSTD", "messages.list.element.role": "ZSTD",
                      "messages.list.element.content": "ZSTD", "meta.key_value.key": "ZSTD",
                      "meta.key_value.value": "ZSTD", "embedding.list.element": "UNCOMPRESSED",
                      "rejected_sim.list.element": "UNCOMPRESSED"}


def _prompts_folder(path: Path, sizes: list[int]) -> object:
    out = StageOutput.open(path, "toy-prompts", {"toy": 1}, {})
    start = 0
    for s, n in enumerate(sizes):
        out.write_shard(s, _table(start, n))
        start += n
    assert out.finish(len(sizes))
    return open_stage(path, "toy-prompts")


def test_prompt_rows_reads_only_the_prompts_shards_a_samples_shard_covers(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from negalign import store

    prompts = _prompts_folder(tmp_path / "prompts", [25, 25, 25])           # 75 prompts, prepare-like shards
    samples = store.StageOutput.open(tmp_path / "samples", "toy-samples", {"shard_size": 10}, {"prompts": prompts})
    for s in range(8):                                                       # sample.py: 10 prompts a shard
        samples.write_shard(s, _table(10 * s, min(10, 75 - 10 * s)))
    assert samples.finish(8)
    samples_in = open_stage(tmp_path / "samples", "toy-samples")
    reads: list[str] = []
    real = store.StageInput.read_shard
    monkeypatch.setattr(store.StageInput, "read_shard",
                        lambda self, shard, columns=None: reads.append(str(shard)) or real(self, shard, columns))
    rows = store.PromptRows(prompts, ["prompt_id", "x"], samples_in)
    assert rows.for_shard(2, ["p20", "p29"]) == {f"p{i}": {"prompt_id": f"p{i}", "x": i} for i in range(20, 30)}
    assert reads == ["part-00000.parquet", "part-00001.parquet"]             # rows 20..29 straddle shards 0 and 1
    assert set(rows.for_shard(3, ["p30"])) == {f"p{i}" for i in range(30, 40)}
    assert reads == ["part-00000.parquet", "part-00001.parquet"]             # shard 1 was kept: no new read
    assert set(rows.for_shard(7, ["p70", "p74"])) == {f"p{i}" for i in range(70, 75)}
    assert rows.values("x") == set(range(75))
    # Ids outside the expected range (e.g. prompts not sampled in this order): the whole folder, indexed once.
    assert rows.for_shard(0, ["p60", "nope"]) == {"p60": {"prompt_id": "p60", "x": 60}}


def test_prompt_rows_of_other_prompts_index_the_whole_folder(tmp_path: Path) -> None:
    from negalign import store

    sampled = _prompts_folder(tmp_path / "sft_prompts", [10])
    superset = _prompts_folder(tmp_path / "prompts", [30, 30])
    samples = store.StageOutput.open(tmp_path / "samples", "toy-samples", {"shard_size": 10}, {"prompts": sampled})
    samples.write_shard(0, _table(0, 10))
    assert samples.finish(1)
    rows = store.PromptRows(superset, ["prompt_id", "x"], open_stage(tmp_path / "samples", "toy-samples"))
    assert rows.shard_size is None                                   # not the prompts the samples were made from
    assert set(rows.for_shard(0, ["p3", "p45"])) == {"p3", "p45"}
