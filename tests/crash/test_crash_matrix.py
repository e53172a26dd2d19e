"""The crash matrix (issue 13): every stage killed with SIGKILL at drawn points, re-run, and compared with a clean run.

Trials per stage: prepare, embed, filter, pair 20 each; sample 10. The README's "Guarantees" section quotes these
numbers: change them together. See harness.py for what one trial does and checks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_DATA
from tests.crash.harness import Clean, Stage, Zygote, run_clean, trial

pytestmark = pytest.mark.slow

TRIALS = {"prepare": 20, "sample": 10, "embed": 20, "filter": 20, "pair": 20}

# Tiny sizes, many shards: each shard boundary is a place to crash.
STAGES = {
    "prepare": Stage("prepare", ["prepare", "--run", "{run}", "--input", "{run}/data.jsonl", "--test-fraction", "0.25",
                                 "--shard-size", "2", "--on-bad-row", "skip"],
                     outputs=["prompts", "prompts_test"], inputs=["data.jsonl"]),
    "sample": Stage("sample", ["sample", "--run", "{run}", "-n", "2", "--engine", "hf", "--max-tokens", "6",
                               "--shard-size", "1", "--batch-size", "2"],
                    outputs=["samples"], inputs=["prompts"]),
    "embed": Stage("embed", ["embed", "--run", "{run}"], outputs=["embeddings"], inputs=["prompts", "samples"]),
    "filter": Stage("filter", ["filter", "--run", "{run}"], outputs=["negatives"],
                    inputs=["prompts", "samples", "embeddings"]),
    "pair": Stage("pair", ["pair", "--run", "{run}", "--export-trl", "{run}/trl.parquet"],
                  outputs=["pairs", "trl.parquet"], inputs=["prompts", "samples", "embeddings", "negatives"]),
}


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def base(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Clean]]:
    """One small run built once, stage by stage; each stage's output there is its clean result."""
    run = tmp_path_factory.mktemp("crash-base") / "run"
    run.mkdir()
    lines = EXAMPLE_DATA.read_text().splitlines()[::6]  # 8 prompts
    (run / "data.jsonl").write_text("\n".join(lines + ['{"prompt": ""}']) + "\n")  # one bad row, skipped
    cleans = {name: run_clean(zygote, stage, run) for name, stage in STAGES.items()}
    assert json.loads((run / "samples" / "_manifest.json").read_text())["num_shards"] >= 4
    return run, cleans


def _trials(stage: str) -> list:
    return [pytest.param(stage, i, id=f"{stage}-{i}") for i in range(TRIALS[stage])]


@pytest.mark.parametrize(("stage", "seed"), [p for s in TRIALS for p in _trials(s)])
def test_crash_then_resume_equals_clean_run(stage: str, seed: int, zygote: Zygote, base, tmp_path: Path) -> None:
    run, cleans = base
    what = trial(zygote, STAGES[stage], run, cleans[stage], tmp_path, seed)
    print(stage, seed, what)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
