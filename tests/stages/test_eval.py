"""`eval`: the statistics (win rate with ties, McNemar, paired and plain bootstrap), a reward model built and saved
here, and the command end to end on a handful of prompts (slow: it loads the default model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign import evaluate, prepare, stats
from negalign.config import EvalConfig, PrepareConfig
from tests.conftest import negalign, write_jsonl

# ----------------------------------------------------------------------------------------------- statistics


def test_win_rate_arithmetic_with_ties():
    answer = [2.0, 1.0, 3.0, 0.50, 5.0, -1.0]
    target = [1.0, 2.0, 3.0, 0.55, 5.0, -1.0]
    # win, loss, exact tie, tie within tol, exact tie, exact tie
    scores = stats.win_scores(answer, target, tol=0.1)
    assert scores.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    assert scores.mean() == pytest.approx((1 + 0 + 0.5 * 4) / 6)
    strict = stats.win_scores(answer, target)  # tol 0: 0.50 vs 0.55 is a loss
    assert strict.tolist() == [1.0, 0.0, 0.5, 0.0, 0.5, 0.5]
    assert np.isnan(stats.win_scores([1.0], [float("nan")])[0])  # no target reward: not scored
    assert stats.win_tie_loss(answer, target, tol=0.1) == {"win": 1, "tie": 4, "loss": 1}


def test_mcnemar_exact_on_hand_made_vectors():
    # 6 discordant pairs, all for a: p = 2 * (1/2)^6
    a = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    r = stats.mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"], r["both"], r["neither"]) == (6, 0, 1, 3)
    assert r["p"] == pytest.approx(2 / 64)
    # 3 vs 1: p = 2 * (C(4,0) + C(4,1)) / 16 = 0.625; symmetric in a and b
    a = [1, 1, 1, 0, 1, 0]
    b = [0, 0, 0, 1, 1, 0]
    assert stats.mcnemar_exact(a, b)["p"] == pytest.approx(0.625)
    assert stats.mcnemar_exact(b, a)["p"] == pytest.approx(0.625)
    # no discordant pair: nothing to test, p = 1; balanced discordance: p capped at 1
    assert stats.mcnemar_exact([1, 0], [1, 0])["p"] == 1.0
    assert stats.mcnemar_exact([1, 0], [0, 1])["p"] == 1.0
    # cross-check a larger case against the binomial tail computed directly
    a = [1] * 12 + [0] * 3 + [1] * 5
    b = [0] * 12 + [1] * 3 + [1] * 5
    tail = sum(math.comb(15, i) for i in range(4)) / 2**15
    assert stats.mcnemar_exact(a, b)["p"] == pytest.approx(2 * tail)


def test_paired_interval_on_hand_made_vectors():
    b = np.array([0.1, 0.9, 0.4, 0.7, 0.2, 0.8, 0.3, 0.6, 0.5, 0.55] * 3)
    a = b + 0.05  # the same shift on every prompt
    d = stats.paired_bootstrap_ci(a, b, seed=0)
    assert d["mean"] == pytest.approx(0.05) and d["lo"] == pytest.approx(0.05) and d["hi"] == pytest.approx(0.05)
    # a small, consistent gain on prompts of very different difficulty: the unpaired intervals overlap,
    # the paired one excludes 0.
    rng = np.random.default_rng(1)
    a = b + 0.03 + rng.normal(0, 0.01, b.size)
    ua, ub = stats.bootstrap_ci(a), stats.bootstrap_ci(b)
    assert ua["lo"] < ub["hi"]  # unpaired: overlap
    d = stats.paired_bootstrap_ci(a, b)
    assert 0 < d["lo"] < 0.03 < d["hi"] < 0.04
    # NaN pairs (one side unscored) are left out
    d = stats.paired_bootstrap_ci([1.0, 2.0, float("nan")], [0.0, 1.0, 5.0])
    assert d["n"] == 2 and d["mean"] == 1.0
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ci([1.0], [1.0, 2.0])


def test_bootstrap_interval_covers_the_known_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, 400)
    ci = stats.bootstrap_ci(x, seed=0)
    assert ci["lo"] < 3.0 < ci["hi"]
    assert 2 * 1.96 / 20 * 0.8 < ci["hi"] - ci["lo"] < 2 * 1.96 / 20 * 1.2  # ≈ 2·1.96·σ/√n
    assert stats.bootstrap_ci(x, seed=0) == ci  # fixed seed: the same interval
    # coverage over many synthetic samples of a Bernoulli(0.3) rate is close to 95 %
    hits = 0
    for trial in range(200):
        sample = rng.random(60) < 0.3
        c = stats.bootstrap_ci(sample, n_boot=500, seed=trial)
        hits += c["lo"] <= 0.3 <= c["hi"]
    assert 0.88 <= hits / 200 <= 0.99
    assert stats.bootstrap_ci([]) == {"mean": None, "lo": None, "hi": None, "n": 0}


def test_mean_se_over_seeds():
    r = stats.mean_se([0.4, 0.5, 0.6])
    assert r["mean"] == pytest.approx(0.5) and r["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert stats.mean_se([0.4])["se"] is None


def test_distinct_n():
    assert evaluate.distinct_n(["a b a b"], 1) == 0.5
    assert evaluate.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert evaluate.distinct_n(["a", ""], 2) is None


# ----------------------------------------------------------------------------------------------- reward model

def _tiny_reward_model(path: Path) -> Path:
    """A randomly initialised 1-layer Llama sequence classifier with a word-level tokenizer, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "user", "assistant", ":", "the", "capital", "of", "france", "is", "paris",
             "lyon", "what", "?", "42", "answer"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0, max_position_embeddings=64))
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def test_reward_model_loads_from_disk_and_scores(tmp_path):
    path = _tiny_reward_model(tmp_path / "rm")
    assert (path / "model.safetensors").exists()
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = ["Paris", "the capital of france is lyon", "Paris", "42", ""]
    one = evaluate.RewardModel(str(path), batch_size=1)
    many = evaluate.RewardModel(str(path), batch_size=4)
    r1 = one.score([prompt] * len(answers), answers)
    r4 = many.score([prompt] * len(answers), answers)
    assert all(math.isfinite(x) for x in r1)
    np.testing.assert_allclose(r1, r4, atol=1e-5)  # padding in a batch does not change a score
    assert r1[0] == pytest.approx(r1[2])  # the same text, the same reward
    assert len({round(x, 6) for x in r1}) > 1  # and the texts are told apart
    # the win rate of the answers against the target "Paris"
    target = many.score([prompt] * len(answers), ["Paris"] * len(answers))
    wins = stats.win_scores(r4, target, tol=1e-6)
    assert wins[0] == 0.5 and wins[2] == 0.5
    assert set(wins.tolist()) <= {0.0, 0.5, 1.0}


