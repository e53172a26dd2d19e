"""Where the store's time goes on the `filter` data path (issue 20): a synthetic run, then one shard's read and
write taken apart, then the whole `negalign filter` command with the store's share of its time.

A synthetic run of `--prompts` prompts × `--samples` samples (64 prompts per shard, random unit vectors of `--dim`)
is written through the store's own API, with the stage schemas and lineage `filter` checks. Then:
- per shard (median of the shards): read the bytes, sha256, Parquet decode (embeddings, samples), the embedding
  column to a (rows, dim) numpy array, the samples join; and on the write side Parquet encode, sha256, write +
  fsync + rename, the journal line;
- the filter command in this process, with timers around the store's entry points (`open_stage`, shard reads,
  `StageOutput.open`/`write_shard`/`finish`): the store's share of the command's time.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_store.py --prompts 10000 --dim 32 --workdir /tmp/prof
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from negalign import store
from negalign.embed import embed_schema, embeddings_array
from negalign.sample import SAMPLE_SCHEMA
from negalign.store import PROMPTS_SCHEMA, StageOutput, open_stage, shard_name

SHARD = 64


def build(run: Path, prompts: int, samples: int, dim: int, seed: int = 0) -> None:
    """prompts/, samples/, embeddings/ under `run`, shard i of each covering the same 64 prompts."""
    rng = np.random.default_rng(seed)
    shards = -(-prompts // SHARD)
    pids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(prompts)]
    out = StageOutput.open(run / "prompts", "prompts", {"synthetic": prompts}, {"input": "synthetic"})
    for s in range(shards):
        ids = pids[s * SHARD:(s + 1) * SHARD]
        out.write_shard(s, pa.Table.from_pylist([
            {"prompt_id": p, "messages": [{"role": "user", "content": f"question {p[:8]}"}],
             "target": f"answer {p[:8]}", "negatives": None, "task": None} for p in ids], schema=PROMPTS_SCHEMA))
    out.finish(shards)
    p_in = open_stage(run / "prompts", "prompts")
    out = StageOutput.open(run / "samples", "sample", {"synthetic": samples}, {"prompts": p_in})
    for s in range(shards):
        ids = pids[s * SHARD:(s + 1) * SHARD]
        out.write_shard(s, pa.Table.from_pylist([
            {"prompt_id": p, "sample_idx": j, "text": f"answer {rng.integers(0, 12)} to {p[:6]} " * 4,
             "num_tokens": 20, "finish_reason": "stop", "seed": j, "engine": "synthetic", "model": "synthetic"}
            for p in ids for j in range(samples)], schema=SAMPLE_SCHEMA))
    out.finish(shards)
    s_in = open_stage(run / "samples", "sample")
    out = StageOutput.open(run / "embeddings", "embed", {"synthetic": dim}, {"samples": s_in, "prompts": p_in})
    for s in range(shards):
        smp = s_in.read_shard(s, ["prompt_id", "sample_idx", "text"]).to_pylist()
        rows = [(p, -1, "target") for p in pids[s * SHARD:(s + 1) * SHARD]]
        rows += [(r["prompt_id"], r["sample_idx"], "sample") for r in smp]
        vec = rng.standard_normal((len(rows), dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        texts = [r["text"] for r in smp]
        n_targets = len(pids[s * SHARD:(s + 1) * SHARD])
        shas = [hashlib.sha256(f"{p}".encode()).hexdigest() for p, *_ in rows[:n_targets]]
        shas += [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        out.write_shard(s, pa.table({
            "prompt_id": [r[0] for r in rows], "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
            "source": [r[2] for r in rows], "text_sha": shas, "is_empty": [False] * len(rows),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim)}, schema=embed_schema(dim)),
            {"dim": dim})
    out.finish(shards)


def _ms(f, *a, **k):
    t0 = time.perf_counter()
    r = f(*a, **k)
    return r, 1e3 * (time.perf_counter() - t0)


def per_shard(run: Path, shards: int, workdir: Path) -> dict[str, float]:
    """Median ms per shard of each step of a filter shard's read and write."""
    emb_in, smp_in = open_stage(run / "embeddings", "embed"), open_stage(run / "samples", "sample")
    steps: dict[str, list[float]] = defaultdict(list)
    scratch = workdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    out = StageOutput.open(scratch, "toy", {"p": 1})
    for s in range(shards):
        f = emb_in.path / shard_name(s)
        data, t = _ms(f.read_bytes)
        steps["emb: read bytes"].append(t)
        _, t = _ms(hashlib.sha256, data)
        steps["emb: sha256"].append(t)
        table, t = _ms(lambda d=data: pq.ParquetFile(pa.BufferReader(d)).read())
        steps["emb: Parquet decode"].append(t)
        _, t = _ms(embeddings_array, table)
        steps["emb: embedding -> numpy"].append(t)
        _, t = _ms(emb_in.read_shard, s)
        steps["emb: read_shard (all of it)"].append(t)
        smp, t = _ms(smp_in.read_shard, s, ["prompt_id", "sample_idx", "text", "finish_reason"])
        steps["samples: read_shard"].append(t)
        keys = table.select(["prompt_id", "sample_idx"]).append_column("row", pa.array(np.arange(table.num_rows)))
        _, t = _ms(lambda k=keys, m=smp: k.join(m, keys=["prompt_id", "sample_idx"],
                                                 join_type="left outer").sort_by("row"))
        steps["samples join"].append(t)
        result = pa.table({"prompt_id": table.column("prompt_id"), "sample_idx": table.column("sample_idx"),
                           "text_sha": table.column("text_sha"),
                           "sim_to_target": pa.array(np.zeros(table.num_rows, np.float32)),
                           "rank": pa.array(np.zeros(table.num_rows, np.int32)),
                           "kept": pa.array(np.ones(table.num_rows, bool)),
                           "drop_reason": pa.array([None] * table.num_rows, pa.string())})
        blob, t = _ms(store.parquet_bytes, result)
        steps["out: Parquet encode"].append(t)
        _, t = _ms(hashlib.sha256, blob)
        steps["out: sha256"].append(t)
        _, t = _ms(store.atomic_write, scratch / ".x.parquet", lambda tmp, b=blob: tmp.write_bytes(b),
                   sync_dir=False)
        steps["out: write + fsync + rename"].append(t)
        _, t = _ms(out._append_journal, shard_name(s), {"rows": 1, "sha256": "x", "status": "complete"})
        steps["out: journal line (fsync)"].append(t)
        _, t = _ms(out.write_shard, s, result, {"rows": result.num_rows})
        steps["out: write_shard (all of it)"].append(t)
    out.finish(shards)
    return {k: statistics.median(v) for k, v in steps.items()}


