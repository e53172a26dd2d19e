"""`filter`: score every candidate against its prompt's target and pick negatives (SPEC §1.1 step 3).

Reads RUN/embeddings (and RUN/samples for emptiness and truncation) and writes RUN/negatives, one row per
(prompt, candidate): `sim_to_target`, `rank`, `kept`, `drop_reason`. The rule itself lives in
`negalign.selection` (vectorised, FAISS for the similarities); this module only moves data. Shard i of the
output covers shard i of the embeddings, which covers whole prompts.

Prompts without a target (D2O input: only given negatives) have no similarity (NaN): their self-samples are
de-duplicated, and with `--max-neg-sim` those too close to a given negative are dropped; all others are kept.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.table import Table

from negalign import selection
from negalign.config import FilterConfig, stage_path
from negalign.console import console, progress
from negalign.embed import embeddings_array
from negalign.errors import BadInput, UsageError
from negalign.store import StageOutput, open_stage, shard_name

NEGATIVES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("text_sha", pa.string()),
    ("sim_to_target", pa.float32()), ("rank", pa.int32()), ("kept", pa.bool_()), ("drop_reason", pa.string()),
])


def _stage_config(cfg: FilterConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("strategy", "keep_fraction", "max_sim", "drop_truncated", "near_dup_sim",
                                         "max_neg_sim")}


def _options(cfg: FilterConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"drop_truncated": cfg.drop_truncated, "near_dup_sim": cfg.near_dup_sim,
                            "max_neg_sim": cfg.max_neg_sim}
    if cfg.strategy == "self-contrast":
        opts["keep_fraction"] = cfg.keep_fraction
    if cfg.strategy == "threshold":
        opts["max_sim"] = cfg.max_sim
    return opts


def _vectors(table: pa.Table, file: str | None) -> np.ndarray:
    """The rows' embeddings; a NaN/inf one (a damaged embeddings artifact) is refused, naming its row: it would
    make every similarity of its prompt NaN."""
    vectors = embeddings_array(table)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if vectors.size else []
    if len(bad):
        r = table.slice(int(bad[0]), 1).select(["prompt_id", "sample_idx", "source"]).to_pylist()[0]
        raise BadInput(f"{len(bad)} non-finite (NaN/inf) vector(s), the first of prompt {r['prompt_id']}, "
                       f"sample_idx {r['sample_idx']} ({r['source']}); re-run `negalign embed --overwrite`",
                       file=file, column="embedding")
    return vectors


def filter_shard(emb: pa.Table, samples: pa.Table, cfg: FilterConfig, file: str | None = None) -> pa.Table:
    """One shard: the candidates of whole prompts -> one output row per candidate. `file` names the embeddings
    shard in errors."""
    src = emb.column("source")
    cand = emb.filter(pc.equal(src, "sample")).sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
    # Text and finish reason per candidate; joined on the key columns only (Arrow joins don't carry vectors).
    keys = cand.select(["prompt_id", "sample_idx"]).append_column("row", pa.array(np.arange(cand.num_rows)))
    info = keys.join(samples.select(["prompt_id", "sample_idx", "text", "finish_reason"]),
                     keys=["prompt_id", "sample_idx"], join_type="left outer").sort_by("row")
    targets = emb.filter(pc.equal(src, "target"))
    negatives = emb.filter(pc.equal(src, "negative"))

    pids = cand.column("prompt_id").to_numpy(zero_copy_only=False)
    groups, group = np.unique(pids, return_inverse=True)
    index = {p: g for g, p in enumerate(groups)}
    cand_emb = _vectors(cand, file)
    dim = cand_emb.shape[1] if cand_emb.ndim == 2 and len(cand_emb) else 0
    target_emb = np.zeros((len(groups), dim), dtype=np.float32)
    has_target = np.zeros(len(groups), dtype=bool)
    if targets.num_rows:
        t_emb = _vectors(targets, file)
        for pid, vec in zip(targets.column("prompt_id").to_pylist(), t_emb, strict=True):
            if pid in index:
                target_emb[index[pid]] = vec
                has_target[index[pid]] = True
    sim = selection.cosine_to_target(cand_emb, target_emb, group) if len(cand_emb) else np.zeros(0, np.float32)
    sim = np.where(has_target[group], sim, 0.0).astype(np.float32)

    neg_kwargs: dict[str, Any] = {}
    if cfg.max_neg_sim is not None:
        keep = [pid in index for pid in negatives.column("prompt_id").to_pylist()]
        negs = negatives.filter(pa.array(keep, pa.bool_()))
        neg_kwargs = {"neg_emb": _vectors(negs, file) if negs.num_rows else np.zeros((0, dim), np.float32),
                      "neg_group": np.array([index[p] for p in negs.column("prompt_id").to_pylist()], np.int64)}
    texts = info.column("text").fill_null("").to_pylist()
    candidates = selection.Candidates(
        group=group, sample_idx=cand.column("sample_idx").to_numpy(), text_hash=cand.column("text_sha").to_numpy(
            zero_copy_only=False), is_empty=np.array([not t.strip() for t in texts], dtype=bool), sim=sim,
        is_truncated=np.array([r == "length" for r in info.column("finish_reason").to_pylist()], dtype=bool),
        emb=cand_emb if (cfg.near_dup_sim is not None or cfg.max_neg_sim is not None) else None)
    chosen = selection.select(cfg.strategy, candidates, **_options(cfg), **neg_kwargs)
    kept, rank, reason = chosen.kept, chosen.rank, chosen.drop_reason
    if not has_target.all():  # D2O prompts: no target, nothing to rank against; dedup (+ near-negative) only
        plain = selection.select_random(candidates, drop_truncated=cfg.drop_truncated,
                                        near_dup_sim=cfg.near_dup_sim, max_neg_sim=cfg.max_neg_sim, **neg_kwargs)
        no_t = ~has_target[group]
        kept = np.where(no_t, plain.kept, kept)
        rank = np.where(no_t, -1, rank)
        reason = np.where(no_t, plain.drop_reason, reason)
    return pa.table({
        "prompt_id": cand.column("prompt_id"), "sample_idx": cand.column("sample_idx").cast(pa.int32()),
        "text_sha": cand.column("text_sha"),
        "sim_to_target": pa.array(np.where(has_target[group], sim, np.nan).astype(np.float32)),
        "rank": pa.array(rank.astype(np.int32)), "kept": pa.array(kept.astype(bool)),
        "drop_reason": pa.array(list(reason), pa.string()),
    }, schema=NEGATIVES_SCHEMA)


def _partial_summary(table: pa.Table) -> dict[str, Any]:
    """What the summary needs of one output shard. Shards hold whole prompts, so prompt counts add up."""
    reasons = table.column("drop_reason").fill_null("kept").value_counts().to_pylist()
    kept_prompts = table.filter(table.column("kept")).column("prompt_id")
    return {"candidates": table.num_rows, "by_reason": Counter({r["values"]: r["counts"] for r in reasons}),
            "prompts": len(pc.unique(table.column("prompt_id"))),
            "prompts_with_negatives": len(pc.unique(kept_prompts)) if len(kept_prompts) else 0,
            "sims": table.column("sim_to_target").to_numpy(zero_copy_only=False).astype(np.float32),
            "kept": table.column("kept").to_numpy(zero_copy_only=False).astype(bool)}


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Kept / dropped by reason and similarity quantiles (all candidates and kept ones), over shards."""
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in ("candidates", "prompts", "prompts_with_negatives")}
    out["by_reason"] = dict(sum((p["by_reason"] for p in parts), Counter()))
    sims = np.concatenate([p["sims"] for p in parts]).astype(np.float64) if parts else np.zeros(0)
    kept = np.concatenate([p["kept"] for p in parts]) if parts else np.zeros(0, dtype=bool)
    for name, mask in (("sim_quantiles_all", np.ones_like(kept)), ("sim_quantiles_kept", kept)):
        values = sims[mask & np.isfinite(sims)]
        out[name] = ({f"q{int(q * 100)}": round(float(v), 4) for q, v in
                      zip((0, 0.25, 0.5, 0.75, 1), np.quantile(values, [0, 0.25, 0.5, 0.75, 1]), strict=True)}
                     if values.size else {})
    return out


