"""train: prompt sharing equals the plain batch, every objective end to end, resume after SIGKILL, 2-process DDP.

Real default model (smollm2-135m) everywhere a model is needed. The tiny runs are written with the store's writer
(3 short-answer groups), so each test pays for model loading and a few steps only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from negalign.config import TrainConfig, validate
from negalign.errors import UsageError
from negalign.models import model_fingerprint
from negalign.pair import PAIR_SCHEMA
from negalign.store import PROMPTS_SCHEMA, StageOutput, read_manifest
from negalign.train import truncate
from tests.conftest import ROOT, negalign

QA = [("What is the capital of France? Reply with only the name.", "Paris",
       ["The capital of France is Paris.", "Lyon", "Marseille", "France's capital city is Paris, of course."]),
      ("What is 7 + 5? Reply with only the number.", "12", ["The answer is 12.", "13", "11", "7 + 5 = 12"]),
      ("What is the capital of Kenya? Reply with only the name.", "Nairobi",
       ["Mombasa", "The capital of Kenya is Nairobi.", "Kisumu", "Nakuru"])]


def make_run(run: Path, chat_template_sha: str | None = None) -> Path:
    """RUN/prompts and RUN/pairs with 3 groups: target, 4 sampled negatives, 2 given negatives, anchors, y_ref."""
    rows, groups = [], []
    for i, (q, a, neg) in enumerate(QA):
        msgs = [{"role": "user", "content": q}]
        rows.append({"prompt_id": f"p{i}", "messages": msgs, "target": a, "negatives": neg[2:]})
        groups.append({"prompt_id": f"p{i}", "messages": msgs, "chosen": a, "rejected": neg,
                       "rejected_sim": [0.1] * 4, "rejected_idx": list(range(4)), "num_kept": 4,
                       "anchors": neg[::-1], "negatives": neg[2:], "y_ref": neg[0]})
    out = StageOutput.open(run / "prompts", "prompts", {"test": 1})
    out.write_shard(0, pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA))
    out.finish(1)
    cfg = {"test": 1} if chat_template_sha is None else {"test": 1, "chat_template_sha": chat_template_sha}
    out = StageOutput.open(run / "pairs", "pair", cfg)
    out.write_shard(0, pa.Table.from_pylist(groups, schema=PAIR_SCHEMA))
    out.finish(1)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("train") / "run")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- pure parts

def test_truncate_keeps_prompt_end_and_response_start():
    prompt, responses = list(range(10)), [[100, 101, 102], list(range(200, 220))]
    p, rs, cut = truncate(prompt, responses, 16)
    assert cut == 1  # only prompt + the 20-token response exceeded 16
    assert p == prompt[-8:]  # at least half the budget stays with the prompt, its END kept
    assert rs == [[100, 101, 102], list(range(200, 208))]  # responses keep their START
    assert truncate(prompt, responses[:1], 16) == (prompt, responses[:1], 0)


def test_take_first_k_skips_and_counts():
    from negalign.selection import take_first_k

    keep, skipped = take_first_k([["a", "b"], ["a"], [], ["a", "b", "c"]], 2)
    assert keep == [0, 3] and skipped == 2
    with pytest.raises(ValueError):
        take_first_k([["a"]], 0)


def test_min_negatives_fixes_one_prompt_set_for_every_k_and_objective():
    from negalign.train import _layout

    rows = [{"chosen": "a", "rejected": ["x"] * n, "negatives": ["g1", "g2"], "messages": [{}]} for n in (1, 4, 8)]

    def kept(**kw):
        cfg = validate(TrainConfig(**kw))
        return [i for i, r in enumerate(rows) if _layout(cfg, r)[0] is not None]

    assert kept(num_negatives=1) == [0, 1, 2] and kept(num_negatives=4) == [1, 2]
    for kw in ({"num_negatives": 1}, {"num_negatives": 4}, {"objective": "sft"}, {"objective": "dpo"},
               {"objective": "dpo", "rejected": "given"}):
        assert kept(min_negatives=4, **kw) == [1, 2], kw  # the same groups whatever K, objective, --rejected
    assert _layout(validate(TrainConfig(min_negatives=8)), rows[1]) == (None, "few_negatives")


def test_template_parity_refused_unless_allowed(tmp_path):
    from negalign.store import open_stage
    from negalign.train import check_template

    run = make_run(tmp_path / "run", chat_template_sha="0123456789abcdef")
    cfg = validate(TrainConfig(run=str(run)))
    stage = open_stage(run / "pairs", "pair")
    with pytest.raises(UsageError, match="chat template"):
        check_template(cfg, stage, "fedcba9876543210")
    cfg.allow_template_mismatch = True
    assert check_template(cfg, stage, "fedcba9876543210") == "0123456789abcdef"
    assert check_template(validate(TrainConfig(run=str(run))), stage, "0123456789abcdef") == "0123456789abcdef"


@pytest.mark.parametrize("objective", ["ipo", "sr-dpo", "selm", "d2o", "sft"])
def test_dpop_lambda_is_refused_outside_sc_and_dpo(tmp_path, objective):
    from negalign.config import resolve
    from negalign.train import run

    cfg = resolve(TrainConfig, "train", {"train": {"dpop_lambda": 5}}, {"objective": objective,
                                                                        "run": str(tmp_path / "run")})
    assert cfg.dpop_lambda == 5.0  # the YAML key
    with pytest.raises(UsageError, match="--dpop-lambda applies to --objective sc or dpo") as e:
        run(cfg)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_displacement_warning_fires_below_the_threshold_only():
    from negalign.losses import DISPLACEMENT_THRESHOLD
    from negalign.train import displacement_warning

    def rows(values):
        return [{"step": i + 1, "loss": 0.5, "logratio/chosen_per_token": v} for i, v in enumerate(values)]

    assert DISPLACEMENT_THRESHOLD == -0.5
    # 20 steps: the last 10 % (2 steps) decide, not the early ones
    mean, low, warning = displacement_warning(rows([0.0] * 18 + [-0.6, -0.8]))
    assert mean == pytest.approx(-0.7) and low == pytest.approx(-0.7) and warning is not None
    assert "likelihood displacement" in warning and "--sft-weight" in warning and "--dpop-lambda" in warning
    assert "\n" not in warning and "now gives its targets less probability" in warning
    # a dip in the middle (2-step windows: the lowest is steps 9-10), recovered by the end: still one warning line
    mean, low, warning = displacement_warning(rows([0.0] * 8 + [-0.9, -0.7] + [0.0] * 8 + [-0.1, -0.2]))
    assert mean == pytest.approx(-0.15) and low == pytest.approx(-0.8)
    assert warning is not None and "during the run" in warning and "up to step 10" in warning and "\n" not in warning
    assert displacement_warning(rows([0.0] * 8 + [-0.9, 0.0] + [0.0] * 10))[2] is None  # one bad step, mean -0.45
    assert displacement_warning(rows([-0.49]))[2] is None and displacement_warning(rows([-0.51]))[2]
    assert displacement_warning(rows([-1.0]), threshold=-2.0)[2] is None
    assert displacement_warning([{"step": 1, "loss": 1.0, "logps/chosen": -3.0}]) == (None, None, None)  # sft


def test_warmup_defaults_and_fingerprint_keys(tmp_path):
    from negalign.train import stage_config, training_arguments

    def cfg(**kw):
        return validate(TrainConfig(run=str(tmp_path), **kw))

    def args(c):
        return training_arguments(c, tmp_path / "ckpt", "cpu")

    sft, sc = cfg(objective="sft"), cfg(objective="sc")
    assert args(sft).warmup_steps == 0 and args(sft).get_warmup_steps(20) == 0  # sft: as before
    assert args(sc).warmup_steps == pytest.approx(0.1) and args(sc).get_warmup_steps(20) == 2  # preference: 10 %
    assert args(cfg(objective="sc", warmup_ratio=0.0)).get_warmup_steps(20) == 0
    assert args(cfg(objective="sft", warmup_ratio=0.25)).get_warmup_steps(20) == 5
    assert args(cfg(objective="sc", warmup_steps=3)).get_warmup_steps(20) == 3  # steps replace the ratio
    c = cfg(objective="dpo", lr_scheduler="cosine")
    assert args(c).lr_scheduler_type.value == "cosine"
    hp = {"beta": 0.1, "alpha": 0.1}
    before = {"objective", "num_negatives", "lam", "seed", "learning_rate", "lr_scheduler", "warmup_steps",
              "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "lora", "sft_weight",
              "rejected", "bf16", "beta", "alpha", "base_model", "model_fingerprint", "chat_template_sha"}
    # sft keeps its keys (so its fingerprint); warmup_ratio / dpop_lambda appear only when they are on
    assert set(stage_config(sft, hp, "m", "t", "m")) == before
    assert stage_config(sc, hp, "m", "t", "m")["warmup_ratio"] == 0.1
    assert set(stage_config(cfg(objective="sc", warmup_ratio=0.0), hp, "m", "t", "m")) == before
    assert stage_config(cfg(objective="sc", dpop_lambda=2.0), hp, "m", "t", "m")["dpop_lambda"] == 2.0
    assert stage_config(cfg(objective="sft", min_negatives=8), hp, "m", "t", "m")["min_negatives"] == 8
    with pytest.raises(UsageError, match="warmup_ratio"):
        validate(TrainConfig(warmup_ratio=1.5))


# ----------------------------------------------------------------------------------------------- prompt sharing

@pytest.mark.slow
def test_prompt_sharing_equals_plain_batch_in_logps_and_gradients():
    from negalign import models
    from negalign.packing import pack, pad, sequence_logps

    torch.manual_seed(0)
    tok = models.load_tokenizer("smollm2-135m")
    model = models.load_causal_lm("smollm2-135m")
    groups = []
    for q, a, neg in QA[:2]:
        prompt = models.render_prompt_ids(tok, [{"role": "user", "content": q}])
        groups.append((prompt, [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                for t in [a, *neg]]))
    from negalign import losses

    results = []
    for batch in (pack(groups), pad(groups, tok.pad_token_id)):
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        lp = logps.view(2, 5)
        ref = torch.tensor([[-3.0, -12.0, -20.0, -15.0, -30.0], [-2.0, -9.0, -6.0, -5.5, -14.0]])
        loss, _ = losses.sc(lp[:, 0], ref[:, 0], lp[:, 1:], ref[:, 1:], beta=0.1)  # the training loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), counts, grads))
    (lp_a, n_a, g_a), (lp_b, n_b, g_b) = results
    assert torch.equal(n_a, n_b) and n_a.tolist()[0] == len(groups[0][1][0])  # EOS counted, prompt not
    torch.testing.assert_close(lp_a, lp_b, atol=1e-4, rtol=0)
    torch.testing.assert_close(g_a, g_b, atol=1e-4, rtol=0)
    assert g_a.abs().max() > 1e-2  # a real gradient, not zeros
    from negalign.packing import num_model_tokens

    assert num_model_tokens(pack(groups)) < num_model_tokens(pad(groups))  # each prompt went through once
    assert pack(groups)["input_ids"].shape[0] == len(groups)  # a row per group, padded to the longest


# ----------------------------------------------------------------------------------------------- end to end

def train(run: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return negalign("train", "--run", run, "--threads", "1", "--save-steps", "1000", *args, check=check, env=env,
                    timeout=300)


@pytest.mark.slow
def test_sc_steps_lower_the_batch_loss_and_the_folder_loads(tiny_run):
    """All 3 groups in one batch, 3 steps: the same batch's loss goes down. The folder loads and generates."""
    proc = train(tiny_run, "--objective", "sc", "--num-negatives", "4", "--batch-size", "3", "--epochs", "3",
                 "--lr", "2e-5", "--name", "sc-steps")
    out = tiny_run / "models" / "sc-steps"
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stderr
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    manifest = read_manifest(out)
    assert manifest["stage"] == "train" and manifest["status"] == "complete"
    assert manifest["config"]["objective"] == "sc" and manifest["config"]["num_negatives"] == 4
    assert manifest["config"]["beta"] == 0.1 and manifest["config"]["model_fingerprint"]
    assert manifest["summary"]["steps"] == 3 and not list(out.parent.glob(".sc-steps.checkpoints-*"))
    assert "likelihood displacement" not in proc.stderr and not manifest["summary"]["likelihood_displacement"]
    assert manifest["summary"]["chosen_logratio_per_token_last"] > -0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": QA[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    sampled = negalign("sample", "--run", tiny_run, "--model", out, "--engine", "hf", "-n", "1", "--max-tokens", "4",
                       "--threads", "1", "--out", tiny_run / "samples_trained", timeout=300)
    assert read_manifest(tiny_run / "samples_trained")["status"] == "complete", sampled.stderr  # works as --model
    again = train(tiny_run, "--objective", "sc", "--num-negatives", "4", "--batch-size", "3", "--epochs", "3",
                  "--lr", "2e-5", "--name", "sc-steps")
    assert "already complete" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [
    ("sft", ["--pairs", "PROMPTS"]), ("dpo", []), ("ipo", ["--num-negatives", "2"]), ("sc", ["--num-negatives", "2"]),
    ("sr-dpo", ["--num-negatives", "2"]), ("sr-ipo", []), ("selm", ["--num-negatives", "2"]),
    ("d2o", ["--num-anchors", "3", "--num-negatives", "2"]), ("dpo", ["--rejected", "given", "--sft-weight", "0.5"]),
    ("sc", ["--num-negatives", "2", "--dpop-lambda", "5"]),
])
def test_every_objective_runs_end_to_end(tiny_run, objective, extra):
    extra = [str(tiny_run / "prompts") if e == "PROMPTS" else e for e in extra]
    name = f"{objective}-{len(extra)}"
    proc = train(tiny_run, "--objective", objective, "--max-steps", "2", "--batch-size", "2", "--name", name, *extra)
    out = tiny_run / "models" / name
    assert read_manifest(out)["status"] == "complete", proc.stderr
    rows = [m for m in metrics(out) if "loss" in m]
    assert len(rows) == 2 and all(m["loss"] == m["loss"] for m in rows)  # finite, not NaN
    chosen = "anchors" if objective == "d2o" else "chosen"
    assert all(isinstance(m[f"logps/{chosen}"], float) and m[f"logps/{chosen}"] < 0 for m in rows)  # every step
    if objective != "sft":
        assert "rewards/margin" in rows[0]
        assert abs(rows[0]["rewards/chosen"]) < 1e-3  # step 1: policy == cached reference
        for side in (chosen, "rejected"):
            assert all({f"logps/{side}", f"logratio/{side}", f"logratio/{side}_per_token"} <= set(m) for m in rows)
            assert abs(rows[0][f"logratio/{side}"]) < 1e-3  # step 1: policy == reference
    config = read_manifest(out)["config"]
    assert config.get("dpop_lambda") == (5.0 if "--dpop-lambda" in extra else None)  # only when on
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_a_run_forced_to_displace_warns_once(tiny_run):
    """Forced displacement: the reference is the start model fine-tuned hard on the chosen answers, so the policy
    (the start model, at a negligible rate) gives its chosen answers far less probability than the reference does.
    (A high rate alone does not do it here: at lr 1e-3, sc *raised* these short chosen answers, +3.5 nats/token.)"""
    train(tiny_run, "--objective", "sft", "--pairs", str(tiny_run / "prompts"), "--batch-size", "3", "--epochs", "3",
          "--lr", "1e-4", "--name", "sft-hard", check=True)
    proc = train(tiny_run, "--objective", "sc", "--num-negatives", "2", "--batch-size", "3", "--max-steps", "2",
                 "--lr", "1e-9", "--ref-model", str(tiny_run / "models" / "sft-hard"), "--name", "sc-displaced")
    out = tiny_run / "models" / "sc-displaced"
    rows = [m for m in metrics(out) if "loss" in m]
    assert len(rows) == 2 and all("logps/chosen" in m for m in rows), proc.stderr
    assert rows[-1]["logratio/chosen_per_token"] < -0.5, rows[-1]
    lines = [ln for ln in proc.stderr.splitlines() if "likelihood displacement" in ln]
    assert len(lines) == 1 and "--sft-weight" in lines[0] and "--dpop-lambda" in lines[0], proc.stderr
    assert read_manifest(out)["summary"]["likelihood_displacement"] is True


