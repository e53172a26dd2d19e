"""`pair`: one training group per prompt from the filter's kept negatives (SPEC §1.1 step 4, §5).

Rows (stage "pair"):

- `prompt_id`, `messages`;
- `chosen`: the SFT target (null for a D2O prompt, which has only given negatives);
- `rejected`: the texts of ALL kept candidates in a seeded random order (a permutation from a numpy Generator seeded
  by sha256(seed, prompt_id), `selection.draw_negatives`), cut to `--max-negatives`; `train --num-negatives K`
  takes the first K, so K = 1, 2, 4, 8, 16 are nested subsets of this one artifact;
- `rejected_sim` (cosine to the target) and `rejected_idx` (`sample_idx` in RUN/samples), same order;
- `num_kept`: kept candidates before the cut;
- `anchors`: D2O self-samples — for prompts with given negatives and no target, the unique non-empty samples in
  `sample_idx` order, minus those the filter dropped as empty, truncated, duplicate, near_negative or
  near_duplicate; empty otherwise;
- `negatives`: the given negatives from RUN/prompts (empty list when none);
- `y_ref`: the greedy sample from RUN/greedy when it exists (SELM), else null.

Skipped prompts, counted by reason: `no_target` (neither target nor given negatives), `no_negatives` (a target but
no kept candidate and no given negative). Output shard i covers the prompts of samples shard i (like `embed`),
so the stage resumes by shard. `--export-trl FILE` also writes TRL's conversational preference format, one row per
(chosen, rejected) pair, once the output is complete.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from negalign.config import PairConfig
from negalign.console import console, progress
from negalign.errors import NegalignError, UsageError
from negalign.schemas import PAIR_SCHEMA, TRL_SCHEMA
from negalign.selection import draw_negatives, take_first_k
from negalign.stages import output_dir, stage_input
from negalign.store import (
    PromptRows,
    StageInput,
    StageOutput,
    my_shards,
    open_optional_stage,
    open_stage,
    write_parquet,
)

SKIP_REASONS = ("no_target", "no_negatives")
K_LADDER = (1, 2, 4, 8, 16)  # the paper's ablation: how many groups each train --num-negatives K can use
# Filter drops that also disqualify a D2O self-sample (others, e.g. "near_target", mean nothing without a target).
ANCHOR_DROPS = ("empty", "truncated", "duplicate", "near_negative", "near_duplicate")



CANDIDATE_COLUMNS = ["prompt_id", "sample_idx", "sim_to_target", "kept", "drop_reason"]


def _candidates_by_prompt(table: pa.Table) -> dict[str, list[tuple[int, float, bool, str | None]]]:
    """One filter shard's candidate rows, {prompt_id: [(sample_idx, sim_to_target, kept, drop_reason)]} in sample
    order. Rows for targets or given negatives (sample_idx < 0, if a filter writes any) are left out."""
    cols = table.to_pydict()
    out: dict[str, list[tuple[int, float, bool, str | None]]] = {}
    for pid, idx, sim, kept, reason in zip(cols["prompt_id"], cols["sample_idx"], cols["sim_to_target"],
                                           cols["kept"], cols["drop_reason"], strict=True):
        if idx >= 0:
            out.setdefault(pid, []).append((idx, math.nan if sim is None else float(sim), bool(kept), reason))
    for rows in out.values():
        rows.sort(key=lambda r: r[0])
    return out


def build_group(pid: str, prompt: dict[str, Any], texts: dict[int, str],
                candidates: list[tuple[int, float, bool, str | None]], y_ref: str | None, *, seed: int,
                max_negatives: int) -> tuple[dict[str, Any] | None, str | None]:
    """One prompt's training group, or (None, skip reason)."""
    target, given = prompt["target"], list(prompt["negatives"] or [])
    if target is None and not given:
        return None, "no_target"
    rejected_idx: list[int] = []
    sims: dict[int, float] = {}
    anchors: list[str] = []
    num_kept = 0
    if target is not None:
        kept = [idx for idx, _, k, _ in candidates if k]
        sims = {idx: sim for idx, sim, _, _ in candidates}
        num_kept = len(kept)
        rejected_idx = draw_negatives(kept, None, seed, pid)[:max_negatives]
        if not rejected_idx and not given:
            return None, "no_negatives"
    else:
        dropped = {idx for idx, _, _, reason in candidates if reason in ANCHOR_DROPS}
        seen: set[str] = set()
        for idx in sorted(texts):
            text = texts[idx]
            if idx in dropped or not text.strip() or text in seen:
                continue
            seen.add(text)
            anchors.append(text)
    missing = [i for i in rejected_idx if i not in texts]
    if missing:
        raise NegalignError(f"prompt {pid[:12]}…: the filter kept sample_idx {missing[0]}, which is not in the "
                            "samples; the filter output was made from other samples — re-run embed and filter")
    group = {"prompt_id": pid, "messages": prompt["messages"], "chosen": target,
             "rejected": [texts[i] for i in rejected_idx], "rejected_sim": [sims[i] for i in rejected_idx],
             "rejected_idx": rejected_idx, "num_kept": num_kept, "anchors": anchors, "negatives": given,
             "y_ref": y_ref}
    return group, None


