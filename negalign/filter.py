"""`filter`: score every candidate against its prompt's target and pick negatives (SPEC §1.1 step 3).

Reads RUN/embeddings (and RUN/samples for emptiness and truncation) and writes RUN/negatives, one row per
(prompt, candidate): `sim_to_target`, `rank`, `kept`, `drop_reason`. The rule itself lives in
`negalign.selection` (vectorised, FAISS for the similarities); this module only moves data. Shard i of the
output covers shard i of the embeddings, which covers whole prompts.

Prompts without a target (D2O input: only given negatives) have no similarity (NaN): their self-samples are
de-duplicated, and with `--max-neg-sim` those too close to a given negative are dropped; all others are kept.

With a target, RUN/prompts gives its text and the prompt's task family: a kept candidate equal to the target after
`checkers.normalise` is dropped as `same_as_target` (default; after the rule, as the reference code drops empty
outputs), and with `--checker` / `checkers: {family: kind}` a candidate the checker marks correct is dropped as
`correct` before the rule (never a negative).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.table import Table

from negalign import checkers, selection
from negalign.config import FilterConfig
from negalign.console import console, progress
from negalign.embed import embeddings_array
from negalign.errors import BadInput, UsageError
from negalign.schemas import NEGATIVES_SCHEMA
from negalign.stages import output_dir, stage_input
from negalign.store import PromptRows, StageInput, StageOutput, open_stage, shard_name

NO_TASK = "(none)"  # as in eval's summary

def _stage_config(cfg: FilterConfig) -> dict[str, Any]:
    """The fingerprinted config. The newer options enter it only when they change the output relative to the
    rule before them: `drop_same_as_target` when on (the default, so an old run's negatives, made without that
    drop, are refused on resume rather than mixed; `--no-drop-same-as-target` reproduces them and their
    fingerprint), `checker` / `checkers` when given."""
    out = {k: getattr(cfg, k) for k in ("strategy", "keep_fraction", "max_sim", "drop_truncated", "near_dup_sim",
                                        "max_neg_sim")}
    if cfg.drop_same_as_target:
        out["drop_same_as_target"] = True
    if cfg.checker is not None:
        out["checker"] = cfg.checker
    if cfg.checkers:
        out["checkers"] = dict(sorted(cfg.checkers.items()))
    return out


def uses_prompts(cfg: FilterConfig) -> bool:
    """Whether the filter reads RUN/prompts (the targets' text, the task families)."""
    return cfg.drop_same_as_target or cfg.checker is not None or bool(cfg.checkers)


def checker_kind(task: str | None, cfg: FilterConfig) -> str:
    """The prompt's checker: `checkers[task]`, else `--checker`, else none (similarity alone)."""
    return cfg.checkers.get(task or "", cfg.checker or checkers.NONE) if cfg.checkers else (cfg.checker or
                                                                                                checkers.NONE)


def check_kinds(cfg: FilterConfig) -> None:
    """Refuse an unknown checker kind (exit 2) before any work starts."""
    for family, kind in {"--checker": cfg.checker or checkers.NONE, **cfg.checkers}.items():
        if kind not in (*checkers.KINDS, checkers.NONE):
            raise UsageError(f"filter: checker for {family!r}: unknown kind {kind!r} (choose from "
                             f"{', '.join((*checkers.KINDS, checkers.NONE))})")


def _verdicts(texts: list[str], pids: np.ndarray, prompts: dict[str, dict[str, Any]],
              cfg: FilterConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per candidate: (is_correct by the prompt's checker or None when no checker is set, is_target_copy or None
    when that drop is off). A prompt without a target gives False for both. Worked a prompt at a time (candidates
    come sorted by prompt): its target and checker are looked up once, not once per candidate."""
    correct = np.zeros(len(texts), dtype=bool) if (cfg.checker is not None or cfg.checkers) else None
    copy = np.zeros(len(texts), dtype=bool) if cfg.drop_same_as_target else None
    starts = np.flatnonzero(np.r_[True, pids[1:] != pids[:-1]]).tolist() if len(pids) else []
    for a, b in zip(starts, [*starts[1:], len(pids)], strict=True):
        p = prompts.get(pids[a])
        target = p.get("target") if p else None
        if target is None:
            continue
        if copy is not None:
            copy[a:b] = checkers.exact_each(texts[a:b], target)
        if correct is not None:
            kind = checker_kind(p.get("task"), cfg)
            correct[a:b] = [bool(checkers.check(kind, text, target)) for text in texts[a:b]]
    return correct, copy


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


def filter_shard(emb: pa.Table, samples: pa.Table, cfg: FilterConfig, file: str | None = None,
                 prompts: dict[str, dict[str, Any]] | None = None, stats: dict[str, int] | None = None) -> pa.Table:
    """One shard: the candidates of whole prompts -> one output row per candidate. `file` names the embeddings
    shard in errors; `prompts` (prompt_id -> {target, task}) is needed when `uses_prompts(cfg)`. `stats`, when
    given, gets `capped_by_unique`: the prompts whose m was n_unique - 1 (self-contrast; else 0)."""
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
    is_correct, is_copy = (_verdicts(texts, pids, prompts, cfg) if prompts is not None
                           else (None, None))
    candidates = selection.Candidates(
        group=group, sample_idx=cand.column("sample_idx").to_numpy(), text_hash=cand.column("text_sha").to_numpy(
            zero_copy_only=False), is_empty=np.array([not t.strip() for t in texts], dtype=bool), sim=sim,
        is_truncated=pc.equal(info.column("finish_reason"), "length").fill_null(False).to_numpy(zero_copy_only=False),
        emb=cand_emb if (cfg.near_dup_sim is not None or cfg.max_neg_sim is not None) else None,
        is_correct=is_correct, is_target_copy=is_copy)
    chosen = selection.select(cfg.strategy, candidates, **_options(cfg), **neg_kwargs)
    kept, rank, reason = chosen.kept, chosen.rank, chosen.drop_reason
    capped = (chosen.capped_by_unique & has_target) if chosen.capped_by_unique is not None else None
    if not has_target.all():  # D2O prompts: no target, nothing to rank against; dedup (+ near-negative) only
        plain = selection.select_random(candidates, drop_truncated=cfg.drop_truncated,
                                        near_dup_sim=cfg.near_dup_sim, max_neg_sim=cfg.max_neg_sim, **neg_kwargs)
        no_t = ~has_target[group]
        kept = np.where(no_t, plain.kept, kept)
        rank = np.where(no_t, -1, rank)
        reason = np.where(no_t, plain.drop_reason, reason)
    if stats is not None:
        stats["capped_by_unique"] = int(capped.sum()) if capped is not None else 0
    return pa.table({
        "prompt_id": cand.column("prompt_id"), "sample_idx": cand.column("sample_idx").cast(pa.int32()),
        "text_sha": cand.column("text_sha"),
        "sim_to_target": pa.array(np.where(has_target[group], sim, np.nan).astype(np.float32)),
        "rank": pa.array(rank.astype(np.int32)), "kept": pa.array(kept.astype(bool)),
        "drop_reason": pa.array(list(reason), pa.string()),
    }, schema=NEGATIVES_SCHEMA)


SIM_BIN = 1e-4  # the summary's similarity quantiles come from a histogram of this width: within 1e-4, memory flat
SIM_BINS = int(round(2 / SIM_BIN)) + 1  # cosine in [-1, 1]


def _sim_histogram(sims: np.ndarray) -> dict[str, Any]:
    """Counts per SIM_BIN-wide bin, with the exact min and max (q0 and q100 are exact)."""
    sims = sims[np.isfinite(sims)].astype(np.float64)
    bins = np.clip(np.rint((sims + 1) / SIM_BIN), 0, SIM_BINS - 1).astype(np.int64)
    return {"counts": np.bincount(bins, minlength=SIM_BINS), "min": float(sims.min()) if sims.size else np.inf,
            "max": float(sims.max()) if sims.size else -np.inf}


def _quantiles(hist: dict[str, Any]) -> dict[str, float]:
    """q0, q25, q50, q75, q100 as `np.quantile` (linear) would give them on the raw values, to within SIM_BIN."""
    counts = hist["counts"]
    n = int(counts.sum())
    if not n:
        return {}
    cum = np.cumsum(counts)
    out = {"q0": round(hist["min"], 4)}
    for q in (0.25, 0.5, 0.75):
        rank = q * (n - 1)   # np.quantile interpolates between order statistics floor(rank) and floor(rank) + 1
        lo, hi = (int(np.searchsorted(cum, k, side="right")) for k in (int(rank), min(int(rank) + 1, n - 1)))
        frac = rank - int(rank)
        out[f"q{int(q * 100)}"] = round(((1 - frac) * lo + frac * hi) * SIM_BIN - 1, 4)
    out["q100"] = round(hist["max"], 4)
    return out


def _partial_summary(table: pa.Table, task_of: dict[str, str | None] | None = None,
                     capped_by_unique: int | None = None) -> dict[str, Any]:
    """What the summary needs of one output shard, in a size that does not grow with it. Shards hold whole prompts,
    so prompt counts add up. `task_of` (prompt_id -> family) counts the `correct` drops per family;
    `capped_by_unique` = prompts of the shard whose m was n_unique - 1 (None: not known, e.g. a shard written
    before this count existed)."""
    reasons = table.column("drop_reason").fill_null("kept").value_counts().to_pylist()
    kept_prompts = table.filter(table.column("kept")).column("prompt_id")
    correct_by_family: Counter = Counter()
    if task_of is not None:
        correct = table.filter(pc.equal(table.column("drop_reason"), "correct")).column("prompt_id").to_pylist()
        correct_by_family = Counter(task_of.get(p) or NO_TASK for p in correct)
    sims = table.column("sim_to_target").to_numpy(zero_copy_only=False).astype(np.float32)
    kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    return {"candidates": table.num_rows, "by_reason": Counter({r["values"]: r["counts"] for r in reasons}),
            "correct_by_family": correct_by_family, "capped_by_unique": capped_by_unique,
            "prompts": len(pc.unique(table.column("prompt_id"))),
            "prompts_with_negatives": len(pc.unique(kept_prompts)) if len(kept_prompts) else 0,
            "hist_all": _sim_histogram(sims), "hist_kept": _sim_histogram(sims[kept])}


def _add(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Two partial summaries as one."""
    if total is None:
        return part
    out = {k: total[k] + part[k] for k in ("candidates", "prompts", "prompts_with_negatives", "by_reason",
                                             "correct_by_family")}
    capped = (total["capped_by_unique"], part["capped_by_unique"])
    out["capped_by_unique"] = None if None in capped else sum(capped)
    for name in ("hist_all", "hist_kept"):
        a, b = total[name], part[name]
        out[name] = {"counts": a["counts"] + b["counts"], "min": min(a["min"], b["min"]),
                     "max": max(a["max"], b["max"])}
    return out


def _combine(total: dict[str, Any] | None) -> dict[str, Any]:
    """Kept / dropped by reason and similarity quantiles (all candidates and kept ones), from the partial summaries
    folded with `_add` (None: no shard)."""
    if total is None:
        return {"candidates": 0, "prompts": 0, "prompts_with_negatives": 0, "by_reason": {},
                "sim_quantiles_all": {}, "sim_quantiles_kept": {}}
    out: dict[str, Any] = {k: total[k] for k in ("candidates", "prompts", "prompts_with_negatives")}
    out["by_reason"] = dict(total["by_reason"])
    if total["correct_by_family"]:
        out["correct_by_family"] = dict(sorted(total["correct_by_family"].items()))
    if total["capped_by_unique"] is not None:
        out["prompts_m_by_unique"] = total["capped_by_unique"]
    out["sim_quantiles_all"] = _quantiles(total["hist_all"])
    out["sim_quantiles_kept"] = _quantiles(total["hist_kept"])
    return out


def summarise(table: pa.Table) -> dict[str, Any]:
    """Kept / dropped by reason and similarity quantiles (all candidates and kept ones) of a filter output."""
    return _combine(_partial_summary(table))


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
    if summary.get("correct_by_family"):
        console.print("dropped as correct (the checker's right answers), by family: "
                      + ", ".join(f"{k} {v}" for k, v in summary["correct_by_family"].items()))
    if summary.get("prompts_m_by_unique") is not None:
        console.print(f"prompts where n_unique - 1 set m (the rule dropped only the most similar candidate): "
                      f"{summary['prompts_m_by_unique']} / {summary['prompts']}")


def _prompts_path(cfg: FilterConfig, embeddings: StageInput) -> Path:
    """--prompts, else the prompts the embeddings were made from (so that they belong together), else
    RUN/prompts."""
    if cfg.prompts:
        return Path(cfg.prompts)
    rel = embeddings.manifest.get("input_paths", {}).get("prompts")
    if rel and (embeddings.path / rel).is_dir():
        return Path(os.path.normpath(embeddings.path / rel))
    return Path(cfg.run, "prompts")


def run(cfg: FilterConfig) -> None:
    if cfg.strategy == "threshold" and cfg.max_sim is None:
        raise UsageError("--strategy threshold needs --max-sim")
    check_kinds(cfg)
    selection.import_faiss()  # before any output is opened: no FAISS, nothing written
    embeddings = open_stage(*stage_input(cfg, "embeddings"))
    samples = open_stage(*stage_input(cfg, "samples"))
    out_dir = output_dir(cfg)
    inputs: dict[str, str | StageInput] = {"embeddings": embeddings, "samples": samples}
    prompt_rows: PromptRows | None = None
    if uses_prompts(cfg):
        prompts_in = open_stage(_prompts_path(cfg, embeddings), "prompts")
        files = prompts_in.shard_files()
        has_task = bool(files) and "task" in pq.read_schema(files[0]).names
        prompt_rows = PromptRows(prompts_in, ["prompt_id", "target"] + (["task"] if has_task else []), samples)
        if cfg.checkers:
            families = prompt_rows.values("task") - {None} if has_task else set()
            if not families:
                raise UsageError(f"{prompts_in.path}: `checkers` needs the prompts' task column, and "
                                 f"{'no prompt has a task' if has_task else 'there is none'} (re-run `negalign "
                                 "prepare` with --task-field), or use --checker for every prompt")
            if missing := sorted(set(cfg.checkers) - families):
                console.print(f"warning: checkers: no prompt has the famil{'y' if len(missing) == 1 else 'ies'} "
                              f"{', '.join(missing)} ({prompts_in.path})")
        inputs["prompts"] = prompts_in

    def shard_prompts(s: int, pids: pa.ChunkedArray | pa.Array) -> dict[str, dict[str, Any]] | None:
        return prompt_rows.for_shard(s, pc.unique(pids).to_pylist()) if prompt_rows is not None else None

    def task_of(prompts: dict[str, dict[str, Any]] | None) -> dict[str, str | None] | None:
        return {pid: p.get("task") for pid, p in prompts.items()} if prompts is not None and cfg.checkers else None

    # check_inputs (in open) refuses embeddings made from other samples, so shard i of each covers the same prompts.
    out = StageOutput.open(out_dir, "filter", _stage_config(cfg), inputs, overwrite=cfg.overwrite)
    num_shards = embeddings.num_shards
    todo = [s for s in range(num_shards) if not out.done(s)]
    t0 = time.time()
    total: dict[str, Any] | None = None   # the summary so far, folded shard by shard: memory stays flat
    with progress() as bar:
        task = bar.add_task(f"filter → {out_dir}", total=num_shards, completed=num_shards - len(todo))
        for s in todo:
            smp = samples.read_shard(s, ["prompt_id", "sample_idx", "text", "finish_reason"])
            prompts = shard_prompts(s, smp.column("prompt_id"))
            stats: dict[str, int] = {}
            result = filter_shard(embeddings.read_shard(s), smp, cfg, str(embeddings.path / shard_name(s)), prompts,
                                  stats)
            capped = stats["capped_by_unique"]
            out.write_shard(s, result, {"rows": result.num_rows, "kept": int(pc.sum(result.column("kept")).as_py()
                                                                              or 0), "capped_by_unique": capped})
            total = _add(total, _partial_summary(result, task_of(prompts), capped))
            bar.advance(task)
    for s in sorted(set(range(num_shards)) - set(todo)):    # shards done by an earlier run: read back
        table = out.read_shard(s)  # verified: hashed once here (`done` hashed it before the run)
        prompts = shard_prompts(s, table.column("prompt_id")) if cfg.checkers else None
        total = _add(total, _partial_summary(table, task_of(prompts),
                                             (out.listed(s) or {}).get("meta", {}).get("capped_by_unique")))
    summary = _combine(total)
    out.finish(num_shards, timings={"filter_s": round(time.time() - t0, 3)}, summary=summary)
    print_summary(summary)
