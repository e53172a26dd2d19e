"""Security defaults (issue 13): safetensors only, no remote code unless asked, nothing unpickled, names confined.

The pickle and remote-code tests plant a payload that would create a marker file if it ever ran, and check that the
marker does not appear. The README's "Guarantees" section lists these defaults: change them together.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest

from negalign import config
from negalign.errors import UsageError
from negalign.models import ALLOW_PICKLE_ENV, load_causal_lm, load_embedder, resolve_model
from tests.conftest import ROOT, negalign

PACKAGE = ROOT / "negalign"


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64}


@pytest.fixture
def pickle_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose only weights are a `pytorch_model.bin` that runs code when unpickled."""
    folder, marker = tmp_path / "pickled", tmp_path / "PWNED"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_tiny_llama_config()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder, marker


def test_pickle_only_model_folder_is_refused(pickle_model, monkeypatch) -> None:
    folder, marker = pickle_model
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    for load in (resolve_model, load_causal_lm, load_embedder):
        with pytest.raises(UsageError, match=r"pytorch_model\.bin.*safetensors only"):
            load(str(folder))
    assert not marker.exists()


def test_pickle_only_model_refused_on_the_command_line(pickle_model, small_prompts: Path) -> None:
    folder, marker = pickle_model
    proc = negalign("sample", "--run", small_prompts, "--model", folder, "--engine", "hf")
    assert proc.returncode == 2, proc.stderr
    assert "safetensors only" in proc.stderr and ALLOW_PICKLE_ENV in proc.stderr and not marker.exists()


@pytest.mark.slow
def test_allow_pickle_loads_a_real_bin_but_never_runs_a_payload(pickle_model, tmp_path: Path, monkeypatch) -> None:
    """With NEGALIGN_ALLOW_PICKLE=1 a genuine .bin loads, and a malicious one is still refused (weights_only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, marker = pickle_model
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    with pytest.raises(Exception) as err:  # torch.load(weights_only=True) refuses the payload
        load_causal_lm(str(folder))
    assert not marker.exists() and "UsageError" not in type(err.value).__name__
    genuine = tmp_path / "genuine"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _tiny_llama_config().items() if k != "architectures"}))
    model.config.save_pretrained(genuine)
    torch.save(model.state_dict(), genuine / "pytorch_model.bin")
    loaded = load_causal_lm(str(genuine))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    monkeypatch.delenv(ALLOW_PICKLE_ENV)
    with pytest.raises(UsageError):
        load_causal_lm(str(genuine))


def test_trust_remote_code_is_off_by_default() -> None:
    for cls in {c for c in vars(config).values() if dataclasses.is_dataclass(c) and isinstance(c, type)}:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if "trust_remote_code" in fields:
            assert fields["trust_remote_code"].default is False, cls.__name__


@pytest.mark.slow
def test_remote_code_does_not_run_without_the_flag(tmp_path: Path) -> None:
    folder, marker = tmp_path / "remote", tmp_path / "PWNED"
    folder.mkdir()
    cfg = _tiny_llama_config() | {"model_type": "evilnet", "architectures": ["EvilModel"],
                                  "auto_map": {"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="trust_remote_code"):
        load_causal_lm(str(folder))
    assert not marker.exists()


FORBIDDEN = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cloudpickle|dill|joblib)\b"), "a pickle library"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load weights_only=False"),
]


def _calls(source: str, name: str) -> list[str]:
    """The text of every call `name(...)` in `source` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[m.start():i])
    return out


def test_no_code_path_unpickles() -> None:
    """torch.load only with weights_only=True; no pickle loads; model weights only with use_safetensors."""
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for f in files:
        source = f.read_text()
        for pattern, what in FORBIDDEN:
            if pattern.search(source):
                problems.append(f"{f.name}: {what}")
        for call in _calls(source, "torch.load"):
            if "weights_only=True" not in call:
                problems.append(f"{f.name}: {call.splitlines()[0]} without weights_only=True")
        for cls in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel"):
            for call in _calls(source, f"{cls}.from_pretrained"):
                if "gguf_file=" not in call and "use_safetensors=" not in call:
                    problems.append(f"{f.name}: {call.splitlines()[0]} without use_safetensors")
    assert not problems, problems


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "/abs"])
@pytest.mark.parametrize("stage", ["train", "eval"])
def test_output_names_are_confined_to_the_run_directory(tmp_path: Path, stage: str, name: str) -> None:
    run = tmp_path / "deep" / "run"
    proc = negalign(stage, "--run", run, "--name", name)
    assert proc.returncode == 2, proc.stderr
    assert "plain folder name" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "deep" / "escape").exists() and not list(tmp_path.rglob("escape"))


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_pipeline_step_names_are_confined_to_the_run_directory(tmp_path: Path, name: str) -> None:
    import yaml

    step = {"name": name, "iterations": 1, "model": "smollm2-135m", "prompts_per_round": 2,
            "steps": [{"name": "s", "stage": "sample"}, {"name": "t", "stage": "train", "objective": "sft"}]}
    path = tmp_path / "deep" / "pipeline.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"run": str(tmp_path / "deep" / "run"), "steps": [step]}))
    proc = negalign("run", path, "--dry-run")
    assert proc.returncode == 2 and "must be a plain name" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "escape").exists()


def test_resume_checkpoints_load_with_weights_only() -> None:
    """`train --resume` hands checkpoints to transformers' Trainer: every torch.load there is weights_only=True."""
    import importlib.util

    source = Path(importlib.util.find_spec("transformers.trainer").origin).read_text()
    calls = _calls(source, "torch.load")
    assert calls and all("weights_only=True" in c for c in calls), [c for c in calls if "weights_only=True" not in c]
