"""Benchmark of the ``filter`` core: negalign (FAISS similarity + vectorised selection) vs the reference.

    .venv/bin/python benchmarks/bench_filter.py [--prompts 10000 100000] [--candidates 32] [--dim 384]
                                                 [--results benchmarks/RESULTS_filter.md]

Synthetic L2-normalised embeddings (candidates correlated with their prompt's target), ~10 % exact
duplicates (same text hash and embedding as an earlier sample), ~1 % empties; rows in (prompt, sample) order
as the sample stage writes them. Each side runs in its own subprocess (peaks do not mix) on the same data
regenerated from the seed; the peak-RSS mark is reset after the data is built (/proc/self/clear_refs), so the
peak is that of the timed part (input included). The reference worker also runs the reference rule on
negalign's similarities and checks it gives negalign's kept set, ranks and reasons exactly ("same result");
end to end, the two similarity codes differ by float rounding, so near-tied candidates may swap. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negalign.selection import (  # noqa: E402
    Candidates,
    cosine_to_target,
    reference_self_contrast,
    select_self_contrast,
)


def make_data(prompts: int, n: int, dim: int, seed: int, dup_rate: float = 0.1, empty_rate: float = 0.01):
    """Deterministic synthetic filter input, generated in chunks so generation adds little to peak RSS."""
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((prompts, dim), dtype=np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    m = prompts * n
    group = np.repeat(np.arange(prompts, dtype=np.int64), n)
    sample_idx = np.tile(np.arange(n, dtype=np.int64), prompts)
    text_hash = rng.integers(0, 2**63, size=m, dtype=np.uint64)
    cand = np.empty((m, dim), dtype=np.float32)
    chunk = max(1, (1 << 22) // (n * dim))                       # ~16 MiB of noise at a time
    for s in range(0, prompts, chunk):
        e = min(s + chunk, prompts)
        block = rng.standard_normal(((e - s) * n, dim), dtype=np.float32)
        block *= rng.uniform(0.02, 0.12, size=((e - s) * n, 1)).astype(np.float32)   # spread of similarities
        block += np.repeat(target[s:e], n, axis=0)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        cand[s * n:e * n] = block
    # duplicates: sample j copies the text and embedding of an earlier sample of the same prompt
    dup = np.flatnonzero((rng.random(m) < dup_rate) & (sample_idx > 0))
    src = dup - 1 - (rng.random(len(dup)) * sample_idx[dup]).astype(np.int64)
    text_hash[dup] = text_hash[src]
    cand[dup] = cand[src]
    is_empty = rng.random(m) < empty_rate
    return cand, target, group, sample_idx, text_hash, is_empty


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that data generation does not count; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def negalign_side(cand, target, group, sample_idx, text_hash, is_empty, num_samples, p):
    """negalign: one FAISS pass for all similarities, then the vectorised selection."""
    t0 = time.perf_counter()
    sim = cosine_to_target(cand, target, group)
    t1 = time.perf_counter()
    c = Candidates(group=group, sample_idx=sample_idx, text_hash=text_hash, is_empty=is_empty, sim=sim,
                   num_samples=num_samples)
    return sim, select_self_contrast(c, p), t1 - t0, time.perf_counter() - t1


def reference_side(cand, target, group, sample_idx, text_hash, is_empty, num_samples, p):
    """The reference way: similarity prompt by prompt with numpy, then the per-prompt rule."""
    t0 = time.perf_counter()
    sim = np.empty(len(group), dtype=np.float32)
    order = np.argsort(group, kind="stable")
    for g, rows in enumerate(np.split(order, np.cumsum(np.bincount(group, minlength=len(target)))[:-1])):
        sim[rows] = cand[rows] @ target[g]
    t1 = time.perf_counter()
    c = Candidates(group=group, sample_idx=sample_idx, text_hash=text_hash, is_empty=is_empty, sim=sim,
                   num_samples=num_samples)
    return sim, reference_self_contrast(c, p), t1 - t0, time.perf_counter() - t1


def worker(args: argparse.Namespace) -> None:
    prompts = args.prompts[0]
    data = make_data(prompts, args.candidates, args.dim, args.seed)
    if args.order[0] == "shuffled":                                  # same permutation on both sides
        perm = np.random.default_rng(args.seed + 1).permutation(len(data[2]))
        data = (data[0][perm], data[1], *(a[perm] for a in data[2:]))
    num_samples = np.full(prompts, args.candidates, dtype=np.int64)
    side = negalign_side if args.worker == "negalign" else reference_side
    reset_peak_rss()
    rss_input = _status_mib("VmRSS")
    runs = []
    for _ in range(args.repeat):                                     # best of N (the first one is cold)
        cpu0 = time.process_time()
        sim, sel, sim_s, select_s = side(*data, num_samples, args.keep_fraction)
        runs.append((sim_s + select_s, sim_s, select_s, time.process_time() - cpu0))
    peak = peak_rss_mib()
    tracemalloc.start()                                              # untimed pass: Python/numpy allocations
    side(*data, num_samples, args.keep_fraction)
    alloc_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    total_s, sim_s, select_s, cpu_s = min(runs)
    np.savez(args.out, kept=sel.kept, rank=sel.rank, code=sel.reason_code, sim=sim)
    same = None
    if args.check:                  # the reference rule on negalign's sims must give negalign's result
        other = np.load(args.check)
        c = Candidates(group=data[2], sample_idx=data[3], text_hash=data[4], is_empty=data[5],
                       sim=other["sim"], num_samples=num_samples)
        ref = reference_self_contrast(c, args.keep_fraction)
        same = all(np.array_equal(x, other[k]) for x, k in
                   ((ref.kept, "kept"), (ref.rank, "rank"), (ref.reason_code, "code")))
    print(json.dumps({"same_on_same_sims": same, "rows": len(data[2]), "sim_s": sim_s, "select_s": select_s,
                      "total_s": total_s, "cpu_s": cpu_s,
                      "cold_total_s": runs[0][0], "peak_rss_mib": peak, "rss_input_mib": rss_input,
                      "alloc_peak_mib": alloc_peak, "kept": int(sel.kept.sum()),
                      "reasons": sel.reason_counts()}))


def run_side(side: str, prompts: int, order: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--prompts", str(prompts), "--order", order,
           "--candidates",
           str(args.candidates), "--dim", str(args.dim), "--seed", str(args.seed),
           "--keep-fraction", str(args.keep_fraction), "--repeat", str(args.repeat), "--out", str(out)]
    if side == "reference":
        cmd += ["--check", str(out.with_name("negalign.npz"))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--order", nargs="+", choices=["sorted", "shuffled"], default=["sorted"],
                    help="row order of the input: (prompt, sample) order as written by `sample`, or shuffled")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-fraction", type=float, default=0.75)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side; the best is reported")
    ap.add_argument("--results", type=Path, help="write the table as '## filter' into this Markdown file")
    ap.add_argument("--worker", choices=["negalign", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--check", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    rows_md = ["| prompts × candidates | implementation | similarity s | selection s | total s | rows/s "
               "| CPU s | cold total s | peak RSS MiB | RSS above input MiB | tracemalloc peak MiB "
               "| same result |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ratios = []
    for prompts, order in [(p, o) for p in args.prompts for o in args.order]:
        label = f"{prompts:,} × {args.candidates}" + (", rows shuffled" if order == "shuffled" else "")
        data_mib = prompts * args.candidates * (args.dim * 4 + 30) / 2**20
        if 2.5 * data_mib > available_mib():
            print(f"skip {prompts} prompts: needs ~{2.5 * data_mib:.0f} MiB, {available_mib():.0f} available")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = {side: run_side(side, prompts, order, args, Path(tmp) / f"{side}.npz")
                   for side in ("negalign", "reference")}
            a, b = (np.load(Path(tmp) / f"{side}.npz") for side in ("negalign", "reference"))
            same = bool(res["reference"]["same_on_same_sims"])
            kept_diff = int((a["kept"] != b["kept"]).sum())        # from float rounding of the two sims
            max_sim_diff = float(np.abs(a["sim"] - b["sim"]).max())
        ratio = res["reference"]["total_s"] / res["negalign"]["total_s"]
        sel_ratio = res["reference"]["select_s"] / res["negalign"]["select_s"]
        sim_ratio = res["reference"]["sim_s"] / res["negalign"]["sim_s"]
        cpu_ratio = res["reference"]["cpu_s"] / res["negalign"]["cpu_s"]
        ratios.append((label, ratio, sel_ratio, sim_ratio, cpu_ratio, same, kept_diff, max_sim_diff,
                       res["negalign"]["reasons"]))
        for side, r in res.items():
            rows_md.append(
                f"| {label} | {side} | {r['sim_s']:.3f} | {r['select_s']:.3f} "
                f"| {r['total_s']:.3f} | {r['rows'] / r['total_s']:,.0f} | {r['cpu_s']:.3f} "
                f"| {r['cold_total_s']:.3f} "
                f"| {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - r['rss_input_mib']:,.0f} "
                f"| {r['alloc_peak_mib']:,.1f} | {'yes' if same else 'NO'} |")
        print(rows_md[-2] + "\n" + rows_md[-1], flush=True)
    lines = rows_md + [""]
    for label, ratio, sel_ratio, sim_ratio, cpu_ratio, same, kept_diff, sim_diff, reasons in ratios:
        lines.append(f"- {label}: negalign is **{ratio:.1f}×** the reference's "
                     f"rows/s end to end (similarity {sim_ratio:.1f}×, selection **{sel_ratio:.1f}×**; "
                     f"{cpu_ratio:.1f}× less CPU time). "
                     f"Same similarities in, same kept set, ranks and reasons out: {same}. End to end the "
                     f"two similarity codes differ by float rounding (max |Δsim| = {sim_diff:.1e}), which "
                     f"flips {kept_diff} kept flag(s) of near-tied candidates. Outcomes: {reasons}.")
    lines.append(f"- load average at the end of the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
                 "(1/5/15 min; the machine is shared with other jobs, so times move between runs). FAISS "
                 "runs OpenMP threads on all cores: when other processes hold the cores its time can grow "
                 "several-fold (set OMP_NUM_THREADS=1 on a busy machine).")
    lines.append("- 'rows shuffled': rows in random order cost negalign one extra sort (by prompt, then "
                 "sample_idx) and random-access gathers (the targets in the similarity too); rows in "
                 "(prompt, sample) order, as `sample` writes them, take the fast path.")
    lines.append("- The GPU path of `cosine_to_target` (faiss-gpu `pairwise_distance_gpu`, used when "
                 "`faiss.get_num_gpus() > 0`) is not measured here: no GPU on this machine.")
    table = "\n".join(lines)
    print("\n" + table)
    if args.results:
        cmd = "    .venv/bin/python benchmarks/bench_filter.py " + " ".join(sys.argv[1:])
        machine = (f"{os.cpu_count()} cores ({platform.machine()}), no GPU, "
                   f"Python {platform.python_version()}, numpy {np.__version__}")
        intro = (
            f"Self-Contrast `lastdedup-p` (p = {args.keep_fraction}) on synthetic L2-normalised embeddings, "
            f"dim {args.dim}: cosine to the target + selection. negalign = FAISS "
            "`pairwise_indexed_inner_product` + vectorised numpy selection (`negalign.selection`); reference "
            "= per-prompt loop (numpy similarity per prompt, dict dedup, `np.argsort`). Each side in its own "
            f"subprocess; times = best of {args.repeat} runs ('cold' = the first); peak RSS = VmHWM of the "
            "timed runs (mark reset after building the data; includes the input embeddings); 'above input' = "
            "that peak minus the RSS once the data was built (freed heap pages are reused, so this can read "
            "low); tracemalloc peak = Python/numpy allocations of one more, untimed run (FAISS's own C++ "
            "buffers are not seen; `pairwise_indexed_inner_product` allocates none).")
        args.results.write_text(f"## filter\n\n{intro}\n\nMachine: {machine}.\n\n{cmd}\n\n{table}\n")


if __name__ == "__main__":
    main()
