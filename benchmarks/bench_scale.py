"""Scale benchmark: `filter` and `pair` through the CLI at growing prompt counts, and the store alone.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--dim 16] [--store-shards 100000]
                                               [--workdir DIR] [--results FILE]

Per size: a synthetic run (prompts, samples, embeddings; 32 samples per prompt, 64 prompts per shard, dim `--dim`)
written through the store's own writer (`bench_filter.build_run`: valid artifacts), then `negalign filter` and
`negalign pair`, each in its own subprocess (`python -m negalign ...`). Reported per command: wall seconds, time
per prompt, and the child's peak RSS (`os.wait4` rusage, ru_maxrss). Flat means time per prompt and peak RSS at the
largest size within 1.2x of the smallest.

Store alone (`--store-shards`, 0 = skip): `StageOutput.open` / `write_shard` x N / `finish` (the public write API,
so it measures whatever store.py does) against the durability floor (pyarrow write + fsync + rename), 64-row
shards; ms per shard for all, the first tenth and the last tenth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_filter import build_run  # noqa: E402
from bench_filter import run_command as filter_with_parts  # noqa: E402
from bench_store import _table, run_side  # noqa: E402


def _popen_rss() -> None:
    """Popen.communicate reaps the child: wrap it so that its rusage is kept (os.wait4 on our own pid)."""
    real = subprocess.Popen._try_wait

    def try_wait(self, wait_flags):
        try:
            pid, sts, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid:
            self.rusage = usage
        return pid, sts

    subprocess.Popen._try_wait = try_wait
    subprocess.Popen._real_try_wait = real


def run_command(*args: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "negalign", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                         "PYTHONPATH": str(ROOT)})
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"negalign {' '.join(args)} failed:\n{err.decode()[-3000:]}")
    usage = getattr(proc, "rusage", None)
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024 if usage else float("nan")}


STORE_PARTS = ("read_shard", "write_shard", "read_output", "finish")  # write_shard: waiting on the writer


def split_row(run: Path, n: int) -> dict:
    """`filter` again with its time accounted per part (bench_filter's wrappers): store vs similarity + selection."""
    r = filter_with_parts("default", run, "neg_split", parts=True)
    parts = r["parts"]
    return {"prompts": n, "wall_s": r["wall_s"], "store_s": sum(parts.get(p, 0.0) for p in STORE_PARTS),
            "rule_s": parts.get("similarity", 0.0) + parts.get("selection", 0.0), "parts": parts}


def scale_rows(sizes: list[int], dim: int, workdir: Path, split: bool = False) -> list[dict]:
    rows = []
    for n in sizes:
        run = workdir / f"run_{n}"
        shutil.rmtree(run, ignore_errors=True)
        built = build_run(run, n, 32, 64, dim, 0)
        print(f"{n:,} prompts built: {built}", flush=True)
        for cmd in ("filter", "pair"):
            r = run_command(cmd, "--run", str(run))
            r.update(prompts=n, command=cmd, shards=built["shards"], us_per_prompt=1e6 * r["wall_s"] / n)
            print(r, flush=True)
            rows.append(r)
        if split:
            r = split_row(run, n)
            print({"split": r}, flush=True)
            rows.append({**r, "command": "split"})
        shutil.rmtree(run, ignore_errors=True)
    return rows


def store_rows(shards: int, workdir: Path) -> dict:
    tables = [_table(i, 64) for i in range(shards)]
    tenth = max(1, shards // 10)
    out = {}
    for side in ("store", "fsync"):
        t = run_side(side, workdir / f"store_{side}", tables)
        out[side] = {"ms": 1e3 * sum(t) / len(t), "first": 1e3 * sum(t[:tenth]) / tenth,
                     "last": 1e3 * sum(t[-tenth:]) / tenth}
        print(side, out[side], flush=True)
        shutil.rmtree(workdir / f"store_{side}", ignore_errors=True)
    return out


def markdown(rows: list[dict], store: dict | None, args: argparse.Namespace) -> str:
    lines = [f"Machine: {os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at "
             "the end (shared with other jobs: compare ratios).", "",
             "    .venv/bin/python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]), ""]
    splits, rows = [r for r in rows if r["command"] == "split"], [r for r in rows if r["command"] != "split"]
    if splits:
        lines += ["filter's time split (the command, wall s; store = shard reads, waits on the shard writer, "
                  "read-back, finish):", "",
                  "| prompts | wall s | store s | share | similarity + selection s | share |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['prompts']:,} | {r['wall_s']:.1f} | {r['store_s']:.1f} | {r['store_s'] / r['wall_s']:.0%} | "
                  f"{r['rule_s']:.1f} | {r['rule_s'] / r['wall_s']:.0%} |" for r in splits]
        lines.append("")
    if rows:
        lines += ["| command | prompts | shards | wall s | µs per prompt | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['command']} | {r['prompts']:,} | {r['shards']:,} | {r['wall_s']:.1f} | "
                  f"{r['us_per_prompt']:.0f} | {r['peak_rss_mib']:,.0f} |" for r in rows]
        for cmd in ("filter", "pair"):
            mine = [r for r in rows if r["command"] == cmd]
            if len(mine) > 1:
                a, b = mine[0], mine[-1]
                t, m = b["us_per_prompt"] / a["us_per_prompt"], b["peak_rss_mib"] / a["peak_rss_mib"]
                lines.append(f"- {cmd}, {a['prompts']:,} -> {b['prompts']:,} prompts: time per prompt x{t:.2f}, "
                             f"peak RSS x{m:.2f} ({'flat' if max(t, m) <= 1.2 else 'NOT flat'} within 1.2x)")
    if store:
        s, f = store["store"], store["fsync"]
        lines += ["", f"Store alone, {args.store_shards:,} shards of 64 rows, ms per shard:", "",
                  "| side | all | first tenth | last tenth |", "|---|---:|---:|---:|",
                  *(f"| {k} | {v['ms']:.2f} | {v['first']:.2f} | {v['last']:.2f} |" for k, v in store.items()), "",
                  f"- store / durability floor = {s['ms'] / f['ms']:.2f} (goal <= 2); store last / first tenth = "
                  f"{s['last'] / s['first']:.2f} (goal <= 1.2)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="prompt counts, comma-separated")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--store-shards", type=int, default=100_000)
    ap.add_argument("--split", action="store_true", help="also time filter's parts (store vs the rule) per size")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    _popen_rss()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip() and int(s) > 0]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = scale_rows(sizes, args.dim, workdir, args.split)
        store = store_rows(args.store_shards, workdir) if args.store_shards else None
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(rows, store, args)
    print(text)
    if args.results:
        args.results.write_text(text)


if __name__ == "__main__":
    main()
