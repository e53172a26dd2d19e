"""Model fingerprints, fault injection and lineage checks across stages (issue 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from negalign.models import chat_template_hash, model_fingerprint


def _model_folder(path: Path, weights: np.ndarray, config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy", "hidden_size": 4}))
    save_file({"w": weights}, str(path / "model.safetensors"))
    return path


def test_model_fingerprint_is_content_not_folder_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    a = _model_folder(tmp_path / "runs" / "a" / "models" / "sc", w)
    b = _model_folder(tmp_path / "runs" / "b" / "models" / "sc", w + 1.0)  # same name and header, other weights
    c = _model_folder(tmp_path / "copy" / "elsewhere", w)  # same content, other name
    d = _model_folder(tmp_path / "d" / "sc", w, {"model_type": "toy", "hidden_size": 8})
    fa, fb, fc, fd = (model_fingerprint(str(p)) for p in (a, b, c, d))
    assert fa != fb and fa != fd
    assert fa == fc and len(fa) == 16


def test_chat_template_hash() -> None:
    class Tok:
        chat_template = "{{ messages }}"

    class Other:
        chat_template = "{{ messages }}!"

    class NoTemplate:
        chat_template = None

    assert chat_template_hash(Tok()) != chat_template_hash(Other())
    assert chat_template_hash(NoTemplate()) == "none"


def test_crash_point_kills_at_the_nth_hit(tmp_path: Path) -> None:
    code = ("from negalign.faults import crash_point\n"
            "for i in range(5):\n    print(i, flush=True)\n    crash_point('here')\nprint('survived')\n")
    run = lambda spec: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                      env={**os.environ, "NEGALIGN_CRASH_AT": spec})
    killed = run("here:3")
    assert killed.returncode == -9 and killed.stdout.split() == ["0", "1", "2"]
    assert run("elsewhere").stdout.split()[-1] == "survived"
    assert run("here").stdout.split() == ["0"]
