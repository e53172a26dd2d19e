"""Memory the store's manifest costs per shard: write N small shards with pair-like metadata, then read the manifest
back and finish (the fold), printing RSS and peak RSS (MiB) after each phase.

    .venv/bin/python benchmarks/probe_manifest_memory.py [--shards 15625] [--folder /dev/shm/probe_manifest]

The folder defaults to /dev/shm so that fsyncs cost nothing: this measures memory, not time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negalign.store import StageOutput  # noqa: E402

META = {"groups": 64, "pairs": 400, "d2o_groups": 0, "skipped": {"no_target": 0, "no_negatives": 0},
        "groups_with_k": {"1": 64, "2": 60, "4": 50, "8": 30, "16": 10}}


def rss_mib() -> tuple[int, int]:
    """(current, peak) resident set size in MiB, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(status.split(f"{key}:")[1].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=15_625)
    ap.add_argument("--folder", type=Path, default=Path("/dev/shm/probe_manifest"))
    args = ap.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    table = pa.table({"x": [1, 2, 3]})
    out = StageOutput.open(args.folder, "toy", {"probe": 1}, {"input": "x"})
    print("start (RSS, peak MiB):", rss_mib())
    for s in range(args.shards):
        out.write_shard(s, table, META)
    out.flush()
    print(f"after {args.shards:,} shards:", rss_mib())
    pairs = sum(e["meta"]["pairs"] for e in out.manifest()["shards"].values())  # as pair's summary reads them
    print("after manifest():", rss_mib(), f"({pairs:,} pairs)")
    out.finish(args.shards)
    print("after finish (the fold):", rss_mib())
    shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