def test_reward_model_with_many_labels_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = _tiny_reward_model(tmp_path / "rm")
    LlamaForSequenceClassification(LlamaConfig(vocab_size=17, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_labels=3, pad_token_id=0)).save_pretrained(path)
    with pytest.raises(evaluate.UsageError, match="3"):
        evaluate.RewardModel(str(path))


def test_read_model_manifest_is_defensive(tmp_path):
    assert evaluate.read_model_manifest(tmp_path) == {}
    (tmp_path / "_manifest.json").write_text("{not json")
    assert evaluate.read_model_manifest(tmp_path) == {}
    (tmp_path / "_manifest.json").write_text(json.dumps({"config": {"objective": "sc"}}))  # not a manifest
    assert evaluate.read_model_manifest(tmp_path) == {}
    (tmp_path / "_manifest.json").unlink()
    from negalign.store import StageOutput

    out = StageOutput.open(tmp_path, "train", {"objective": "sc", "num_negatives": 4}, {})  # as `train` writes it
    assert out.finish(0)
    assert evaluate.read_model_manifest(tmp_path) == {"objective": "sc", "num_negatives": 4}
    (tmp_path / "_manifest.json").write_text(json.dumps(["a list"]))
    assert evaluate.read_model_manifest(tmp_path) == {}


def test_unknown_checker_kind_in_the_map_is_refused(tmp_path):
    with pytest.raises(evaluate.UsageError, match="regex"):
        evaluate.run(EvalConfig(run=str(tmp_path), checkers={"sums": "regex"}))


# ----------------------------------------------------------------------------------------------- end to end

ROWS = [
    {"prompt": "What is the capital of France? Reply with only the name.", "target": "Paris", "task": "capitals"},
    {"prompt": "What is the capital of Japan? Reply with only the name.", "target": "Tokyo", "task": "capitals"},
    {"prompt": "What is 2 + 3? Reply with only the number.", "target": "5", "task": "sums"},
    {"prompt": "What is 10 + 7? Reply with only the number.", "target": "17", "task": "sums"},
]