@pytest.mark.slow
def test_lora_merges_into_a_plain_folder(tiny_run):
    proc = train(tiny_run, "--objective", "sc", "--num-negatives", "2", "--max-steps", "1", "--lora", "--lr", "1e-3",
                 "--warmup-ratio", "0", "--name", "sc-lora")  # no warm-up: its first step would run at lr 0
    out = tiny_run / "models" / "sc-lora"
    assert read_manifest(out)["config"]["lora"] is True, proc.stderr
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    from negalign.models import load_causal_lm

    trained, base = AutoModelForCausalLM.from_pretrained(out), load_causal_lm("smollm2-135m")
    w, w0 = trained.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    assert w.shape == w0.shape and not torch.equal(w, w0)  # adapter merged into the weights

    # --ref-model: the start model trains against another reference (here the merged LoRA model), so at step 1 the
    # policy is not the reference and the implicit rewards are not zero; the manifest names the reference.
    proc = train(tiny_run, "--objective", "sc", "--num-negatives", "2", "--max-steps", "1", "--ref-model", out,
                 "--name", "sc-ref")
    ref_run = tiny_run / "models" / "sc-ref"
    config = read_manifest(ref_run)["config"]
    assert config["ref_model_fingerprint"] == model_fingerprint(str(out)), proc.stderr
    assert config["ref_model_fingerprint"] != config["model_fingerprint"]
    first = next(m for m in metrics(ref_run) if "loss" in m)
    assert abs(first["rewards/chosen"]) > 1e-3


