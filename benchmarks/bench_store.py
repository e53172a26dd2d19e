"""The artifact store's cost per shard as the shard count grows: the store alone, and through the CLI.

Part 1, the store alone. Sides, each writing the same `--shards` small Parquet tables into a fresh folder, in one
process, one after the other:
- ``store``: `StageOutput.open` / `write_shard` × N / `finish` (atomic write, fsync, sha256, one journal line per
  shard, the fold at the end), as every stage writes;
- ``fsync``: `pq.write_table` to a temporary name, fsync, rename (the durability floor, no bookkeeping);
- ``bare``: `pq.write_table` alone (what a script without resume would do).
Cost per shard is reported for the first and the last tenth of the shards too: flat means no O(shards) work per
shard.

Part 2, the done-when check of issue 20, through the CLI: `negalign prepare --shard-size 1` on `--cli-small` and
`--cli-large` prompts (400 and 3,200 shards), side by side in one run. Per shard: the stage's own time
(`timings.last_run_s` in the manifest: from opening the output to the fold, so without the imports and reading
the input), and the whole command's wall time. Then the large folder is read back whole with pandas and checked
with `negalign inspect`.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_store.py --shards 1563 --workdir /tmp/bench_store
    PYTHONPATH=. .venv/bin/python benchmarks/bench_store.py --shards 0 --cli-small 400 --cli-large 3200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from negalign.store import StageOutput


def _table(i: int, rows: int) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}-{j}" for j in range(rows)], "x": list(range(rows))})


def _write_fsync(path: Path, table: pa.Table) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)


def run_side(side: str, folder: Path, tables: list[pa.Table]) -> list[float]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    times = []
    out = StageOutput.open(folder, "toy", {"bench": 1}, {"input": "x"}) if side == "store" else None
    for i, t in enumerate(tables):
        t0 = time.perf_counter()
        if out is not None:
            out.write_shard(i, t, {"note": "x"})
        elif side == "fsync":
            _write_fsync(folder / f"part-{i:05d}.parquet", t)
        else:
            pq.write_table(t, folder / f"part-{i:05d}.parquet", compression="zstd")
        times.append(time.perf_counter() - t0)
    if out is not None:
        t0 = time.perf_counter()
        out.finish(len(tables))
        times[-1] += time.perf_counter() - t0  # the fold belongs to the run
    return times


def store_alone(shards: int, rows: int, workdir: Path) -> None:
    tables = [_table(i, rows) for i in range(shards)]
    tenth = max(1, shards // 10)
    print(f"## store alone: {shards} shards of {rows} rows; ms per shard (all, first tenth, last tenth)\n")
    print("| side | total s | ms/shard | first tenth | last tenth |\n|---|---:|---:|---:|---:|")
    for side in ("store", "fsync", "bare"):
        t = run_side(side, workdir / side, tables)
        print(f"| {side} | {sum(t):.1f} | {1e3 * sum(t) / len(t):.2f} | {1e3 * sum(t[:tenth]) / tenth:.2f} | "
              f"{1e3 * sum(t[-tenth:]) / tenth:.2f} |", flush=True)
    manifest = workdir / "store" / "_manifest.json"
    print(f"\nmanifest at the end: {manifest.stat().st_size / 1024:.0f} KiB")


CODE = [Path(__file__).resolve().parents[1]]  # the checkout whose negalign the CLI runs (--code)


def _negalign(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(CODE[0]), "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "negalign", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"negalign {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc


def through_cli(sizes: list[int], workdir: Path) -> None:
    """`prepare --shard-size 1` at each size, side by side; the largest folder read back and inspected."""
    import pandas as pd

    print(f"\n## through the CLI: `negalign prepare --shard-size 1` ({', '.join(map(str, sizes))} shards)\n")
    data = workdir / "data.jsonl"
    with open(data, "w") as f:
        for i in range(max(sizes)):
            f.write(json.dumps({"prompt": f"What is {i} plus {i + 1}? Reply with only the number.",
                                "target": str(2 * i + 1)}) + "\n")
    rows = []
    for n in sizes:
        part = workdir / f"data-{n}.jsonl"
        with open(data) as src, open(part, "w") as dst:
            dst.writelines(line for _, line in zip(range(n), src, strict=False))
        run = workdir / f"cli-{n}"
        shutil.rmtree(run, ignore_errors=True)
        wall, _ = _negalign("prepare", "--run", str(run), "--input", str(part), "--shard-size", "1")
        m = json.loads((run / "prompts" / "_manifest.json").read_text())
        assert m["status"] == "complete" and m["num_shards"] == n, (m["status"], m["num_shards"])
        size = (run / "prompts" / "_manifest.json").stat().st_size
        rows.append((n, m["timings"]["last_run_s"], wall, size))
    print("| shards | stage s | stage ms/shard | ratio | command wall s | wall ms/shard | ratio | manifest KiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    n0, s0, w0, _ = rows[0]
    for n, s, w, size in rows:
        print(f"| {n} | {s:.2f} | {1e3 * s / n:.2f} | {(s / n) / (s0 / n0):.2f} | {w:.2f} | {1e3 * w / n:.2f} | "
              f"{(w / n) / (w0 / n0):.2f} | {size / 1024:.0f} |")
    big = workdir / f"cli-{max(sizes)}" / "prompts"
    leftovers = [p.name for p in big.iterdir() if not p.name.endswith(".parquet") and p.name != "_manifest.json"]
    df = pd.read_parquet(big)
    _, proc = _negalign("inspect", str(big.parent))
    said = proc.stdout + proc.stderr  # the console writes to stderr
    ok = "│ ok" in said and "damaged" not in said and "stale" not in said
    print(f"\n{big}: pandas reads {len(df):,} rows (expected {max(sizes):,}); `negalign inspect` exit 0, "
          f"check {'ok' if ok else 'NOT ok'}; files besides shards and manifest: {leftovers or 'none'}")
    assert len(df) == max(sizes) and ok and not leftovers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1563, help="shards per side of part 1 (0: skip it)")
    ap.add_argument("--rows", type=int, default=64, help="rows per shard (small: the bookkeeping is measured)")
    ap.add_argument("--cli-small", type=int, default=400, help="prompts (= shards) of part 2's small run")
    ap.add_argument("--cli-large", type=int, default=3200, help="... and of its large run (0: skip part 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_store"))
    ap.add_argument("--code", type=Path, help="run the CLI of this checkout instead (e.g. main, for a before figure)")
    args = ap.parse_args()
    if args.code:
        CODE[0] = args.code.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.shards:
        store_alone(args.shards, args.rows, args.workdir)
    if args.cli_large:
        through_cli([args.cli_small, args.cli_large], args.workdir)


if __name__ == "__main__":
    main()
