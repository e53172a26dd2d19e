"""Model fingerprints, fault injection and lineage checks across stages (issue 8)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from negalign import filter as filter_mod
from negalign import pair as pair_mod
from negalign.config import FilterConfig, PairConfig
from negalign.embed import embed_schema, text_sha
from negalign.errors import NegalignError, UsageError
from negalign.models import chat_template_hash, model_fingerprint
from negalign.prepare import prompt_id
from negalign.sample import SAMPLE_SCHEMA
from negalign.store import PROMPTS_SCHEMA, StageInput, StageOutput, open_stage
from tests.conftest import negalign


def _model_folder(path: Path, weights: np.ndarray, config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy", "hidden_size": 4}))
    save_file({"w": weights}, str(path / "model.safetensors"))
    return path


def test_model_fingerprint_is_content_not_folder_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    a = _model_folder(tmp_path / "runs" / "a" / "models" / "sc", w)
    b = _model_folder(tmp_path / "runs" / "b" / "models" / "sc", w + 1.0)  # same name and header, other weights
    c = _model_folder(tmp_path / "copy" / "elsewhere", w)  # same content, other name
    d = _model_folder(tmp_path / "d" / "sc", w, {"model_type": "toy", "hidden_size": 8})
    fa, fb, fc, fd = (model_fingerprint(str(p)) for p in (a, b, c, d))
    assert fa != fb and fa != fd
    assert fa == fc and len(fa) == 16


def test_chat_template_hash() -> None:
    class Tok:
        chat_template = "{{ messages }}"

    class Other:
        chat_template = "{{ messages }}!"

    class NoTemplate:
        chat_template = None

    assert chat_template_hash(Tok()) != chat_template_hash(Other())
    assert chat_template_hash(NoTemplate()) == "none"


def test_crash_point_kills_at_the_nth_hit(tmp_path: Path) -> None:
    code = ("from negalign.faults import crash_point\n"
            "for i in range(5):\n    print(i, flush=True)\n    crash_point('here')\nprint('survived')\n")
    run = lambda spec: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                      env={**os.environ, "NEGALIGN_CRASH_AT": spec})
    killed = run("here:3")
    assert killed.returncode == -9 and killed.stdout.split() == ["0", "1", "2"]
    assert run("elsewhere").stdout.split()[-1] == "survived"
    assert run("here").stdout.split() == ["0"]


# ------------------------------------------------------------------------------------------------ lineage
# A hand-built chain prompts -> samples -> embeddings (no model needed), then the real `filter` and `pair` stages.
# Each hand-built output is opened with its inputs as the stages open theirs, so the manifests carry lineage.

def _stage(path: Path, stage: str, rows: list[dict], schema: pa.Schema, config: dict, inputs: dict,
           overwrite: bool = False) -> StageInput:
    out = StageOutput.open(path, stage, config, inputs, overwrite=overwrite)
    out.write_shard(0, pa.Table.from_pylist(rows, schema=schema))
    assert out.finish(1)
    return open_stage(path, stage)


def _prompts(run: Path, targets: tuple[str, ...] = ("Paris", "Tokyo")) -> StageInput:
    rows = []
    for i, target in enumerate(targets):
        messages = [{"role": "user", "content": f"question {i}"}]
        rows.append({"prompt_id": prompt_id(messages), "messages": messages, "target": target, "negatives": None})
    return _stage(run / "prompts", "prompts", rows, PROMPTS_SCHEMA, {"targets": list(targets)}, {"input": "file"},
                  overwrite=True)


def _samples(run: Path, prompts: StageInput, word: str, path: Path | None = None) -> StageInput:
    pids = prompts.read(["prompt_id"]).column("prompt_id").to_pylist()
    rows = [{"prompt_id": pid, "sample_idx": j, "text": f"{word} {j}", "num_tokens": 2, "finish_reason": "stop",
             "seed": j, "engine": "hf", "model": "m"} for pid in pids for j in range(4)]
    return _stage(path or run / "samples", "sample", rows, SAMPLE_SCHEMA, {"word": word}, {"prompts": prompts},
                  overwrite=True)


def _embeddings(run: Path, samples: StageInput, prompts: StageInput) -> StageInput:
    rows = []
    for r in samples.read().to_pylist():
        theta = 0.3 * (r["sample_idx"] + 1)
        rows.append({"prompt_id": r["prompt_id"], "sample_idx": r["sample_idx"], "source": "sample",
                     "text_sha": text_sha(r["text"]), "is_empty": False,
                     "embedding": [math.cos(theta), math.sin(theta)]})
    for r in prompts.read().to_pylist():
        rows.append({"prompt_id": r["prompt_id"], "sample_idx": -1, "source": "target",
                     "text_sha": text_sha(r["target"]), "is_empty": False, "embedding": [1.0, 0.0]})
    return _stage(run / "embeddings", "embed", rows, embed_schema(2), {"embedder": "hand"},
                  {"samples": samples, "prompts": prompts}, overwrite=True)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    prompts = _prompts(run)
    samples = _samples(run, prompts, "old")
    _embeddings(run, samples, prompts)
    filter_mod.run(FilterConfig(run=str(run)))
    pair_mod.run(PairConfig(run=str(run)))
    return run


def test_lineage_is_recorded_through_the_chain(chain: Path) -> None:
    pairs = open_stage(chain / "pairs", "pair")
    assert set(pairs.lineage) == {"../prompts", "../samples", "../embeddings", "../negatives"}
    assert pairs.lineage["../embeddings"]["inputs"] == ["../samples", "../prompts"]
    assert pairs.lineage["../samples"]["fingerprint"] == open_stage(chain / "samples").fingerprint
    assert pairs.manifest["input_paths"]["negatives"] == "../negatives"


def test_filter_and_pair_refuse_embeddings_of_replaced_samples(chain: Path) -> None:
    _samples(chain, open_stage(chain / "prompts"), "new")  # sample --overwrite: other texts, same shape
    with pytest.raises(UsageError, match=r"embeddings was built from an older .*samples \(it has changed since\); "
                                         r"re-run `negalign embed --overwrite`$"):
        filter_mod.run(FilterConfig(run=str(chain), overwrite=True))
    with pytest.raises(UsageError, match=r"negatives was built from an older .*samples .*re-run `negalign embed "
                                         r"--overwrite`, then `negalign filter --overwrite`$"):
        pair_mod.run(PairConfig(run=str(chain), overwrite=True))
    proc = negalign("filter", "--run", chain, "--overwrite")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "negalign embed --overwrite" in proc.stderr
    # After embed is redone, only filter is left to redo; then pair runs again.
    _embeddings(chain, open_stage(chain / "samples"), open_stage(chain / "prompts"))
    with pytest.raises(UsageError, match=r"re-run `negalign filter --overwrite`$"):
        pair_mod.run(PairConfig(run=str(chain), overwrite=True))
    filter_mod.run(FilterConfig(run=str(chain), overwrite=True))
    pair_mod.run(PairConfig(run=str(chain), overwrite=True))
    assert {t.split()[0] for g in open_stage(chain / "pairs").read().to_pylist() for t in g["rejected"]} == {"new"}


def test_replaced_prompts_are_caught_downstream(chain: Path) -> None:
    _prompts(chain, ("Rome", "Oslo"))  # prepare --overwrite with other targets; samples not redone
    with pytest.raises(UsageError, match=r"negatives was built from an older .*prompts .*re-run `negalign sample "
                                         r"--overwrite`, then `negalign embed --overwrite`, then `negalign filter"):
        pair_mod.run(PairConfig(run=str(chain), overwrite=True))
    with pytest.raises(UsageError, match=r"re-run `negalign sample --overwrite`, then `negalign embed --overwrite`$"):
        filter_mod.run(FilterConfig(run=str(chain), overwrite=True))


def test_inputs_from_different_runs_are_not_mixed(chain: Path, tmp_path: Path) -> None:
    other = _samples(chain, open_stage(chain / "prompts"), "other", path=tmp_path / "other_samples")
    with pytest.raises(UsageError, match=r"embeddings was made from other samples than .*other_samples"):
        filter_mod.run(FilterConfig(run=str(chain), samples=str(other.path), out=str(tmp_path / "neg2")))


def test_upstream_being_rebuilt_is_refused(chain: Path) -> None:
    out = StageOutput.open(chain / "samples", "sample", {"word": "old"}, {"prompts": open_stage(chain / "prompts")})
    out.write_shard(0, open_stage(chain / "samples").read())  # a resumed or topped-up run, not finished yet
    with pytest.raises(UsageError, match=r"samples \(it is being rebuilt or unfinished\)"):
        filter_mod.run(FilterConfig(run=str(chain), overwrite=True))
    out.finish(1)


def test_unknown_hub_model_offline_is_one_line_usage_error(small_prompts: Path) -> None:
    proc = negalign("sample", "--run", small_prompts, "--model", "nosuchorg/x", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "nosuchorg/x: no such model folder or alias" in proc.stderr


@pytest.mark.parametrize("where", [1 / 3, 0.98])  # in the data pages; in the footer
def test_a_flipped_bit_upstream_stops_filter_and_pair(chain: Path, where: float) -> None:
    f = chain / "samples" / "part-00000.parquet"
    data = bytearray(f.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    f.write_bytes(bytes(data))
    for run_stage in (lambda: filter_mod.run(FilterConfig(run=str(chain), overwrite=True, keep_fraction=0.5)),
                      lambda: pair_mod.run(PairConfig(run=str(chain), overwrite=True, max_negatives=2))):
        with pytest.raises(NegalignError, match=r"samples/part-00000.parquet: damaged \("):
            run_stage()


@pytest.mark.slow
def test_failing_sample_overwrite_keeps_the_complete_samples(small_prompts: Path) -> None:
    """Issue 8.3 as reported: a usage error and a bad value, each with --overwrite, left samples/ empty."""
    fast = ["--engine", "hf", "--max-tokens", "4", "--threads", "1", "-n", "1"]
    negalign("sample", "--run", small_prompts, *fast, check=True)
    before = open_stage(small_prompts / "samples", "sample")
    rows = before.read().to_pylist()
    bad = negalign("sample", "--run", small_prompts, *fast, "--temperature", "0.5", "--overwrite",
                   "--shard-index", "5", "--num-shards", "2")
    assert bad.returncode == 2, bad.stderr
    after = open_stage(small_prompts / "samples", "sample")
    assert after.fingerprint == before.fingerprint and after.read().to_pylist() == rows


def test_inspect_flags_stale_outputs(chain: Path) -> None:
    before = negalign("inspect", chain, check=True)
    assert "stale:" not in before.stdout + before.stderr
    _samples(chain, open_stage(chain / "prompts"), "new")
    after = negalign("inspect", chain)
    assert (after.stdout + after.stderr).count("stale:") == 3  # embeddings, negatives, pairs
    assert after.returncode == 1  # a health check for scripts: a stale folder is a failure


def test_every_stage_folder_reads_with_pandas_polars_duckdb(chain: Path) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    for name in ("prompts", "samples", "embeddings", "negatives", "pairs"):
        rows = open_stage(chain / name).num_rows
        assert len(pd.read_parquet(chain / name)) == rows, name
        assert pl.scan_parquet(str(chain / name / "*.parquet")).collect().height == rows, name
        assert duckdb.sql(f"select count(*) from '{chain / name}/*.parquet'").fetchall() == [(rows,)], name