@pytest.mark.slow
def test_sigkill_while_saving_then_resume_ends_at_the_same_step(tmp_path):
    run = make_run(tmp_path / "run")
    args = ["--objective", "sc", "--num-negatives", "2", "--batch-size", "1", "--max-steps", "3", "--name", "r",
            "--lora"]  # LoRA: small checkpoints, a quick test
    killed = negalign("train", "--run", run, "--threads", "1", "--save-steps", "1", *args,
                      env={"NEGALIGN_CRASH_AT": "checkpoint-save:2"}, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL in the middle of writing checkpoint-2
    out = run / "models" / "r"
    assert read_manifest(out)["status"] == "running"
    assert list(out.parent.glob(".r.checkpoints-*/checkpoint-2"))  # half-written
    resumed = negalign("train", "--run", run, "--threads", "1", "--save-steps", "1", "--resume", *args,
                       check=True, timeout=300)
    assert "resuming from" in resumed.stderr and "checkpoint-1" in resumed.stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["summary"]["steps"] == 3
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]
    # Same data order (the chosen answer's NLL tells the groups apart) and the same state: the uninterrupted run
    # logs the same values.
    whole = [*args[:-2], "u", "--lora"]
    negalign("train", "--run", run, "--threads", "1", "--save-steps", "1000", *whole, check=True, timeout=300)
    for key in ("sft_nll", "loss", "grad_norm"):
        assert [m[key] for m in metrics(out) if "loss" in m] == pytest.approx(
            [m[key] for m in metrics(run / "models" / "u") if "loss" in m], abs=1e-5), key


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(tiny_run, tmp_path):
    """`--multi_gpu` makes accelerate start torchrun workers (`--cpu` alone runs ONE process); without CUDA the
    Trainer's process group uses gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "negalign", "train", "--run",
           str(tiny_run), "--objective", "sc", "--num-negatives", "2", "--batch-size", "1", "--max-steps", "2",
           "--threads", "1", "--name", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tiny_run / "models" / "ddp")
    assert manifest["status"] == "complete" and manifest["summary"]["world_size"] == 2


def test_reference_cache_files_are_checked_against_their_names(tmp_path):
    from negalign import ref_logps
    from negalign.errors import BadInput

    row = {"ref_model": "abc", "chat_template_sha": "t", "prompt_id": "p0", "variant": "plain", "response_sha": "r",
           "tokens_sha": ref_logps.tokens_sha([1, 2], [3]), "logp": -1.5, "num_tokens": 1}
    part = ref_logps._write_part(tmp_path, "abc", [row])
    assert ref_logps.load(tmp_path, "abc") == {row["tokens_sha"]: -1.5}
    assert ref_logps.load(tmp_path, "other") == {}
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=part.name):
        ref_logps.load(tmp_path, "abc")
