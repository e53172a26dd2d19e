"""The artifact store's cost per shard, against bare pyarrow writes, as the shard count grows.

Sides, each writing the same `--shards` small Parquet tables into a fresh folder, in one process, one after the other:
- ``store``: `StageOutput.open` / `write_shard` × N / `finish` (atomic write, fsync, sha256, manifest update under
  the lock for every shard), as every stage writes;
- ``fsync``: `pq.write_table` to a temporary name, fsync, rename (the durability floor, no manifest);
- ``bare``: `pq.write_table` alone (what a script without resume would do).

The store's manifest grows by one entry per shard, so its per-shard cost is reported for the first and the last
tenth of the shards: flat means no O(shards) work per shard.

    .venv/bin/python benchmarks/bench_store.py --shards 1563 --workdir /tmp/bench_store
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        out.finish(len(tables))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1563, help="shards per side (1,563 = 100k prompts / 64)")
    ap.add_argument("--rows", type=int, default=64, help="rows per shard (small: the bookkeeping is measured)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_store"))
    args = ap.parse_args()
    tables = [_table(i, args.rows) for i in range(args.shards)]
    tenth = max(1, args.shards // 10)
    print(f"{args.shards} shards of {args.rows} rows; ms per shard (mean of all, first tenth, last tenth)")
    print("| side | total s | ms/shard | first tenth | last tenth |\n|---|---:|---:|---:|---:|")
    for side in ("store", "fsync", "bare"):
        t = run_side(side, args.workdir / side, tables)
        print(f"| {side} | {sum(t):.1f} | {1e3 * sum(t) / len(t):.1f} | {1e3 * sum(t[:tenth]) / tenth:.1f} | "
              f"{1e3 * sum(t[-tenth:]) / tenth:.1f} |", flush=True)
    manifest = args.workdir / "store" / "_manifest.json"
    print(f"manifest at the end: {manifest.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
