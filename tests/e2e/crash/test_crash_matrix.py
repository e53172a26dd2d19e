"""The crash matrix (issue 13): every stage killed with SIGKILL at drawn points, re-run, and compared with a clean run.

Trials per stage: prepare, embed, filter, pair 20 each; sample and eval 10 each; train and run 5 each. The README's
"Guarantees" section quotes these numbers: change them together. See harness.py for what one trial does and checks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLE_DATA
from tests.e2e.crash.harness import Clean, Stage, Zygote, run_clean, tiny_model, trial

pytestmark = pytest.mark.slow

TRIALS = {"prepare": 20, "sample": 10, "embed": 20, "filter": 20, "pair": 20, "train": 5, "eval": 10, "run": 5}

# Tiny sizes, many shards: each shard boundary is a place to crash. {model} is a tiny random Llama with the default
# policy's tokenizer (built once below), so sample, train and eval cost milliseconds per step.
STAGES = {
    "prepare": Stage("prepare", ["prepare", "--run", "{run}", "--input", "{run}/data.jsonl", "--test-fraction", "0.3",
                                 "--shard-size", "2", "--on-bad-row", "skip"],
                     outputs=["prompts", "prompts_test"], inputs=["data.jsonl"]),
    "sample": Stage("sample", ["sample", "--run", "{run}", "-n", "2", "--engine", "hf", "--max-tokens", "6",
                               "--shard-size", "1", "--batch-size", "2", "--model", "{model}"],
                    outputs=["samples"], inputs=["prompts"]),
    "embed": Stage("embed", ["embed", "--run", "{run}"], outputs=["embeddings"], inputs=["prompts", "samples"]),
    "filter": Stage("filter", ["filter", "--run", "{run}"], outputs=["negatives"],
                    inputs=["prompts", "samples", "embeddings"]),
    "pair": Stage("pair", ["pair", "--run", "{run}", "--export-trl", "{run}/trl.parquet"],
                  outputs=["pairs", "trl.parquet"], inputs=["prompts", "samples", "embeddings", "negatives"]),
    # Resuming a killed train continues from the last complete checkpoint (--resume): same steps, same weights
    # (model.safetensors compared by sha256), same per-step losses (metrics.jsonl). Trainer's `train_loss` only
    # averages the steps of the last process, the `num_tokens` counter restarts at 0 in a resumed process, and the
    # reference cache may be reused: those may differ.
    "train": Stage("train", ["train", "--run", "{run}", "--model", "{model}", "--objective", "sc", "--batch-size",
                             "1", "--max-steps", "6", "--save-steps", "1", "--resume", "--lr", "1e-3", "--name", "t"],
                   outputs=["models/t"], inputs=["prompts", "samples", "embeddings", "negatives", "pairs"],
                   volatile=frozenset({"train_loss", "seconds", "seconds_per_step", "ref_logps_computed",
                                       "ref_logps_reused", "train_runtime", "train_samples_per_second",
                                       "train_steps_per_second", "num_tokens"})),
    "eval": Stage("eval", ["eval", "--run", "{run}", "--model", "{model}", "--name", "tiny", "--max-tokens", "4",
                           "--shard-size", "1", "--engine", "hf"],
                  outputs=["eval/tiny/generations", "eval/tiny/scores", "eval/tiny/summary.json"],
                  inputs=["prompts_test"], volatile=frozenset({"seconds"})),
    # `run` starts each step as a process of its own: killed after a delay, the whole process group goes.
    "run": Stage("run", ["run", "{pipeline}", "--set", "run={run}"], outputs=["prompts", "first", "second"],
                 inputs=[], delay_only=True),
}


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def base(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Clean]]:
    """One small run built once, stage by stage; each stage's output there is its clean result."""
    root = tmp_path_factory.mktemp("crash-base")
    run = root / "run"
    run.mkdir()
    lines = EXAMPLE_DATA.read_text().splitlines()[::4]  # 12 prompts
    (run / "data.jsonl").write_text("\n".join(lines + ['{"prompt": ""}']) + "\n")  # one bad row, skipped
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run": str(root / "unused"), "steps": [
        {"name": "prep", "stage": "prepare", "input": str(run / "data.jsonl"), "shard_size": 2,
         "on_bad_row": "skip"},
        {"name": "first", "stage": "slice", "count": 6, "out": "${run}/first"},
        {"name": "second", "stage": "slice", "prompts": "@first", "count": 3, "out": "${run}/second"}]}))
    subs = {"model": str(tiny_model(root / "tiny-model")), "pipeline": str(pipeline)}
    cleans = {}
    for name, stage in STAGES.items():
        stage.subs = subs
        clean_run = run if name != "run" else root / "run-pipeline"
        cleans[name] = run_clean(zygote, stage, clean_run)
    assert json.loads((run / "samples" / "_manifest.json").read_text())["num_shards"] >= 6
    return run, cleans


def _trials(stage: str) -> list:
    return [pytest.param(stage, i, id=f"{stage}-{i}") for i in range(TRIALS[stage])]


@pytest.mark.parametrize(("stage", "seed"), [p for s in TRIALS for p in _trials(s)])
def test_crash_then_resume_equals_clean_run(stage: str, seed: int, zygote: Zygote, base, tmp_path: Path) -> None:
    run, cleans = base
    what = trial(zygote, STAGES[stage], run, cleans[stage], tmp_path, seed)
    print(stage, seed, what)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


# Issue 20: the bookkeeping's own kill points, each hit for sure (the drawn trials above reach them by chance):
# mid journal line, between a shard's rename and its line, after the fold wrote the manifest, and half-way through
# removing the journals. `first`/`last`: the first or the last time the point is reached in the clean run.
JOURNAL_POINTS = ["journal-torn", "shard-renamed", "fold-written", "journal-removed"]


@pytest.mark.parametrize("stage", ["prepare", "embed", "filter", "pair"])
@pytest.mark.parametrize("point", JOURNAL_POINTS)
@pytest.mark.parametrize("which", ["first", "last"])
def test_kill_at_bookkeeping_point_then_resume(stage: str, point: str, which: str, zygote: Zygote, base,
                                               tmp_path: Path) -> None:
    run, cleans = base
    hits = cleans[stage].hits.get(point, 0)
    assert hits, f"{stage} never reached {point}: {cleans[stage].hits}"
    nth = 1 if which == "first" else hits
    what = trial(zygote, STAGES[stage], run, cleans[stage], tmp_path, 0, point=f"{point}:{nth}")
    print(stage, point, which, what)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