def filter_split(run: Path) -> dict[str, float]:
    """Seconds of `negalign filter` in this process, in all and inside the store's entry points."""
    from negalign import filter as filt
    from negalign.cli import app

    spent: dict[str, float] = defaultdict(float)
    depth = [0]

    def timed(name, f):
        def wrapper(*a, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[name] += time.perf_counter() - t0
        return wrapper

    patches = [(store.StageInput, "read_shard"), (store.StageOutput, "write_shard"), (store.StageOutput, "finish"),
               (store.StageOutput, "done"), (store.StageOutput, "shard_entry"), (store.StageOutput, "read_shard"),
               (filt, "open_stage"), (filt.StageOutput, "open")]
    saved = [(o, n, o.__dict__[n]) for o, n in patches]
    for o, n, f in saved:
        wrapped = timed(n, f.__func__ if isinstance(f, classmethod) else f)
        setattr(o, n, classmethod(wrapped) if isinstance(f, classmethod) else wrapped)
    shutil.rmtree(run / "negatives", ignore_errors=True)
    t0 = time.perf_counter()
    try:
        app(["filter", "--run", str(run)], standalone_mode=False)
    finally:
        for o, n, f in saved:
            setattr(o, n, f)
    spent["total"] = time.perf_counter() - t0
    return dict(spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/profile_store"))
    ap.add_argument("--keep", action="store_true", help="reuse a synthetic run built earlier in --workdir")
    ap.add_argument("--split-only", action="store_true", help="only the filter command's split (runs on older code)")
    args = ap.parse_args()
    run = args.workdir / f"run-{args.prompts}x{args.samples}-d{args.dim}"
    if not (args.keep and (run / "embeddings" / store.MANIFEST).exists()):
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        build(run, args.prompts, args.samples, args.dim)
        print(f"built {run} in {time.perf_counter() - t0:.0f} s")
    shards = open_stage(run / "embeddings", "embed").num_shards
    size = os.path.getsize(run / "embeddings" / shard_name(0)) / 1e6
    print(f"\n{args.prompts} prompts × {args.samples} samples, dim {args.dim}, {shards} shards of {SHARD} prompts "
          f"(embeddings shard {size:.2f} MB)\n\n| step (per shard) | ms (median) |\n|---|---:|")
    for k, v in ({} if args.split_only else per_shard(run, min(shards, 40), args.workdir)).items():
        print(f"| {k} | {v:.2f} |")
    split = filter_split(run)
    total = split.pop("total")
    store_s = sum(split.values())
    print(f"\n`negalign filter`: {total:.2f} s, of which in the store {store_s:.2f} s ({100 * store_s / total:.0f} %)")
    print("| store entry point | s | % of filter |\n|---|---:|---:|")
    for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {100 * v / total:.1f} |")


if __name__ == "__main__":
    main()
