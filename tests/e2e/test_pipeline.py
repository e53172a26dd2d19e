"""`negalign run PIPELINE.yaml`: expansion, order, skipping finished steps, dry-run states, failures.

The fast tests use stages that load no model (`prepare` and `slice`); the slow one runs a tiny
pipeline through every stage on the real default models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, negalign

from negalign.errors import UsageError
from negalign.pipeline import Pipeline

TASKS = ROOT / "examples" / "data" / "tasks_train.parquet"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def chain(tmp_path: Path, **extra) -> Path:
    """prepare -> first (slice of 12) -> second (slice of the first): no model needed."""
    return write_yaml(tmp_path / "p.yaml", {
        "run": str(tmp_path / "run"), "vars": {"n": 12},
        "steps": [
            {"name": "prep", "stage": "prepare", "input": str(TASKS)},
            {"name": "second", "stage": "slice", "prompts": "@first", "count": 5, "out": "${run}/second"},
            {"name": "first", "stage": "slice", "count": "${n}", "out": "${run}/first"},
        ], **extra})


def test_sweep_expands_to_train_and_eval_with_readable_names(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "p.yaml", {
        "run": str(tmp_path / "run"), "seed": 3,
        "steps": [{"name": "sc", "stage": "train", "objective": "sc", "num_negatives": [1, 2, 4, 8], "eval": True},
                  {"name": "ctl", "stage": "train", "objective": "sft", "seed": [0, 1], "pairs": "@prep"},
                  {"name": "prep", "stage": "prepare", "input": str(TASKS)}]})
    pipe = Pipeline(path)
    names = [s.name for s in pipe.steps]
    assert names == ["sc-k1", "eval-sc-k1", "sc-k2", "eval-sc-k2", "sc-k4", "eval-sc-k4", "sc-k8", "eval-sc-k8",
                     "prep", "ctl-s0", "ctl-s1"]
    by = {s.name: s for s in pipe.steps}
    assert by["sc-k4"].cfg.num_negatives == 4 and by["sc-k4"].cfg.seed == 3 and by["sc-k4"].cfg.name == "sc-k4"
    assert by["eval-sc-k4"].deps == ["sc-k4"]
    assert by["eval-sc-k4"].cfg.model == str(tmp_path / "run" / "models" / "sc-k4")
    assert by["ctl-s1"].cfg.seed == 1 and by["ctl-s1"].deps == ["prep"]  # @prep made it wait for prepare
    assert by["sc-k1"].outputs == [tmp_path / "run" / "models" / "sc-k1"]


def test_order_follows_the_data_and_refs(tmp_path: Path) -> None:
    pipe = Pipeline(chain(tmp_path))
    assert [s.name for s in pipe.steps] == ["prep", "first", "second"]  # second reads first: it moves after
    assert pipe.steps[1].deps == ["prep"]  # slice's default input is RUN/prompts, which prepare writes


@pytest.mark.parametrize("reference", ["previous", "start"])
def test_iterations_chain_models_and_take_fresh_prompt_slices(tmp_path: Path, reference: str) -> None:
    path = write_yaml(tmp_path / "p.yaml", {
        "run": str(tmp_path / "run"),
        "steps": [{"name": "prep", "stage": "prepare", "input": str(TASKS)},
                  {"name": "selm", "iterations": 2, "model": "smollm2-135m", "prompts_per_round": 8,
                   "reference": reference,
                   "steps": [{"name": "greedy", "stage": "sample", "greedy": True},
                             {"name": "sample", "stage": "sample", "num_samples": 4},
                             {"name": "embed", "stage": "embed"}, {"name": "filter", "stage": "filter"},
                             {"name": "pair", "stage": "pair"}, {"name": "rank", "stage": "rank"},
                             {"name": "train", "stage": "train", "objective": "selm", "pairs": "@rank"}]}]})
    by = {s.name: s for s in Pipeline(path).steps}
    run = tmp_path / "run"
    assert by["selm/iter-1/sample"].cfg.model == "smollm2-135m"
    assert by["selm/iter-2/sample"].cfg.model == str(run / "selm" / "iter-1" / "models" / "train")
    assert by["selm/iter-2/train"].cfg.model == str(run / "selm" / "iter-1" / "models" / "train")
    assert by["selm/iter-2/train"].cfg.pairs == str(run / "selm" / "iter-2" / "pairs_ranked")
    # the reference: the previous iterate (train's default, its --model) or the fixed start model
    assert by["selm/iter-1/train"].cfg.ref_model is None
    assert by["selm/iter-2/train"].cfg.ref_model == (None if reference == "previous" else "smollm2-135m")
    assert (by["selm/iter-1/prompts"].cfg.start, by["selm/iter-2/prompts"].cfg.start) == (0, 8)
    assert "selm/iter-1/train" in by["selm/iter-2/sample"].deps
    assert by["selm/iter-2/embed"].outputs == [run / "selm" / "iter-2" / "embeddings"]
    assert "selm/iter-2/greedy" in by["selm/iter-2/embed"].deps  # the optional greedy input orders the steps


@pytest.mark.parametrize("steps, message", [
    ([{"name": "a", "stage": "slice", "prompts": "@b", "out": "x/a"},
      {"name": "b", "stage": "slice", "prompts": "@a", "out": "x/b"}], "cycle: a -> b -> a"),
    ([{"name": "a", "stage": "smaple"}], "unknown stage 'smaple'"),
    ([{"name": "a", "stage": "sample", "temprature": 0.5}], "unknown option(s) temprature"),
    ([{"name": "a", "stage": "sample", "prompts": "@nope"}], "'@nope' names no step"),
    ([{"name": "a", "stage": "sample", "max_tokens": "${nope}"}], "unknown variable"),
])
def test_bad_pipelines_are_one_line_usage_errors(tmp_path: Path, steps: list, message: str) -> None:
    path = write_yaml(tmp_path / "p.yaml", {"run": str(tmp_path / "run"), "steps": steps})
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Pipeline(path)
    proc = negalign("run", path)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_second_run_does_no_work_and_dry_run_names_each_state(tmp_path: Path) -> None:
    path = chain(tmp_path)
    first = negalign("run", path, check=True)
    assert "3 step(s) run, 0 already done" in first.stderr
    state = json.loads((tmp_path / "run" / "_pipeline" / "state.json").read_text())["steps"]
    assert set(state) == {"prep", "first", "second"}
    assert pq.read_table(tmp_path / "run" / "second" / "part-00000.parquet").num_rows == 5
    mtime = (tmp_path / "run" / "second" / "part-00000.parquet").stat().st_mtime_ns

    again = negalign("run", path, check=True)
    assert "0 step(s) run, 3 already done" in again.stderr
    assert (tmp_path / "run" / "second" / "part-00000.parquet").stat().st_mtime_ns == mtime

    dry = negalign("run", path, "--dry-run", "--set", "n=10", check=True).stderr
    rows = {line.split("│")[1].strip(): line for line in dry.splitlines() if line.startswith("│")}
    assert "done" in rows["prep"]
    assert "config changed" in rows["first"] and "10" in rows["first"]
    assert "input changed" in rows["second"]

    # Run with n=10 (redoes first and second), then go back to the file's n=12: both are stale again.
    redo = negalign("run", path, "--set", "n=10", check=True).stderr
    assert "2 step(s) run, 1 already done" in redo
    assert pq.read_table(tmp_path / "run" / "first" / "part-00000.parquet").num_rows == 10
    dry = negalign("run", path, "--dry-run", check=True).stderr
    rows = {line.split("│")[1].strip(): line for line in dry.splitlines() if line.startswith("│")}
    assert "config changed" in rows["first"] and "input changed" in rows["second"]

    # A missing output is named as such and redone; only that step and what reads it run.
    for f in (tmp_path / "run" / "second").iterdir():
        f.unlink()
    rerun = negalign("run", path, "--set", "n=10", check=True).stderr
    assert "second (slice): missing" in rerun and "1 step(s) run, 2 already done" in rerun, rerun


def test_two_runners_on_one_run_keep_each_others_records(tmp_path: Path) -> None:
    """Two `run --only …` at once on one run directory: each State was loaded before the other recorded anything;
    the state file must end with both steps (it used to keep only the last writer's)."""
    from negalign.pipeline.state import State

    pipe = Pipeline(chain(tmp_path))
    steps = {s.name: s for s in pipe.steps}
    a, b = State(pipe.run), State(pipe.run)
    a.record(steps["prep"])
    b.record(steps["first"])
    on_disk = json.loads((pipe.run / "_pipeline" / "state.json").read_text())["steps"]
    assert set(on_disk) == {"prep", "first"}
    a.record(steps["second"])
    assert set(json.loads((pipe.run / "_pipeline" / "state.json").read_text())["steps"]) == {"prep", "first",
                                                                                              "second"}
    # With the outputs made: a record written by another runner after this one loaded its state counts here too.
    negalign("run", pipe.path, check=True)
    (pipe.run / "_pipeline" / "state.json").unlink()
    late, early = State(pipe.run), State(pipe.run)
    assert early.status(steps["prep"])[0] == "not recorded"
    late.record(steps["prep"])
    assert early.status(steps["prep"])[0] == "done"


def test_failure_stops_with_the_step_name_and_the_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "p.yaml", {
        "run": str(tmp_path / "run"),
        "steps": [{"name": "prep", "stage": "prepare", "input": str(tmp_path / "missing.parquet")},
                  {"name": "part", "stage": "slice", "count": 3}]})
    proc = negalign("run", path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 'prep' (prepare) failed:") and "missing.parquet" in last
    assert not (tmp_path / "run" / "part").exists()  # nothing after the failure ran


def test_only_and_from_select_steps(tmp_path: Path) -> None:
    path = chain(tmp_path)
    proc = negalign("run", path, "--from", "first")
    assert proc.returncode == 2 and "earlier step 'prep' is not done" in proc.stderr
    negalign("run", path, "--only", "prep", check=True)
    assert not (tmp_path / "run" / "first").exists()
    out = negalign("run", path, "--from", "first", check=True).stderr
    assert "2 step(s) run, 0 already done" in out
    assert negalign("run", path, "--only", "nope").returncode == 2


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path: Path) -> None:
    """Every stage on the real default models at tiny size: SFT, sample, embed, filter, pair, sc with a K sweep,
    eval and the report; a second run does no work."""
    path = write_yaml(tmp_path / "p.yaml", {
        "run": str(tmp_path / "run"), "seed": 0,
        "defaults": {"sample": {"engine": "hf", "max_tokens": 8}, "train": {"max_steps": 2, "batch_size": 2},
                     "eval": {"engine": "hf", "max_tokens": 8, "prompts": "@test"}},
        "steps": [
            {"name": "prepare", "stage": "prepare", "input": str(TASKS)},
            {"name": "test", "stage": "slice", "start": 100, "count": 4, "out": "${run}/prompts_test"},
            {"name": "few", "stage": "slice", "count": 3, "out": "${run}/few"},
            {"name": "sft", "stage": "train", "objective": "sft", "pairs": "@few"},
            {"name": "sample", "stage": "sample", "model": "@sft", "prompts": "@few", "num_samples": 4},
            {"name": "embed", "stage": "embed", "prompts": "@few"},
            {"name": "filter", "stage": "filter"},
            {"name": "pair", "stage": "pair", "prompts": "@few"},
            {"name": "sc", "stage": "train", "objective": "sc", "model": "@sft", "num_negatives": [1, 2],
             "eval": True},
        ]})
    first = negalign("run", path, check=True)
    run = tmp_path / "run"
    for name in ("sc-k1", "sc-k2"):
        assert (run / "models" / name / "config.json").exists()
        assert (run / "eval" / name / "summary.json").exists()
    assert "9 step(s) run" in first.stderr or "step(s) run" in first.stderr
    again = negalign("run", path, check=True)
    assert " 0 step(s) run" in again.stderr


