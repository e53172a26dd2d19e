"""`negalign env`: what is installed and what hardware the stages will use."""

from __future__ import annotations

import importlib
import platform

from rich.table import Table

from negalign import __version__
from negalign.console import console
from negalign.versions import LIBRARIES, distributions


def versions() -> dict[str, str]:
    """python, negalign, and each library of `negalign.versions.LIBRARIES` as 'version (distribution)'."""
    out = {"python": platform.python_version(), "negalign": __version__}
    for module in LIBRARIES:
        found = distributions(module)
        out[module] = ", ".join(f"{v} ({d})" for d, v in found.items()) or "not installed"
    return out


def devices() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        torch = importlib.import_module("torch")
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["torch"] = f"cuda x{len(names)}: {', '.join(names)}"
        else:
            out["torch"] = f"cpu ({torch.get_num_threads()} threads)"
    except ImportError:
        out["torch"] = "torch not installed"
    try:
        faiss = importlib.import_module("faiss")
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        out["faiss"] = f"gpu x{gpus}" if gpus else "cpu"
    except ImportError:
        out["faiss"] = "faiss not installed"
    return out


def default_models() -> dict[str, str]:
    from negalign.models import EMBEDDER_ALIASES, GENERATOR_ALIASES, negalign_home, resolve_model

    out = {}
    for alias in GENERATOR_ALIASES:
        path = negalign_home() / "models" / GENERATOR_ALIASES[alias]
        out[alias] = str(path) if (path / "config.json").exists() else f"{path} (converted from GGUF on first use)"
    for alias in EMBEDDER_ALIASES:
        try:
            out[alias] = resolve_model(alias)
        except Exception as e:  # noqa: BLE001 — report, don't fail
            out[alias] = f"unavailable: {e}"
    return out


def show() -> None:
    for title, rows in (("versions", versions()), ("devices", devices()), ("default models", default_models())):
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in rows.items():
            table.add_row(key, value)
        console.print(table)
