"""`rank`: SELM's ranking of {target, y_ref, rejected[0]} per pair group (SPEC §1.3): chosen = best, rejected = worst.

Feedback-free default: cosine similarity to the target under the run's embedder (the target is then always chosen,
and the rejected is whichever of y_ref and the negative is farther from it). With `--reward-model`: the reward
model's score of each response to the prompt, from `negalign.reward.RewardModel`, the scorer `eval` uses, so an
answer gets the same reward in both. The remaining negatives follow the worst one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from negalign import store
from negalign.config import RankConfig
from negalign.console import console
from negalign.stages import output_dir, stage_input


def run(cfg: RankConfig) -> None:
    """Rank each group with a y_ref; write the reordered groups (same schema) to RUN/pairs_ranked."""
    from negalign.embed import embeddings_array, text_sha

    pairs = store.open_stage(*stage_input(cfg, "pairs"))
    out_dir = output_dir(cfg)
    inputs = {"pairs": pairs.fingerprint}
    vectors: dict[str, np.ndarray] = {}
    score = None
    config: dict[str, object] = {"by": cfg.reward_model or "similarity"}
    if cfg.reward_model:  # the scorer `eval` uses: same template, same labels, same padding
        from negalign.reward import RewardModel

        model = RewardModel(cfg.reward_model)
        config["scorer"] = "reward.RewardModel"  # rankings by the old scorer (logits[:, 0], no template) are refused

        def score(messages: list[dict[str, str]], responses: list[str]) -> list[float]:
            return model.score([messages] * len(responses), responses)
    else:
        emb = store.open_stage(*stage_input(cfg, "embeddings"))
        inputs["embeddings"] = emb.fingerprint
        table = emb.read(["text_sha", "embedding"])
        vectors = dict(zip(table.column("text_sha").to_pylist(), embeddings_array(table), strict=True))
    out = store.StageOutput.open(out_dir, "pair", config, inputs,
                                 overwrite=cfg.overwrite)
    moved = total = 0
    for index, (_, table) in enumerate(pairs.iter_shards()):
        if out.done(index):
            continue
        rows = table.to_pylist()
        for row in rows:
            y_ref, rejected = row.get("y_ref"), list(row["rejected"] or [])
            if not y_ref or not rejected:
                continue
            total += 1
            candidates = [row["chosen"], y_ref, rejected[0]]
            if score is not None:
                scores = score(row["messages"], candidates)
            else:
                target = vectors.get(text_sha(row["chosen"]))
                scores = [1.0] + [float(vectors[text_sha(c)] @ target) if target is not None and text_sha(c) in
                                  vectors else -1.0 for c in candidates[1:]]
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if best == worst:
                continue
            sims = list(row.get("rejected_sim") or [])
            rest = [(r, s) for r, s in zip(rejected, sims + [float("nan")] * len(rejected), strict=False)
                    if r != candidates[worst] and r != candidates[best]]
            row["chosen"] = candidates[best]
            row["rejected"] = [candidates[worst]] + [r for r, _ in rest]
            row["rejected_sim"] = [float(scores[worst])] + [s for _, s in rest]
            moved += worst == 1
        out.write_shard(index, pa.Table.from_pylist(rows, schema=table.schema))
    out.finish(len(pairs.shard_files()), summary={"groups": total, "y_ref_rejected": moved})
    console.print(f"rank ({cfg.reward_model or 'similarity to the target'}): {total} groups, y_ref became the "
                  f"rejected answer in {moved} -> {out_dir}")