@pytest.mark.slow
def test_eval_cli_end_to_end_resumes_and_rescores_only_what_changed(tmp_path):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    prepare.run(PrepareConfig(run=str(run), input=str(data)))
    prompts = pq.read_table(sorted((run / "prompts").glob("*.parquet"))[0])
    assert sorted(prompts.column("task").to_pylist()) == ["capitals", "capitals", "sums", "sums"]
    args = ["eval", "--run", run, "--prompts", run / "prompts", "--engine", "hf", "--max-tokens", "8",
            "--checker", "contains", "--threads", "1"]
    first = negalign(*args, check=True)
    out = run / "eval" / "smollm2-135m"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_config"]["objective"] == "base"
    assert summary["generation"]["greedy"] is True
    overall = summary["overall"]
    assert overall["num_prompts"] == 4 and overall["num_answers"] == 4
    for key in ("accuracy", "embed_sim", "tokens", "truncated", "distinct_1", "distinct_2"):
        m = overall[key]
        assert m["n"] == 4 and m["lo"] <= m["mean"] <= m["hi"], key
    assert overall["win_rate"]["mean"] is None  # no reward model given
    assert set(summary["by_task"]) == {"capitals", "sums"}
    assert summary["by_task"]["sums"]["num_prompts"] == 2
    scores = pq.read_table(sorted((out / "scores").glob("*.parquet"))[0]).to_pylist()
    assert len(scores) == 4 and all(r["checker_kind"] == "contains" for r in scores)
    assert all(-1.0 <= r["embed_sim"] <= 1.0 for r in scores)
    assert "1 shard(s) scored" in first.stderr

    # In-process from here (each CLI start costs ~10 s of imports on this machine).
    def shard_entry() -> dict:
        return json.loads((out / "scores" / "_manifest.json").read_text())["shards"]["part-00000.parquet"]

    before = shard_entry()
    cfg = dict(run=str(run), prompts=str(run / "prompts"), engine="hf", max_tokens=8, checker="contains", threads=1)
    evaluate.run(EvalConfig(**cfg))  # nothing changed: nothing generated, nothing scored
    assert shard_entry() == before

    old_sims = [r["embed_sim"] for r in scores]
    again = evaluate.run(EvalConfig(**cfg, checkers={"sums": "number"}))  # only the checker setting changed
    after = shard_entry()
    assert after["written_at"] >= before["written_at"] and after["sha256"] != before["sha256"]
    assert after["meta"]["metrics"]["embed_sim"] == before["meta"]["metrics"]["embed_sim"]
    assert after["meta"]["metrics"]["checker"] != before["meta"]["metrics"]["checker"]
    rows = pq.read_table(sorted((out / "scores").glob("*.parquet"))[0]).to_pylist()
    assert {r["task"]: r["checker_kind"] for r in rows} == {"capitals": "contains", "sums": "number"}
    assert [r["embed_sim"] for r in rows] == old_sims  # kept, not recomputed
    assert again["checker"]["by_task"] == {"sums": "number"}

    with pytest.raises(evaluate.UsageError, match="prompts_test"):  # no held-out prompts in this run
        evaluate.run(EvalConfig(run=str(run), engine="hf"))


@pytest.mark.slow
def test_eval_with_a_reward_model_scores_win_rate(tmp_path):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "data.jsonl", ROWS[:2])
    prepare.run(PrepareConfig(run=str(run), input=str(data)))
    rm = _tiny_reward_model(tmp_path / "rm")
    summary = evaluate.run(EvalConfig(run=str(run), prompts=str(run / "prompts"), engine="hf", max_tokens=6,
                                      embed_sim=False, reward_model=str(rm), threads=1))
    o = summary["overall"]
    assert o["embed_sim"]["mean"] is None
    assert 0.0 <= o["win_rate"]["mean"] <= 1.0 and 0.0 < o["reward_sigmoid"]["mean"] < 1.0
    rows = pq.read_table(sorted((run / "eval" / "smollm2-135m" / "scores").glob("*.parquet"))[0]).to_pylist()
    for r in rows:
        expected = 1.0 if r["reward"] > r["reward_target"] else 0.0 if r["reward"] < r["reward_target"] else 0.5
        assert r["win"] == expected


# ----------------------------------------------------------------------------------------------- pref-acc

CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")


