"""`make gpu-check`'s tiny mode on the CPU, with vLLM and FAISS hidden as on the CUDA machine (the mock of "not
installed" in tests/hide_packages), so the script cannot rot: it builds its tokenizer, policy and embedder in code,
runs the three train variants, `sample --engine hf` and `embed` through the CLI, and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.stages.test_imports import HIDE


@pytest.mark.slow
def test_gpu_check_tiny_runs_without_vllm_and_faiss(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **HIDE})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5, proc.stdout  # 3 train variants, sample, embed
    for line in rows:
        rate = float(line.split("|")[2].replace(",", ""))
        assert rate > 0, line
    assert "gpu-check: done" in proc.stdout
    assert (tmp_path / "run" / "embeddings" / "_manifest.json").exists()
