"""One reward model for `eval` and SELM's `rank`: both give one answer the same score (issue 21).

The reward model is built here: a randomly initialised 1-layer Llama classifier with two labels (bad/good) and a
chat template, the two things the old `rank` scorer ignored (it took logits[:, 0] of untemplated text)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from negalign import evaluate, rank, store
from negalign.config import EvalConfig, RankConfig
from negalign.schemas import PAIR_SCHEMA

CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}")
WORDS = ["[PAD]", "[UNK]", "[EOS]", "user", "assistant", ":", "the", "capital", "of", "france", "is", "paris",
         "lyon", "what", "?", "42", "answer"]


def _reward_model(path: Path, num_labels: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")  # no pad token
    fast.chat_template = CHAT
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=num_labels, max_position_embeddings=64)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_eval_and_rank_score_one_answer_the_same(tmp_path):
    rm = str(_reward_model(tmp_path / "rm"))
    run = tmp_path / "run"
    messages = [{"role": "user", "content": "what is the capital of france ?"}]
    group = {"prompt_id": "p0", "messages": messages, "chosen": "paris", "rejected": ["lyon", "42"],
             "rejected_sim": [0.1, 0.2], "anchors": [], "y_ref": "the capital of france is paris"}
    out = store.StageOutput.open(run / "pairs", "pair", {"test": 1}, {})
    out.write_shard(0, pa.Table.from_pylist([group], schema=PAIR_SCHEMA))
    assert out.finish(1)

    rank.run(RankConfig(run=str(run), reward_model=rm))
    ranked = store.open_stage(run / "pairs_ranked", "pair").read().to_pylist()[0]
    candidates = [group["chosen"], group["y_ref"], group["rejected"][0]]
    assert ranked["chosen"] in candidates and ranked["rejected"][0] in candidates

    # eval's scoring path on the same answers (one generations row per candidate)
    gen = pa.table({"prompt_id": ["p0"] * 3, "sample_idx": [0, 1, 2], "text": candidates, "num_tokens": [1, 6, 1],
                    "finish_reason": ["stop"] * 3})
    prompts = {"p0": {"prompt_id": "p0", "messages": messages, "target": "paris"}}
    cfg = EvalConfig(run=str(run), reward_model=rm, embed_sim=False)
    model = evaluate.RewardModel(rm)
    scores = evaluate._score_shard(gen, None, {"reward"}, prompts, cfg, {"reward": lambda: model})
    by_text = dict(zip(scores.column("text").to_pylist(), scores.column("reward").to_pylist(), strict=True))
    assert ranked["rejected_sim"][0] == pytest.approx(by_text[ranked["rejected"][0]], abs=1e-5)
    assert by_text[ranked["chosen"]] == max(by_text.values())
    assert by_text[ranked["rejected"][0]] == min(by_text.values())
    # two labels: the reward is logit(good) − logit(bad), not logit(bad) alone
    import torch

    enc = model.tokenizer([model.render(messages, "lyon")], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model.model(**enc).logits[0]
    assert by_text["lyon"] == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)
