"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) on the real default models where they need a model.

Tests by level: unit/ (the pure modules, config, adapters, docs: no model, seconds), stages/ (one stage or the
store through the CLI on tiny or default models), e2e/ (pipelines, the examples, and the crash matrix in e2e/crash/).
`pytest tests/unit` is the quick check; `make test` runs all three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = ROOT / "examples" / "data" / "short_answers.jsonl"


def negalign(
    *args: str, check: bool = False, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "negalign", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"negalign {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small_prompts(tmp_path: Path) -> Path:
    """A run directory with 4 prepared short-answer prompts."""
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()[::12]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    negalign("prepare", "--run", run, "--input", data, check=True)
    return run
