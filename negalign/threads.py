"""CPU threads for the torch/OpenMP paths (HF generate, embed, train): one rule, shared by every stage.

`--threads N` sets torch's intra-op threads (which sets OpenMP's and MKL's) and `OMP_NUM_THREADS` for child
processes. The default must not oversubscribe: with two OpenMP threads on two busy cores, HF generation fell from
38 to 3 tok/s (every parallel region waits for its slowest thread). The default, in order:

1. `OMP_NUM_THREADS`, when set: the user (or a launcher such as `torchrun`) already decided.
2. the cores this process may run on, when a scheduler restricted them (Slurm `--cpus-per-task`, `taskset`, a
   cgroup cpuset): those cores are ours.
3. otherwise the idle cores of a shared machine: cores − round(1-minute load average), at least 1. One process per
   core sees the others' load and takes 1 thread; a quiet machine gives all cores to one process.

Worker processes started at the same moment cannot see each other's load: give them `--threads 1` (the recipes in
`examples/slurm/` do).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = available_cores()
    if cores < (os.cpu_count() or cores):
        return cores
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(threads: int | None = None) -> int:
    """Use `threads` (None or 0: `default_threads()`) for torch and OpenMP in this process and its children."""
    n = threads if threads and threads > 0 else default_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n
