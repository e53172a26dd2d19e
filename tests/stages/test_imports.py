"""negalign without vLLM and FAISS: `--help`, `train`, `sample --engine hf` and `embed` run; the commands that need
them (`filter`: FAISS; `sample --engine vllm`) stop with one line naming the package to install, exit non-zero,
and write nothing.

"Not installed" is a mock (both are installed here): tests/hide_packages/sitecustomize.py, first on PYTHONPATH of
the child process, makes the import machinery find no module and no distribution named vllm* / faiss*
(`import faiss` raises ModuleNotFoundError, `importlib.util.find_spec("faiss")` is None), as on the CUDA check
machine. Everything else is real: the CLI in a subprocess, a tiny randomly initialised Llama with the default
model's tokenizer, the real default embedder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from negalign.store import read_manifest
from tests.conftest import ROOT, negalign
from tests.stages.test_train import make_run

HIDE = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "hide_packages"), str(ROOT),
                                       os.environ.get("PYTHONPATH", "")]),
        "NEGALIGN_HIDE_PACKAGES": "vllm,faiss"}

PROBE = ("import importlib.util, sys; import negalign.cli, negalign.train, negalign.sample, negalign.embed, "
         "negalign.filter, negalign.pair; "
         "print(importlib.util.find_spec('faiss'), importlib.util.find_spec('vllm'), "
         "sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'vllm')))")


def tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (random weights) with the default model's tokenizer: loads in well under a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from negalign.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_hidden_means_not_installed_and_the_modules_import():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **HIDE}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None None []"  # the mock works, and no negalign module needed either
    assert negalign("--help", env=HIDE, check=True).stdout.count("train") >= 1


def test_filter_and_vllm_say_what_to_install(tmp_path):
    run = make_run(tmp_path / "run")
    proc = negalign("filter", "--run", run, env=HIDE)
    assert proc.returncode == 1 and "pip install faiss-cpu" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (run / "negatives").exists()  # checked before anything was written
    proc = negalign("sample", "--run", run, "--engine", "vllm", env=HIDE)
    assert proc.returncode == 2 and "pip install vllm" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (run / "samples").exists()


@pytest.mark.slow
def test_train_sample_hf_and_embed_run_without_vllm_and_faiss(tmp_path):
    run = make_run(tmp_path / "run")
    model = tiny_llama(tmp_path / "tiny")
    negalign("train", "--run", run, "--model", model, "--objective", "sc", "--num-negatives", "2", "--max-steps",
             "1", "--batch-size", "2", "--threads", "1", "--save-steps", "1000", env=HIDE, check=True, timeout=300)
    assert read_manifest(run / "models" / "sc-k2")["status"] == "complete"
    negalign("sample", "--run", run, "--model", model, "--engine", "hf", "-n", "2", "--max-tokens", "4",
             "--threads", "1", env=HIDE, check=True, timeout=300)
    samples = read_manifest(run / "samples")
    assert samples["status"] == "complete" and sum(s["rows"] for s in samples["shards"].values()) == 3 * 2
    shutil.rmtree(model)  # embed needs the samples, not the policy
    negalign("embed", "--run", run, env=HIDE, check=True, timeout=300)
    assert read_manifest(run / "embeddings")["status"] == "complete"
