"""Fault injection for crash tests: `crash_point(name)` kills the process at a named point when asked.

Set `NEGALIGN_CRASH_AT=name` to die (SIGKILL, as `kill -9` would) the first time the point `name` is reached, or
`NEGALIGN_CRASH_AT=name:N` to die the N-th time (1-based) it is reached in this process. Unset, it costs a dict
lookup. Points in the store: `shard-tmp-written`, `shard-renamed`, `journal-torn` (half a journal line written),
`between-shards`, `manifest-tmp-written`, `fold-written` (a fold wrote the manifest, journals not yet removed),
`journal-removed` (after each journal a fold removes), `swap-half-done`.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process if NEGALIGN_CRASH_AT names this point (and, with `:N`, this is its N-th hit)."""
    spec = os.environ.get("NEGALIGN_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
