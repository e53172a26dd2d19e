"""Benchmark of the `negalign filter` COMMAND end to end, against the same command with the reference rule.

    .venv/bin/python benchmarks/bench_filter.py [--prompts 100000] [--candidates 32] [--shard-prompts 64]
                                                [--dim 384] [--workdir DIR] [--results FILE]

The input is synthetic: a samples stage and an embeddings stage written through the store (`StageOutput`) with
`--shard-prompts` prompts per shard (64 = `sample`'s default `--shard-size`; `embed` keeps the samples' shards).
Embeddings are random unit vectors correlated with their prompt's target, ~10 % exact duplicates (same text and
vector as an earlier sample), ~1 % empty texts, ~5 % truncated; one target row per prompt. Then, each in its
own subprocess, on the same run directory, one after the other:

- negalign: `negalign filter --run R --no-drop-same-as-target` (the rule alone, as before that drop existed);
- reference: the same command with `selection.cosine_to_target` and `selection.select` replaced by the plain
  per-prompt loops of the paper's code (numpy dot per prompt; dict dedup and stable argsort per prompt);
- default: `negalign filter --run R` as shipped (also reads RUN/prompts for the targets' text and drops the
  copies of the target, `same_as_target`);
- checkers: the default plus `checkers: {fam0: number, fam1: exact, fam2: contains, fam3: none}` (YAML), the
  prompts' task families cycling through fam0..fam3; ~5 % of the answers are the target's text (a number).

Time is accounted per part by wrapping functions: shard reads (`StageInput.read_shard`: sha256 + Parquet),
`filter_shard` (of which similarity and selection), shard writes (`StageOutput.write_shard`: Parquet, fsync,
manifest), output read-back and summary. Wall time, CPU time and peak RSS (VmHWM) are per command, Python start
and imports included. `--workdir` keeps the built input for a rerun (building 100k x 32 takes ~12 min here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from negalign.config import PrepareConfig  # noqa: E402
from negalign.embed import embed_schema, text_sha  # noqa: E402
from negalign.sample import SAMPLE_SCHEMA  # noqa: E402
from negalign.store import PROMPTS_SCHEMA, StageOutput, open_stage  # noqa: E402

PREPARE_SHARD = PrepareConfig.__dataclass_fields__["shard_size"].default  # prompts per shard, as `prepare` writes
CHECKERS_YAML = "checkers: {fam0: number, fam1: exact, fam2: contains, fam3: none}\n"
SIDES = ("negalign", "reference", "default", "checkers")

# Run inside the command's process: swap in the reference rule and/or account time per part.
PRELUDE = r'''
import atexit, json, os, sys, time
import numpy as np
from negalign import filter as F, selection, store
parts = {}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
    return wrapper
if os.environ.get("BENCH_SIDE") == "reference":
    def cosine_to_target(cand, target, group, **kw):
        sim = np.empty(len(group), dtype=np.float32)
        order = np.argsort(group, kind="stable")
        for g, rows in enumerate(np.split(order, np.cumsum(np.bincount(group, minlength=len(target)))[:-1])):
            sim[rows] = cand[rows] @ target[g]
        return sim
    def select(strategy, c, keep_fraction=0.75, drop_truncated=False, near_dup_sim=None, max_neg_sim=None, **kw):
        """The paper's lastdedup-p, written plainly: dict dedup in sample order, stable argsort of the sims."""
        assert strategy == "self-contrast" and near_dup_sim is None and max_neg_sim is None
        code = np.zeros(len(c), dtype=np.int8)
        rank = np.full(len(c), -1, dtype=np.int32)
        hashes, empty = c.text_hash.tolist(), c.is_empty.tolist()
        truncated = c.is_truncated.tolist() if drop_truncated and c.is_truncated is not None else None
        by_group = np.argsort(c.group, kind="stable")
        for g, rows in enumerate(np.split(by_group, np.cumsum(np.bincount(c.group, minlength=c.num_groups))[:-1])):
            rows = rows[np.argsort(c.sample_idx[rows], kind="stable")]
            seen, unique = set(), []
            for r in rows.tolist():
                if empty[r]:
                    code[r] = selection.EMPTY
                elif truncated is not None and truncated[r]:
                    code[r] = selection.TRUNCATED
                elif hashes[r] in seen:
                    code[r] = selection.DUPLICATE
                else:
                    seen.add(hashes[r])
                    unique.append(r)
            if unique:
                order = np.asarray(unique)[np.argsort(c.sim[unique], kind="stable")]
                rank[order] = np.arange(len(order))
                m = max(0, min(int(int(c.num_samples[g]) * keep_fraction), len(unique) - 1))
                code[order[m:]] = selection.NEAR_TARGET
        return selection.Selection(kept=code == selection.KEPT, rank=rank, reason_code=code)
    selection.cosine_to_target, selection.select = cosine_to_target, select