def _tiny_lm(path: Path, seed: int) -> Path:
    """A random 1-layer Llama causal LM with a word-level tokenizer and a chat template, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _tiny_reward_model(path)  # writes the word-level tokenizer (the classifier weights are replaced below)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                 bos_token_id=None, max_position_embeddings=64)).save_pretrained(path)
    return path


def test_response_logps_equal_full_minus_prompt_likelihood(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from negalign.models import render_prompt_ids

    path = _tiny_lm(tmp_path / "lm", seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "what is the capital of france ?"}]
    responses = ["paris", "the capital of france is lyon", ""]
    got = evaluate._response_logps(model, tok, messages, responses)

    def loglik(ids: list[int]) -> float:  # sum of log p(token t | tokens < t), t >= 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))

    prompt = render_prompt_ids(tok, messages)
    for r, g in zip(responses, got, strict=True):
        ids = prompt + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert g == pytest.approx(loglik(ids) - loglik(prompt), abs=1e-4)


def test_pref_acc_on_held_out_groups(tmp_path):
    """A whole eval with tiny random models: generation (HF engine), checker, and pref-acc against a reference."""
    from negalign.pair import PAIR_SCHEMA
    from negalign.store import StageOutput

    policy, ref = _tiny_lm(tmp_path / "policy", seed=0), _tiny_lm(tmp_path / "ref", seed=1)
    run = tmp_path / "run"
    prepare.run(PrepareConfig(run=str(run), input=str(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "what is the capital of france ?", "target": "paris", "task": "capitals"}]))))
    groups = [{"prompt_id": f"g{i}", "messages": [{"role": "user", "content": q}], "chosen": c, "rejected": rj,
               "rejected_sim": [0.1] * len(rj), "anchors": [], "y_ref": None}
              for i, (q, c, rj) in enumerate([("what is the capital of france ?", "paris", ["lyon", "42", "the"]),
                                              ("what is 42 ?", "42", ["answer"])])]
    rows = [{name: g.get(name) for name in PAIR_SCHEMA.names} for g in groups]
    out = StageOutput.open(run / "pairs_test", "pair", {"test": 1}, {})
    out.write_shard(0, pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
    assert out.finish(1)

    summary = evaluate.run(EvalConfig(run=str(run), model=str(policy), prompts=str(run / "prompts"), engine="hf",
                                      max_tokens=4, embed_sim=False, pairs=str(run / "pairs_test"),
                                      ref_model=str(ref), threads=1, bootstrap=200))
    acc = pq.read_table(sorted((run / "eval" / "policy" / "pref_acc").glob("*.parquet"))[0]).to_pylist()
    assert len(acc) == 2 and len(acc[0]["reward_rejected"]) == 3
    for row in acc:
        assert row["accuracy"] == pytest.approx(np.mean([row["reward_chosen"] > r for r in row["reward_rejected"]]))
    assert summary["overall"]["pref_acc"]["mean"] == pytest.approx(np.mean([r["accuracy"] for r in acc]))
    assert summary["ref_model"] == str(ref)


# ----------------------------------------------------------------------------------------------- task column

def test_prepare_keeps_the_task_family(tmp_path):
    from negalign.errors import BadInput

    rows = [{"prompt": "q1", "target": "a", "task": "sums", "family": "x"},
            {"prompt": "q2", "target": "b", "task": None, "family": "y"},
            {"prompt": "q3", "target": "c", "family": "y"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def tasks(run: Path) -> dict[str, str | None]:
        t = pq.read_table(sorted((run / "prompts").glob("*.parquet"))[0]).to_pylist()
        return {r["messages"][-1]["content"]: r["task"] for r in t}

    prepare.run(PrepareConfig(run=str(tmp_path / "a"), input=str(data)))  # default: `task` when present
    assert tasks(tmp_path / "a") == {"q1": "sums", "q2": None, "q3": None}
    prepare.run(PrepareConfig(run=str(tmp_path / "b"), input=str(data), task_field="family"))
    assert tasks(tmp_path / "b") == {"q1": "x", "q2": "y", "q3": "y"}
    with pytest.raises(BadInput, match="family"):
        prepare.run(PrepareConfig(run=str(tmp_path / "c"), input=str(write_jsonl(tmp_path / "e.jsonl", [
            {"prompt": "q", "target": "a"}])), task_field="family"))
    with pytest.raises(BadInput, match="task"):
        prepare.run(PrepareConfig(run=str(tmp_path / "d"), input=str(write_jsonl(tmp_path / "f.jsonl", [
            {"prompt": "q", "target": "a", "task": ["a", "list"]}]))))