def _write(path: Path, stage: str, table) -> None:
    from negalign.store import StageOutput

    out = StageOutput.open(path, stage, {"test": True}, {})
    out.write_shard(0, table)
    out.finish(1)


def test_rank_puts_the_worst_of_y_ref_and_the_negative_last(tmp_path: Path) -> None:
    """SELM's feedback-free ranking: the target stays chosen; the rejected is whichever of y_ref and the first
    negative is farther from the target (cosine under the run's embeddings)."""
    import numpy as np
    import pyarrow as pa

    from negalign import rank
    from negalign.config import RankConfig
    from negalign.embed import text_sha

    texts = {"Paris": [1.0, 0.0], "It is Paris.": [0.8, 0.6], "Rome": [0.0, 1.0], "Lyon": [0.6, 0.8]}
    emb = pa.table({"prompt_id": ["a"] * 4, "sample_idx": [-1, 0, 1, 2], "text_sha": [text_sha(t) for t in texts],
                    "embedding": pa.array([np.array(v, np.float32) for v in texts.values()],
                                          type=pa.list_(pa.float32(), 2))})
    msg = [{"role": "user", "content": "Capital of France?"}]
    pairs = pa.table({"prompt_id": ["a", "b"], "messages": [msg, msg], "chosen": ["Paris", "Paris"],
                      "rejected": [["Lyon", "Rome"], ["Rome"]], "rejected_sim": [[0.6, 0.0], [0.0]],
                      "anchors": pa.array([[], []], type=pa.list_(pa.string())), "y_ref": ["Rome", "It is Paris."]})
    _write(tmp_path / "embeddings", "embed", emb)
    _write(tmp_path / "pairs", "pair", pairs)
    rank.run(RankConfig(run=str(tmp_path)))
    rows = pq.read_table(tmp_path / "pairs_ranked" / "part-00000.parquet").to_pylist()
    assert rows[0]["chosen"] == "Paris" and rows[0]["rejected"] == ["Rome", "Lyon"]  # y_ref (0.0) is worse than Lyon
    assert rows[0]["rejected_sim"][0] == pytest.approx(0.0)
    assert rows[1]["rejected"] == ["Rome"]  # y_ref (0.8) is closer than the negative: the negative stays rejected
