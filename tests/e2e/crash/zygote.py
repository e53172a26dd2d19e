"""A fork server for the crash matrix: import negalign and its heavy libraries once, then fork one child per run.

Starting a fresh `python -m negalign embed` costs 10-20 s on a 2-core machine, almost all of it importing torch,
transformers and sentence-transformers; the matrix needs hundreds of runs. This process imports them once (and
runs nothing that starts a thread pool), then serves requests on stdin, one JSON object per line:

    {"args": [...], "env": {...}, "log": PATH, "kill_after": SECONDS | null, "count_file": PATH | null}

For each it forks a child that runs the real CLI (`negalign.cli.app(args)`) with `env` added to its environment
and its output in `log`. The child is a separate process: NEGALIGN_CRASH_AT makes it SIGKILL itself at a named
point (negalign.faults), and `kill_after` has this server SIGKILL it after a delay. `count_file` makes the child
count how often each crash point is reached and write the counts there as JSON (to draw crash points from).
The answer is one JSON line: {"returncode": N (negative = killed by that signal), "seconds": S}.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402,F401  (imported here so children do not pay for it)
import sentence_transformers  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import negalign.cli  # noqa: E402
import negalign.faults  # noqa: E402

STAGE_MODULES = ("prepare", "sample", "embed", "filter", "pair", "train", "evaluate", "report", "pipeline")
for _name in STAGE_MODULES:
    try:
        importlib.import_module(f"negalign.{_name}")
    except ModuleNotFoundError as e:  # a stage not built yet
        if e.name != f"negalign.{_name}":
            raise


def _count_crash_points() -> Counter[str]:
    """Wrap crash_point in every loaded negalign module so that each hit is counted in the returned Counter."""
    hits: Counter[str] = Counter()
    original = negalign.faults.crash_point

    def counting(name: str) -> None:
        hits[name] += 1
        original(name)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("negalign") and getattr(module, "crash_point", None) is original:
            module.crash_point = counting
    return hits


def _child(request: dict) -> int:
    """Run the CLI in this (forked) process; return its exit code."""
    os.setsid()
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(request.get("env") or {})
    if request.get("cwd"):
        os.chdir(request["cwd"])
    hits = _count_crash_points() if request.get("count_file") else None
    code = 0
    try:
        negalign.cli.app(args=request["args"], prog_name="negalign")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 — report like the interpreter would, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    if hits is not None:
        with open(request["count_file"], "w") as f:
            json.dump(hits, f)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _wait(pid: int, kill_after: float | None) -> int:
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() >= deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # killed before it called setsid(): no group (nor children) of its own yet
                os.kill(pid, signal.SIGKILL)
            deadline = None
        else:
            time.sleep(0.005)


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                os._exit(code)  # never return into the server loop, never run the server's atexit handlers
        code = _wait(pid, request.get("kill_after"))
        print(json.dumps({"returncode": code, "seconds": round(time.monotonic() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