def summarise(table: pa.Table) -> dict[str, Any]:
    """Kept / dropped by reason and similarity quantiles (all candidates and kept ones) of a filter output."""
    return _combine([_partial_summary(table)])


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="filter: kept / dropped by reason", title_justify="left")
    table.add_column("outcome")
    table.add_column("candidates", justify="right")
    table.add_column("share", justify="right")
    for reason, n in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1]):
        table.add_row(reason, f"{n:,}", f"{n / max(summary['candidates'], 1):.1%}")
    console.print(table)
    for name in ("sim_quantiles_all", "sim_quantiles_kept"):
        if summary[name]:
            console.print(f"{name.replace('_', ' ')}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[name].items()))
    console.print(f"prompts with at least one negative: {summary['prompts_with_negatives']} / {summary['prompts']}")


def run(cfg: FilterConfig) -> None:
    if cfg.strategy not in selection.STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(selection.STRATEGIES)}, got '{cfg.strategy}'")
    if cfg.strategy == "threshold" and cfg.max_sim is None:
        raise UsageError("--strategy threshold needs --max-sim")
    if not 0.0 <= cfg.keep_fraction <= 1.0:
        raise UsageError(f"--keep-fraction must be in [0, 1], got {cfg.keep_fraction}")
    embeddings = open_stage(stage_path(cfg, cfg.embeddings, "embeddings"), "embed")
    samples = open_stage(stage_path(cfg, cfg.samples, "samples"), "sample")
    out_dir = stage_path(cfg, cfg.out, "negatives")
    # check_inputs (in open) refuses embeddings made from other samples, so shard i of each covers the same prompts.
    out = StageOutput.open(out_dir, "filter", _stage_config(cfg), {"embeddings": embeddings, "samples": samples},
                           overwrite=cfg.overwrite)
    num_shards = embeddings.num_shards
    todo = [s for s in range(num_shards) if not out.done(s)]
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task(f"filter → {out_dir}", total=num_shards, completed=num_shards - len(todo))
        parts: dict[int, dict[str, Any]] = {}   # the summary's inputs, not the shards: memory stays small
        for s in todo:
            smp = samples.read_shard(s, ["prompt_id", "sample_idx", "text", "finish_reason"])
            result = filter_shard(embeddings.read_shard(s), smp, cfg, str(embeddings.path / shard_name(s)))
            out.write_shard(s, result, {"rows": result.num_rows, "kept": int(pc.sum(result.column("kept")).as_py()
                                                                              or 0)})
            parts[s] = _partial_summary(result)
            bar.advance(task)
    for s in range(num_shards):                 # shards done by an earlier run: read back
        if s not in parts:
            parts[s] = _partial_summary(out.read_shard(s))
    summary = _combine([parts[s] for s in range(num_shards)])
    out.finish(num_shards, timings={"filter_s": round(time.time() - t0, 3)}, summary=summary)
    print_summary(summary)