def trl_rows(pairs: pa.Table) -> pa.Table:
    """TRL's conversational preference format: one row per (chosen, rejected) of every group with a target."""
    prompt, chosen, rejected = [], [], []
    for g in pairs.select(["messages", "chosen", "rejected"]).to_pylist():
        if g["chosen"] is None:
            continue
        for r in g["rejected"]:
            prompt.append(g["messages"])
            chosen.append([{"role": "assistant", "content": g["chosen"]}])
            rejected.append([{"role": "assistant", "content": r}])
    return pa.table({"prompt": prompt, "chosen": chosen, "rejected": rejected}, schema=TRL_SCHEMA)


def _summary(metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The output's summary from every shard's meta (all workers' shards: read from the folded manifest), added up
    a shard at a time."""
    summary: dict[str, Any] = {"groups": 0, "pairs": 0, "d2o_groups": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0),
                               "groups_with_k": {str(k): 0 for k in K_LADDER}}
    for m in metas:
        for key in ("groups", "pairs", "d2o_groups"):
            summary[key] += m.get(key, 0)
        for part in ("skipped", "groups_with_k"):
            for key in summary[part]:
                summary[part][key] += m.get(part, {}).get(key, 0)
    with_target = summary["groups"] - summary["d2o_groups"]
    summary["mean_negatives_per_group"] = round(summary["pairs"] / with_target, 3) if with_target else 0.0
    return summary


GREEDY_COLUMNS = ["prompt_id", "sample_idx", "text"]


def _y_refs(greedy: pa.Table) -> dict[str, str]:
    """{prompt_id: greedy text}; of several greedy samples of a prompt, the lowest sample_idx wins."""
    y_refs: dict[str, str] = {}
    for r in sorted(greedy.to_pylist(), key=lambda r: -r["sample_idx"]):
        y_refs[r["prompt_id"]] = r["text"] or ""
    return y_refs


def _same_layout(greedy: StageInput, samples: StageInput) -> bool:
    """Whether greedy shard s covers the prompts of samples shard s: both sampled from the same prompts with the
    same shard size (`sample --greedy` in one run). Then pair reads one greedy shard per samples shard, not all."""
    prompts, size = samples.inputs.get("prompts"), samples.config.get("shard_size")
    return (prompts is not None and size is not None and greedy.inputs.get("prompts") == prompts
            and greedy.config.get("shard_size") == size and greedy.num_shards == samples.num_shards)


def run(cfg: PairConfig) -> None:
    negatives = open_stage(*stage_input(cfg, "negatives"))
    samples = open_stage(*stage_input(cfg, "samples"))
    prompts_in = open_stage(*stage_input(cfg, "prompts"))
    greedy_in = open_optional_stage(*stage_input(cfg, "greedy_dir"))
    out_dir = output_dir(cfg)

    inputs: dict[str, str | StageInput] = {"negatives": negatives, "samples": samples, "prompts": prompts_in}
    if greedy_in is not None:
        inputs["greedy"] = greedy_in
    # export_trl is a side output, not part of what the pairs depend on. The policy that sampled the negatives is
    # recorded for `train` (it is already part of the inputs' lineage).
    policy = {k: samples.config.get(k) for k in ("model", "model_fingerprint", "chat_template_hash")}
    # check_inputs (in open) refuses negatives made from other samples: shard i of both covers the same prompts.
    out = StageOutput.open(out_dir, "pair", {"max_negatives": cfg.max_negatives, "seed": cfg.seed}, inputs,
                           overwrite=cfg.overwrite, info={"policy": policy})
    num_shards = samples.num_shards
    if negatives.num_shards != num_shards:
        raise UsageError(f"{negatives.path} has {negatives.num_shards} shards and {samples.path} {num_shards}: the "
                         "filter output was not made from these samples; re-run embed and filter with --overwrite")
    plan = [s for s in my_shards(num_shards, cfg.shard_index, cfg.num_shards) if not out.done(s)]
    t0 = time.time()
    if plan:
        prompt_rows = PromptRows(prompts_in, ["prompt_id", "messages", "target", "negatives"], samples)
        greedy_aligned = greedy_in is not None and _same_layout(greedy_in, samples)
        y_refs = _y_refs(greedy_in.read(GREEDY_COLUMNS)) if greedy_in is not None and not greedy_aligned else {}
        with progress() as bar:
            task = bar.add_task(f"pair → {out_dir}", total=len(plan))
            for s in plan:
                if greedy_aligned:
                    y_refs = _y_refs(greedy_in.read_shard(s, GREEDY_COLUMNS))
                rows = samples.read_shard(s, ["prompt_id", "sample_idx", "text"])
                candidates = _candidates_by_prompt(negatives.read_shard(s, CANDIDATE_COLUMNS))
                texts: dict[str, dict[int, str]] = {}
                for pid, idx, text in zip(rows.column("prompt_id").to_pylist(),
                                          rows.column("sample_idx").to_pylist(), rows.column("text").to_pylist(),
                                          strict=True):
                    texts.setdefault(pid, {})[idx] = text or ""
                prompts = prompt_rows.for_shard(s, list(texts))
                groups, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
                for pid, by_idx in texts.items():
                    if pid not in prompts:
                        raise UsageError(f"prompt {pid[:12]}… is in the samples but not in the prompts")
                    group, reason = build_group(pid, prompts[pid], by_idx, candidates.get(pid, []), y_refs.get(pid),
                                                seed=cfg.seed, max_negatives=cfg.max_negatives)
                    if group is None:
                        skipped[reason] += 1
                    else:
                        groups.append(group)
                table = pa.Table.from_pylist(groups, schema=PAIR_SCHEMA)
                n_pairs = sum(len(g["rejected"]) for g in groups)
                n_d2o = sum(g["chosen"] is None for g in groups)
                rejected = [g["rejected"] for g in groups if g["chosen"] is not None]
                usable = {str(k): len(take_first_k(rejected, k)[0]) for k in K_LADDER}
                out.write_shard(s, table, {"groups": len(groups), "pairs": n_pairs, "d2o_groups": n_d2o,
                                           "skipped": skipped, "groups_with_k": usable})
                bar.advance(task)
    summary = _summary(e["meta"] for e in out.manifest()["shards"].values())
    complete = out.finish(num_shards, timings={"pair_s": round(time.time() - t0, 2)}, summary=summary)

    exported = ""
    if cfg.export_trl:
        if complete:
            trl = trl_rows(open_stage(out_dir, "pair").read())
            dest = Path(cfg.export_trl)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(dest, trl)
            exported = f"; TRL export: {trl.num_rows} pairs -> {dest}"
        else:
            exported = "; TRL export waits until all workers finish (re-run pair with --export-trl then)"
    skipped_text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["skipped"].items())
    mine = len(my_shards(num_shards, cfg.shard_index, cfg.num_shards))
    console.print(
        f"pair: {summary['groups']} groups ({summary['d2o_groups']} D2O), {summary['pairs']} pairs, "
        f"{summary['mean_negatives_per_group']:.2f} negatives per group; skipped: {skipped_text}; "
        f"groups usable at train --num-negatives K: "
        + ", ".join(f"K={k} {n}" for k, n in summary["groups_with_k"].items())
        + f"; shards: {len(plan)} written, {mine - len(plan)} already done"
        + exported
        + ("" if complete else f" ({out_dir} completes when all workers finish)"))
