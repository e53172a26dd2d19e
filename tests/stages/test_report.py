"""`report`: grouping by seed, ordering by training config, paired comparison, plots that open (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from negalign import evaluate, prepare, report, stats
from negalign.config import EvalConfig, PrepareConfig, ReportConfig
from negalign.errors import UsageError
from negalign.store import StageOutput
from tests.conftest import write_jsonl

N = 40  # prompts


def make_eval(run: Path, name: str, train: dict, correct: list[bool], sims: list[float], tokens: list[int]) -> None:
    """An eval folder as `eval` writes it (scores shard + summary.json), without generating anything."""
    n = len(correct)
    table = pa.table({
        "prompt_id": [f"p{i:03d}" for i in range(n)], "sample_idx": [0] * n,
        "task": ["sums" if i % 2 else "capitals" for i in range(n)],
        "text": [f"answer {i} of {name}" for i in range(n)],
        "target": ["t"] * n, "num_tokens": tokens, "finish_reason": ["length" if t >= 30 else "stop" for t in tokens],
        "checker_kind": ["exact"] * n, "correct": correct, "embed_sim": sims, "reward": [None] * n,
        "reward_target": [None] * n, "win": [None] * n,
    }, schema=evaluate.SCORES_SCHEMA)
    out = StageOutput.open(run / "eval" / name / "scores", "eval", {"model_fingerprint": name}, {})
    out.write_shard(0, table)
    assert out.finish(1)
    cfg = EvalConfig(bootstrap=200)
    summary = {"name": name, "model": name, "model_path": f"/models/{name}", "train_config": train,
               "prompts": str(run / "prompts_test"), "generation": {"greedy": True, "max_tokens": 32, "seed": 0},
               "num_samples": 1, "bootstrap": {"n_boot": 200, "seed": 0}, **evaluate.summarise(table, cfg)}
    (run / "eval" / name / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    base_acc = rng.random(N) < 0.3
    specs = [  # name, training config, accuracy boost, seed
        ("sc-k4", {"objective": "sc", "num_negatives": 4, "beta": 0.1, "seed": 0, "model": "base"}, 0.25),
        ("sft", {"objective": "sft", "seed": 0, "model": "base"}, 0.05),
        ("sc-k1", {"objective": "sc", "num_negatives": 1, "beta": 0.1, "seed": 0, "model": "base"}, 0.10),
        ("sc-k2-s0", {"objective": "sc", "num_negatives": 2, "beta": 0.1, "seed": 0, "model": "base"}, 0.15),
        ("sc-k2-s1", {"objective": "sc", "num_negatives": 2, "beta": 0.1, "seed": 1, "model": "base"}, 0.20),
        ("base", {"objective": "base", "model": "smollm2-135m"}, 0.0),
    ]
    for name, train, boost in specs:
        correct = (base_acc | (rng.random(N) < boost)).tolist()
        sims = np.clip(0.5 + boost + rng.normal(0, 0.1, N), -1, 1).tolist()
        tokens = rng.integers(3, 31 + int(40 * boost), N).clip(max=30).tolist()
        make_eval(run, name, train, correct, sims, tokens)
    return run


def test_report_groups_seeds_orders_by_config_and_compares_pairs(synthetic_run):
    md_path = report.run(ReportConfig(run=str(synthetic_run), against=["sc-k4", "base"], bootstrap=500))
    md = md_path.read_text()
    table = md.split("## All models")[1].split("##")[0]
    labels = [line.split("|")[1].strip() for line in table.strip().splitlines()[2:]]
    assert labels == ["base (base)", "sft", "sc K=1 β=0.1", "sc K=2 β=0.1", "sc K=4 β=0.1"]
    k2 = next(line for line in table.splitlines() if line.startswith("| sc K=2"))
    assert "sc-k2-s0, sc-k2-s1" in k2 and "±" in k2 and "seeds:" in k2  # two seeds: mean ± s.e., per-seed values
    assert "[" in next(line for line in table.splitlines() if line.startswith("| sft"))  # one model: its interval
    assert "## accuracy per task family" in md and "capitals" in md and "sums" in md

    # the paired section agrees with the statistics computed directly
    ca = pq.read_table(synthetic_run / "eval" / "sc-k4" / "scores" / "part-00000.parquet").column("correct")
    cb = pq.read_table(synthetic_run / "eval" / "base" / "scores" / "part-00000.parquet").column("correct")
    mc = stats.mcnemar_exact(ca.to_pylist(), cb.to_pylist())
    paired = md.split("## Paired: sc-k4 vs base")[1].split("##")[0]
    row = next(line for line in paired.splitlines() if line.startswith("| checker accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == str(mc["a_only"]) and cells[5] == str(mc["b_only"])
    assert cells[7] == f"{mc['p']:.3g}"
    assert "shared prompts" in paired

    for name in ("metric_vs_k.png", "per_model.png", "lengths.png"):
        png = md_path.parent / name
        assert png.stat().st_size > 5000
        with Image.open(png) as im:
            im.verify()
        assert f"]({name})" in md


def test_report_refuses_bad_requests(tmp_path, synthetic_run):
    with pytest.raises(UsageError, match="no evaluated models"):
        report.run(ReportConfig(run=str(tmp_path / "empty")))
    with pytest.raises(UsageError, match="no eval named 'nope'"):
        report.run(ReportConfig(run=str(synthetic_run), against=["sc-k4", "nope"]))
    with pytest.raises(UsageError, match="two eval names"):
        report.run(ReportConfig(run=str(synthetic_run), against=["sc-k4,sft,base"]))


def test_report_without_sc_models_says_so(tmp_path):
    run = tmp_path / "run"
    make_eval(run, "base", {}, [True, False] * 10, [0.5] * 20, [5] * 20)
    md = report.run(ReportConfig(run=str(run))).read_text()
    assert "No `sc` models" in md and not (run / "report" / "metric_vs_k.png").exists()


@pytest.mark.slow
def test_report_for_two_evaluated_models(tmp_path):
    rows = [{"prompt": "What is the capital of France? Reply with only the name.", "target": "Paris"},
            {"prompt": "What is 2 + 3? Reply with only the number.", "target": "5"},
            {"prompt": "What is the capital of Japan? Reply with only the name.", "target": "Tokyo"},
            {"prompt": "What is 10 + 7? Reply with only the number.", "target": "17"}]
    run = tmp_path / "run"
    prepare.run(PrepareConfig(run=str(run), input=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    common = dict(run=str(run), prompts=str(run / "prompts"), engine="hf", max_tokens=8, checker="contains",
                  threads=1, embed_sim=False)  # embed-sim is covered in test_eval; this keeps the test short
    evaluate.run(EvalConfig(**common))
    evaluate.run(EvalConfig(**common, name="sampled", num_samples=2, temperature=1.0))
    md_path = report.run(ReportConfig(run=str(run), against=["sampled", "smollm2-135m"]))
    md = md_path.read_text()
    assert "smollm2-135m" in md and "sampled" in md and "## Paired: sampled vs smollm2-135m" in md
    pngs = sorted(md_path.parent.glob("*.png"))
    assert {p.name for p in pngs} == {"per_model.png", "lengths.png"}  # no sc models: no plot against K
    for png in pngs:
        assert png.stat().st_size > 0
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_same_objective_on_other_training_data_is_not_a_seed(tmp_path):
    """A SPIN-like baseline (sc K=1 on random negatives) is not a third seed of sc K=1: the model folders'
    manifests name different pair inputs."""
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    for name, seed, pairs in (("sc-s0", 0, "aaaa"), ("sc-s1", 1, "aaaa"), ("spin", 0, "bbbb")):
        folder = tmp_path / "models" / name
        out = StageOutput.open(folder, "train", {"objective": "sc", "seed": seed}, {"pairs": pairs})
        assert out.finish(0)
        make_eval(run, name, {"objective": "sc", "num_negatives": 1, "beta": 0.1, "seed": seed, "model": "base"},
                  (rng.random(N) < 0.5).tolist(), [0.5] * N, [5] * N)
        summary_file = run / "eval" / name / "summary.json"
        summary = json.loads(summary_file.read_text())
        summary_file.write_text(json.dumps({**summary, "model_path": str(folder)}))
    groups = report.group_models(report.load_models(run))
    assert sorted(sorted(m.name for m in g.models) for g in groups) == [["sc-s0", "sc-s1"], ["spin"]]


def test_report_compares_several_pairs_and_plots_the_chosen_during_training(tmp_path, synthetic_run):
    """`compare` adds pairs (one summary table); each trained model's metrics.jsonl gives the displacement plot."""
    for name, drift in (("sc-k4", -0.08), ("sft", None)):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        lines = []
        for step in range(1, 21):
            row = {"step": step, "loss": 0.5, "logps/chosen": -5.0 + (drift or 0.01) * step}
            if drift is not None:  # a preference model logs the chosen's log-ratio to the reference
                row["logratio/chosen_per_token"] = drift * step
            lines.append(json.dumps(row))
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 21, \"lo")  # a torn last line
        summary_file = synthetic_run / "eval" / name / "summary.json"
        summary = json.loads(summary_file.read_text())
        summary_file.write_text(json.dumps({**summary, "model_path": str(folder)}))
    md_path = report.run(ReportConfig(run=str(synthetic_run), compare=["sc-k4:base", "sc-k1:sft"], bootstrap=300))
    md = md_path.read_text()
    table = md.split("## Paired comparisons")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| sc-")]
    assert [r.split("|")[1].strip() for r in rows] == ["sc-k4 vs base", "sc-k1 vs sft"]
    ca = pq.read_table(synthetic_run / "eval" / "sc-k1" / "scores").column("correct").to_pylist()
    cb = pq.read_table(synthetic_run / "eval" / "sft" / "scores").column("correct").to_pylist()
    assert rows[1].strip("|").split("|")[-1].strip() == f"{stats.mcnemar_exact(ca, cb)['p']:.3g}"
    assert "## Paired: sc-k4 vs base" in md and "## Paired: sc-k1 vs sft" in md
    png = md_path.parent / "displacement.png"
    with Image.open(png) as im:
        im.verify()
    assert "](displacement.png)" in md
    with pytest.raises(UsageError, match="expected A:B"):
        report.run(ReportConfig(run=str(synthetic_run), compare=["sc-k4"]))