def report():
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("BENCH_PROC " + json.dumps({"peak_rss_mib": hwm / 1024, "cpu_s": time.process_time()}), file=sys.stderr)
atexit.register(report)
if os.environ.get("BENCH_PARTS"):
    selection.cosine_to_target = timed("similarity", selection.cosine_to_target)
    selection.select = timed("selection", selection.select)
    F.filter_shard = timed("filter_shard", F.filter_shard)
    F.summarise = timed("summary", F.summarise)
    store.StageInput.read_shard = timed("read_shard", store.StageInput.read_shard)
    store.StageOutput.write_shard = timed("write_shard", store.StageOutput.write_shard)
    store.StageOutput.read_shard = timed("read_output", store.StageOutput.read_shard)
    store.StageOutput.finish = timed("finish", store.StageOutput.finish)   # the last shard's write, the fold
    atexit.register(lambda: print("BENCH_PARTS " + json.dumps(parts), file=sys.stderr))
from negalign.cli import app
app(sys.argv[1:], prog_name="negalign")
'''


def build_run(run: Path, prompts: int, n: int, shard_prompts: int, dim: int, seed: int) -> dict:
    """samples + embeddings stages of `prompts` prompts x `n` samples, `shard_prompts` prompts per shard."""
    t0 = time.perf_counter()
    num_shards = -(-prompts // shard_prompts)

    def prompts_of(s: int) -> tuple[list[str], list[str]]:
        p = min(shard_prompts, prompts - s * shard_prompts)
        pids = sorted(hashlib.sha256(f"prompt {s * shard_prompts + i}".encode()).hexdigest() for i in range(p))
        return pids, [str(int(x)) for x in np.random.default_rng([seed, s, 1]).integers(0, 1000, p)]

    # The prompts first, in prepare's shards of 10,000; the samples record them as their input, with sample's
    # `shard_size`, as `negalign sample` does: filter and pair then read the prompts a shard at a time.
    out = StageOutput.open(run / "prompts", "prompts", {"synthetic": seed}, {})
    buffered: list[pa.Table] = []
    written = 0
    for s in range(num_shards):
        pids, targets = prompts_of(s)
        buffered.append(pa.table({
            "prompt_id": pa.array(pids, pa.string()),
            "messages": pa.array([[{"role": "user", "content": f"question {i}"}] for i in pids],
                                 PROMPTS_SCHEMA.field("messages").type),
            "target": pa.array(targets, pa.string()), "negatives": pa.array([None] * len(pids), pa.list_(pa.string())),
            "task": pa.array([f"fam{(s * shard_prompts + i) % 4}" for i in range(len(pids))], pa.string())},
            schema=PROMPTS_SCHEMA))
        if sum(t.num_rows for t in buffered) >= PREPARE_SHARD or s == num_shards - 1:
            out.write_shard(written, pa.concat_tables(buffered))
            buffered, written = [], written + 1
    assert out.finish(written)
    prompts_in = open_stage(run / "prompts", "prompts")
    samples = StageOutput.open(run / "samples", "sample", {"synthetic": seed, "shard_size": shard_prompts},
                               {"prompts": prompts_in}, info={"num_samples": n})
    embeds = StageOutput.open(run / "embeddings", "embed", {"synthetic": seed, "dim": dim}, {}, info={"dim": dim})
    schema = embed_schema(dim)
    for s in range(num_shards):
        rng = np.random.default_rng([seed, s])
        pids, targets = prompts_of(s)
        p = len(pids)
        m = p * n
        sample_idx = np.tile(np.arange(n), p)
        texts = np.array([f"answer {s}-{j}" for j in range(m)], dtype=object)
        dup = np.flatnonzero((rng.random(m) < 0.1) & (sample_idx > 0))
        src = dup - 1 - (rng.random(len(dup)) * sample_idx[dup]).astype(np.int64)
        texts[dup] = texts[src]
        copy = rng.random(m) < 0.05                                   # the target's own text: right answers
        texts[copy] = np.repeat(np.array(targets, dtype=object), n)[copy]
        texts[rng.random(m) < 0.01] = ""
        finish = np.where(rng.random(m) < 0.05, "length", "stop")
        target = rng.standard_normal((p, dim), dtype=np.float32)
        target /= np.linalg.norm(target, axis=1, keepdims=True)
        cand = rng.standard_normal((m, dim), dtype=np.float32) * rng.uniform(0.02, 0.12, (m, 1)).astype(np.float32)
        cand += np.repeat(target, n, axis=0)
        cand /= np.linalg.norm(cand, axis=1, keepdims=True)
        cand[dup] = cand[src]
        pid_rows = np.repeat(np.array(pids, dtype=object), n)
        samples.write_shard(s, pa.table({
            "prompt_id": pa.array(pid_rows, pa.string()), "sample_idx": pa.array(sample_idx, pa.int32()),
            "text": pa.array(texts, pa.string()), "num_tokens": pa.array(np.full(m, 7), pa.int32()),
            "finish_reason": pa.array(finish, pa.string()), "seed": pa.array(np.arange(m), pa.int64()),
            "engine": pa.array(["hf"] * m, pa.string()), "model": pa.array(["synthetic"] * m, pa.string())},
            schema=SAMPLE_SCHEMA))
        shas = [text_sha(t) for t in texts]
        vectors = np.concatenate([target, cand])
        embeds.write_shard(s, pa.table({
            "prompt_id": pa.array(list(pids) + list(pid_rows), pa.string()),
            "sample_idx": pa.array(np.concatenate([np.full(p, -1), sample_idx]), pa.int32()),
            "source": pa.array(["target"] * p + ["sample"] * m, pa.string()),
            "text_sha": pa.array([text_sha(f"target {i}") for i in pids] + shas, pa.string()),
            "is_empty": pa.array([False] * p + [not t for t in texts], pa.bool_()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)},
            schema=schema))
    assert samples.finish(num_shards) and embeds.finish(num_shards)
    size = sum(f.stat().st_size for f in (run / "embeddings").glob("*.parquet"))
    return {"shards": num_shards, "build_s": time.perf_counter() - t0, "embeddings_gib": size / 2**30}


def run_command(side: str, run: Path, out: str, parts: bool) -> dict:
    env = {**os.environ, "BENCH_SIDE": side, "HF_HUB_OFFLINE": "1"}
    if parts:
        env["BENCH_PARTS"] = "1"
    cmd = [sys.executable, "-c", PRELUDE, "filter", "--run", str(run), "--out", str(run / out)]
    if side in ("negalign", "reference"):
        cmd.append("--no-drop-same-as-target")
    if side == "checkers":
        (run / "checkers.yaml").write_text(CHECKERS_YAML)
        cmd += ["-c", str(run / "checkers.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = {"side": side, "wall_s": wall}
    for line in proc.stderr.splitlines():
        if line.startswith("BENCH_PARTS "):
            result["parts"] = json.loads(line[len("BENCH_PARTS "):])
        if line.startswith("BENCH_PROC "):
            result.update(json.loads(line[len("BENCH_PROC "):]))
    return result


PARTS = ("read_shard", "filter_shard", "similarity", "selection", "write_shard", "read_output")


def markdown(results: dict, built: dict, args: argparse.Namespace, differ: int, rows: int) -> str:
    head = ("| command | wall s | CPU s | peak RSS MiB | " + " | ".join(p.replace("_", " ") for p in PARTS) + " |")
    lines = [head, "|---" * (4 + len(PARTS)) + "|"]
    for side, r in results.items():
        parts = r.get("parts", {})
        lines.append(f"| {side} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,.0f} | "
                     + " | ".join(f"{parts.get(p, 0.0):.1f}" for p in PARTS) + " |")
    a, b, d, c = (results[s] for s in SIDES)
    cmd = "    .venv/bin/python benchmarks/bench_filter.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## filter", "",
        "`negalign filter` end to end (the command, subprocess, Python start included) on a synthetic run written "
        "through the store, against the same command with the paper's plain per-prompt loops for the similarity "
        "(numpy dot per prompt) and the rule (dict dedup, stable argsort). Each side in its own process, one after "
        "the other, in one run; parts are wall seconds inside the command (`filter shard` includes similarity and "
        "selection; `read shard` = `StageInput.read_shard`, sha256 + Parquet, embeddings and samples; `write shard` "
        "= `StageOutput.write_shard`, Parquet + fsync + manifest).", "",
        f"{args.prompts:,} prompts x {args.candidates} candidates, dim {args.dim}, {built['shards']} shards of "
        f"{args.shard_prompts} prompts ({built['embeddings_gib']:.1f} GiB of embeddings). Machine: "
        f"{os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.",
        "", cmd, "", *lines, "",
        f"- wall: reference / negalign = {b['wall_s'] / a['wall_s']:.2f}; similarity + selection: negalign "
        f"{a['parts']['similarity'] + a['parts']['selection']:.1f} s "
        f"({(a['parts']['similarity'] + a['parts']['selection']) / a['wall_s']:.1%} of its wall time), reference "
        f"{b['parts']['similarity'] + b['parts']['selection']:.1f} s.",
        f"- store I/O (shard reads + writes + read-back): negalign "
        f"{sum(a['parts'].get(p, 0) for p in ('read_shard', 'write_shard', 'read_output')) / a['wall_s']:.0%} of "
        "its wall time.",
        f"- kept flags that differ between negalign and reference: {differ} of {rows:,}.",
        f"- default / negalign (reading the prompts, the copy check) = {d['wall_s'] / a['wall_s']:.2f}; "
        f"checkers / default = {c['wall_s'] / d['wall_s']:.2f} (wall); filter shard {d['parts']['filter_shard']:.1f}"
        f" s (default) vs {c['parts']['filter_shard']:.1f} s (checkers).",
        f"- checkers side: {c.get('by_reason', {})}; correct by family {c.get('correct_by_family', {})}.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--shard-prompts", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the synthetic run here (default: a temporary folder)")
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bench_filter_")
    run = (args.workdir or Path(tmp)) / "run"
    try:
        if (run / "embeddings").exists() and not (run / "prompts").exists():
            shutil.rmtree(run)                                       # made before the prompts were part of it
        if (run / "embeddings").exists():
            built = {"shards": len(list((run / "embeddings").glob("*.parquet"))), "build_s": float("nan"),
                     "embeddings_gib": sum(f.stat().st_size for f in (run / "embeddings").glob("*.parquet")) / 2**30}
        else:
            built = build_run(run, args.prompts, args.candidates, args.shard_prompts, args.dim, args.seed)
        print(f"input: {built}", flush=True)
        results = {}
        for side in SIDES:
            out = f"neg_{side}"
            shutil.rmtree(run / out, ignore_errors=True)
            results[side] = run_command(side, run, out, parts=True)
            summary = open_stage(run / out, "filter").manifest["summary"]
            results[side].update({k: summary[k] for k in ("by_reason", "correct_by_family") if k in summary})
            print(json.dumps(results[side]), flush=True)
        kept = {side: open_stage(run / f"neg_{side}", "filter").read(["kept"]).column("kept").to_numpy(
            zero_copy_only=False) for side in ("negalign", "reference")}
        differ = int((kept["negalign"] != kept["reference"]).sum())
        print({"kept_differ": differ, "rows": len(kept["negalign"])})
        table = markdown(results, built, args, differ, len(kept["negalign"]))
        print(table)
        if args.results:
            args.results.write_text(table)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
