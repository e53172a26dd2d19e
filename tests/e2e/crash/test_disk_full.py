"""Disk full (issue 13): a write that fails with ENOSPC leaves the previous complete output intact, exits 1 with one
line, and a re-run once there is space again gives the same output as a clean run.

Two ways to fill the disk: an injected failing Parquet write (always runs), and a real size-limited tmpfs (runs
where `mount -t tmpfs` is allowed, i.e. as root with CAP_SYS_ADMIN; skipped elsewhere).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from negalign.cli import app
from negalign.store import read_manifest
from tests.conftest import EXAMPLE_DATA
from tests.e2e.crash.harness import snapshot


def _data(path: Path, n: int) -> Path:
    path.write_text("\n".join(EXAMPLE_DATA.read_text().splitlines()[:n]) + "\n")
    return path


def _prepare(run: Path, data: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["prepare", "--run", str(run), "--input", str(data), *extra])
    return result.exit_code, result.stderr


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def failing_write(monkeypatch) -> Iterator[dict]:
    """Make the N-th Parquet file write (`state["fail_at"]`) write half its bytes and then fail with ENOSPC. (The
    store serialises a shard in memory, then writes the bytes to a temporary file.)"""
    real = Path.write_bytes
    state = {"calls": 0, "fail_at": None}

    def write_bytes(self: Path, data) -> int:
        if ".parquet" not in self.name:
            return real(self, data)
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            real(self, memoryview(data)[: len(memoryview(data)) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    yield state


def test_enospc_mid_overwrite_keeps_previous_output(tmp_path: Path, failing_write) -> None:
    data, run = _data(tmp_path / "d.jsonl", 12), tmp_path / "run"
    assert _prepare(run, data, "--shard-size", "4")[0] == 0
    before = _files(run / "prompts")
    failing_write.update(calls=0, fail_at=2)  # the second shard of the new output fails
    code, err = _prepare(run, data, "--shard-size", "2", "--overwrite")
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert _files(run / "prompts") == before  # the complete old output is untouched
    # Space again: the same command completes, equal to a clean run.
    failing_write.update(fail_at=None)
    assert _prepare(run, data, "--shard-size", "2", "--overwrite")[0] == 0
    assert _prepare(tmp_path / "clean", data, "--shard-size", "2")[0] == 0
    assert snapshot(run / "prompts") == snapshot(tmp_path / "clean" / "prompts")
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_enospc_mid_run_resumes_to_the_clean_output(tmp_path: Path, failing_write) -> None:
    data, run = _data(tmp_path / "d.jsonl", 12), tmp_path / "run"
    failing_write.update(fail_at=3)
    code, err = _prepare(run, data, "--shard-size", "2")
    assert code == 1 and "No space left on device" in err
    manifest = read_manifest(run / "prompts")  # with its journal folded in, as resume sees it
    assert manifest["status"] != "complete" and len(manifest["shards"]) == 2  # shards 0 and 1 are kept
    failing_write.update(fail_at=None)
    assert _prepare(run, data, "--shard-size", "2")[0] == 0
    assert _prepare(tmp_path / "clean", data, "--shard-size", "2")[0] == 0
    assert snapshot(run / "prompts") == snapshot(tmp_path / "clean" / "prompts")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the injected ENOSPC tests cover it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_keeps_previous_output(tmp_path: Path, tiny_disk: Path) -> None:
    data, run = _data(tmp_path / "d.jsonl", 12), tiny_disk / "run"
    assert _prepare(run, data, "--shard-size", "4")[0] == 0
    before = _files(run / "prompts")
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill every remaining block
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    code, err = _prepare(run, data, "--shard-size", "2", "--overwrite")
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert _files(run / "prompts") == before
    filler.unlink()
    assert _prepare(run, data, "--shard-size", "2", "--overwrite")[0] == 0
    assert _prepare(tmp_path / "clean", data, "--shard-size", "2")[0] == 0
    assert snapshot(run / "prompts") == snapshot(tmp_path / "clean" / "prompts")
