"""The example pipelines and the task data: each YAML plans cleanly, and runs end to end at tiny size (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, negalign

from negalign import checkers
from negalign.pipeline import Pipeline

EXAMPLES = ROOT / "examples"
YAMLS = ["demo.yaml", "self_contrast.yaml", "d2o.yaml", "selm.yaml", "sr_dpo.yaml"]
# Shrinks any example: the HF engine (no vLLM start), few tokens, one or two optimizer steps.
TINY = ["--set", "sample.engine=hf", "--set", "eval.engine=hf", "--set", "sample.max_tokens=8",
        "--set", "eval.max_tokens=8", "--set", "train.max_steps=1", "--set", "train.batch_size=2"]


def _load_make_tasks():
    spec = importlib.util.spec_from_file_location("make_tasks", EXAMPLES / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_data_is_deterministic_and_matches_the_committed_files() -> None:
    make_tasks = _load_make_tasks()
    first, second = make_tasks.make(), make_tasks.make()
    assert first == second
    files = {"train": "tasks_train.parquet", "test": "tasks_test.parquet", "d2o": "d2o_train.parquet"}
    for split, name in files.items():
        assert pq.read_table(EXAMPLES / "data" / name).to_pylist() == first[split], f"regenerate {name}"
    train, test = first["train"], first["test"]
    assert len(train) >= 600 and len(test) >= 400
    assert len({r["task"] for r in train}) >= 6 and {r["task"] for r in train} == {r["task"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(not r["target"] and r["negatives"] for r in first["d2o"])


def test_every_target_passes_its_checker_and_no_negative_does() -> None:
    """Targets are correct and the synthetic negatives wrong, by the checker eval will use for the family."""
    rows = [r for split in _load_make_tasks().make().values() for r in split]
    checked = 0
    for r in rows:
        if r["checker"] not in checkers.KINDS:
            continue  # definitions: judged by embed-sim only
        if r["target"] is not None:
            assert checkers.check(r["checker"], r["target"], r["target"]) is True, r
            for neg in r["negatives"]:
                assert checkers.check(r["checker"], neg, r["target"]) is False, (neg, r)
            checked += 1
    assert checked > 800


@pytest.mark.parametrize("name", YAMLS)
def test_example_plans(name: str) -> None:
    pipe = Pipeline(EXAMPLES / name)
    stages = {s.stage for s in pipe.steps}
    assert {"train", "eval"} <= stages
    assert all(s.stage != "eval" or s.deps or s.cfg.model == "smollm2-135m" for s in pipe.steps)


def test_self_contrast_experiment_has_the_issue_design() -> None:
    """Issue 19's redesign: SFT then N = 32 samples on the SFT prompts, LR sweeps on a validation split, one fixed
    prompt set for K = 1..8, the guards, 3 seeds for the control and the best sc arm, hypotheses in the header."""
    path = EXAMPLES / "self_contrast.yaml"
    header = path.read_text().split("\nrun:")[0]
    assert all(f"H{i}" in header for i in range(1, 5))
    by = {s.name: s for s in Pipeline(path).steps}
    assert by["sample"].cfg.num_samples >= 32 and by["sample"].cfg.prompts == by["sft"].cfg.pairs  # trained prompts
    val, test = by["val"].cfg, by["test"].cfg
    assert val.start == by["sft-prompts"].cfg.count and test.count is None  # validation after the SFT prompts
    assert len(pq.read_table(EXAMPLES / "data" / "tasks_test.parquet")) >= 400
    for arm in ("control", "sc-k8"):
        sweep = [s for n, s in by.items() if n.startswith(f"val-{arm}-lr")]
        assert len({s.cfg.learning_rate for s in sweep}) >= 3
        assert all(by[f"eval-{s.name}"].cfg.prompts == by["eval-val-sc-k8-lr3e-5"].cfg.prompts != by[
            "eval-sc-k8"].cfg.prompts for s in sweep)  # the sweep is scored on validation, never on the test
    arms = [f"sc-k{k}" for k in (1, 2, 4, 8)] + ["control-s0", "sc-k8-sft", "sc-k8-dpop", "sc-k8-verified",
                                                  "spin", "dpo-given"]
    control, k8 = by["control-s0"].cfg, by["sc-k8"].cfg
    for name in arms:  # one fixed prompt set (or the same rule on the arm's own negatives), same steps and start
        cfg = by[name].cfg
        assert cfg.min_negatives == 8 and cfg.max_steps == k8.max_steps and cfg.model == k8.model, name
        assert cfg.batch_size == k8.batch_size and cfg.lora and f"eval-{name}" in by, name
    assert control.objective == "sft" and control.pairs == k8.pairs
    assert {by[f"control-s{s}"].cfg.seed for s in range(3)} == {0, 1, 2}
    assert {by[f"sc-best-s{s}"].cfg.seed for s in (1, 2)} == {1, 2}
    assert by["sc-k8-sft"].cfg.sft_weight > 0 and by["sc-k8-dpop"].cfg.dpop_lambda > 0
    assert by["sc-k8-verified"].cfg.pairs.endswith("pairs-verified") and by["filter-verified"].cfg.checkers
    assert by["spin"].cfg.pairs.endswith("pairs-random") and by["filter-random"].cfg.strategy == "random"
    assert by["dpo-given"].cfg.rejected == "given"
    for name in ("val-sc-k8-sft", "val-sc-k8-dpop", "val-sc-k8-verified"):
        assert by[name].cfg.prompts == by["eval-val-sc-k8-lr3e-5"].cfg.prompts


def _run_tiny(tmp_path: Path, name: str, *sets: str, only: str | None = None) -> str:
    args = ["run", EXAMPLES / name, "--set", f"run={tmp_path / 'run'}", *TINY, *(["--only", only] if only else [])]
    for s in sets:
        args += ["--set", s]
    return negalign(*args, check=True, timeout=1800).stderr


def _evaluated(tmp_path: Path) -> set[str]:
    return {p.parent.name for p in (tmp_path / "run" / "eval").glob("*/summary.json")}


@pytest.mark.slow
def test_demo_runs_tiny_and_resumes(tmp_path: Path) -> None:
    _run_tiny(tmp_path, "demo.yaml", "sft_prompts=4", "n_samples=4", "test_prompts=3", "k=1", "sft_epochs=1",
              "sc_steps=2")
    assert _evaluated(tmp_path) == {"base", "sft", "sc"}
    summary = json.loads((tmp_path / "run" / "eval" / "sc" / "summary.json").read_text())
    assert summary
    again = _run_tiny(tmp_path, "demo.yaml", "sft_prompts=4", "n_samples=4", "test_prompts=3", "k=1", "sft_epochs=1",
                      "sc_steps=2")
    assert " 0 step(s) run" in again


@pytest.mark.slow
def test_d2o_example_runs_tiny(tmp_path: Path) -> None:
    _run_tiny(tmp_path, "d2o.yaml", "prompts=3", "n_samples=4", "test_prompts=3", "steps=1",
              "train.num_anchors=2")
    assert _evaluated(tmp_path) == {"base", "d2o"}


@pytest.mark.slow
def test_selm_example_runs_two_rounds_tiny(tmp_path: Path) -> None:
    _run_tiny(tmp_path, "selm.yaml", "prompts_per_round=3", "n_samples=4", "test_prompts=3", "steps=1")
    assert _evaluated(tmp_path) == {"base", "selm-iter-1", "selm-iter-2"}
    for t in (1, 2):
        assert (tmp_path / "run" / "selm" / f"iter-{t}" / "models" / "train" / "config.json").exists()


@pytest.mark.slow
def test_sr_dpo_example_runs_tiny(tmp_path: Path) -> None:
    _run_tiny(tmp_path, "sr_dpo.yaml", "prompts=3", "n_samples=4", "test_prompts=3", "steps=1")
    assert _evaluated(tmp_path) == {"base", "sr-dpo"}


@pytest.mark.slow
def test_self_contrast_example_runs_tiny_on_one_path(tmp_path: Path) -> None:
    """The full experiment is ~20 trainings; at tiny size, one path through it: SFT, the data and sc-k1."""
    path = "prepare*,test,sft-prompts,val,sft,sample,embed,filter,pair,sc-k1,eval-sc-k1"
    _run_tiny(tmp_path, "self_contrast.yaml", "sft_prompts=4", "val_prompts=3", "n_samples=4", "k_set=1",
              "test.count=3", only=path)
    assert _evaluated(tmp_path) == {"sc-k1"}
    # The write-up's tables come from the run directory alone (examples/experiment_tables.py).
    import subprocess
    import sys

    tables = subprocess.run([sys.executable, str(EXAMPLES / "experiment_tables.py"), str(tmp_path / "run")],
                            capture_output=True, text=True, check=True).stdout
    assert "| sc-k1 | sc | 1 |" in tables and "Not evaluated (left out): " in tables


@pytest.mark.slow
def test_examples_makefile_rebuilds_only_what_is_out_of_date(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = tmp_path / "mk"
    args = ["make", "-f", "examples/Makefile", f"RUN={run}", f"NEGALIGN={sys.executable} -m negalign", "N=4",
            "K=1", "STEPS=1", "MAX_TOKENS=8", "ENGINE=hf"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (run / "eval" / "sc" / "summary.json").exists() and (run / "report" / "report.md").exists()
    assert subprocess.run([*args, "-q"], cwd=ROOT).returncode == 0  # everything is up to date
    (run / "pairs" / "_manifest.json").touch()  # pairs changed: train, eval of sc and the report are stale
    dry = subprocess.run([*args, "-n"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "train" in dry and "eval --run" in dry and "sample" not in dry and "embed" not in dry
