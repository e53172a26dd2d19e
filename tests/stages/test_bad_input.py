"""The bad-input matrix (issue 13): each case is a real `negalign` process with its exit code and its one-line error.

A bad input exits 2 with exactly one line `error: FILE, row N, column 'C': what` (the parts that exist), no
traceback, and nothing already on disk changes. JSONL rows are named by the line number an editor shows; Parquet
rows by their 0-based index. The README's "Guarantees" table lists these cases: change them together.

Processes are forked from the crash harness's zygote (tests/e2e/crash/zygote.py) so each case costs a fork, not a
fresh import of torch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from negalign.prepare import prompt_id
from negalign.sample import SAMPLE_SCHEMA
from negalign.store import PROMPTS_SCHEMA, StageOutput, manifest_file, open_stage
from tests.conftest import EXAMPLE_DATA
from tests.e2e.crash.harness import Zygote, tiny_embedder, tiny_model

pytestmark = pytest.mark.slow  # one zygote start (imports torch once), then ~0.2-2 s per case


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


def cli(z: Zygote, tmp: Path, *args) -> tuple[int, str]:
    return z.cli(*args, log=tmp / "log.txt")


def fails(z: Zygote, tmp: Path, *args, code: int = 2, has: tuple[str, ...] = ()) -> str:
    """Run; assert the exit code and exactly one `error:` line (no traceback) containing every `has`; return it."""
    rc, text = cli(z, tmp, *args)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert rc == code, f"exit {rc}:\n{text[-2000:]}"
    assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
    for part in has:
        assert part in errors[0], errors[0]
    print(f"\n[{rc}] {errors[0]}")  # pytest -s shows the matrix's messages (the README table quotes them)
    return errors[0]


def ok(z: Zygote, tmp: Path, *args) -> str:
    rc, text = cli(z, tmp, *args)
    assert rc == 0, f"exit {rc}:\n{text[-2000:]}"
    return text


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prompts(run: Path) -> list[dict]:
    return open_stage(run / "prompts", "prompts").read().to_pylist()


GOOD = {"prompt": "What is 2+2?", "target": "4"}


# ------------------------------------------------------------------------------------------------ prepare: files

def test_empty_file(zygote, tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", tmp_path / "d.jsonl",
          has=(str(tmp_path / "d.jsonl"), "no rows (empty file)"))


def test_unknown_format(zygote, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [GOOD])
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "alpaca",
          has=("alpaca",))


def test_csv_file_is_refused(zygote, tmp_path):
    (tmp_path / "d.csv").write_text("prompt,target\nWhat is 2+2?,4\n")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", tmp_path / "d.csv",
          has=(str(tmp_path / "d.csv"), "unsupported file type '.csv'"))


def test_csv_named_parquet(zygote, tmp_path):
    (tmp_path / "d.parquet").write_text("prompt,target\nWhat is 2+2?,4\n")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", tmp_path / "d.parquet",
          has=(str(tmp_path / "d.parquet"), "unreadable Parquet file"))


def test_missing_column(zygote, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [GOOD, {"target": "5"}])
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "prompt",
          has=(f"{data}, row 2, column 'prompt'", "missing_column"))


def test_wrong_column_type_in_parquet(zygote, tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2], "target": ["a", "b"]}), tmp_path / "d.parquet")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", tmp_path / "d.parquet", "--format",
          "prompt", has=("d.parquet, row 0, column 'prompt'", "expected a string, got int"))


@pytest.mark.parametrize(("row", "column", "reason"), [
    ({"prompt": None, "target": "4"}, "prompt", "missing_column"),
    ({"prompt": "   ", "target": "4"}, "prompt", "empty_prompt"),
    ({"prompt": "What is 2+2?", "target": ""}, "target", "empty_target"),
], ids=["null-prompt", "empty-prompt", "empty-target"])
def test_null_or_empty_prompt_and_target(zygote, tmp_path, row, column, reason):
    data = jsonl(tmp_path / "d.jsonl", [GOOD, row])
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "prompt",
          has=(f"{data}, row 2, column '{column}'", reason))


def test_null_target_is_a_prompt_without_target(zygote, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "target": None}])
    ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "prompt")
    assert prompts(tmp_path / "r")[0]["target"] is None


# ------------------------------------------------------------------------------------------------ prepare: messages

@pytest.mark.parametrize(("messages", "reason"), [
    ([{"content": "hi"}], "wrong_type"),  # a message without a role
    ([{"role": "bot", "content": "hi"}], "bad_role"),
    ("hi", "wrong_type"),  # not a list
], ids=["missing-role", "unknown-role", "not-a-list"])
def test_malformed_messages(zygote, tmp_path, messages, reason):
    data = jsonl(tmp_path / "d.jsonl", [{"messages": messages, "target": "x"}])
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "messages",
          has=(f"{data}, row 1, column 'messages'", reason))


def test_system_and_multi_turn_messages_work(zygote, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    data = jsonl(tmp_path / "d.jsonl", [{"messages": messages, "target": "4"}])
    ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--format", "messages")
    assert prompts(tmp_path / "r")[0]["messages"] == messages


# ------------------------------------------------------------------------------------------------ prepare: bytes

def _with_bad_bytes(path: Path) -> Path:
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9?", "target": "x"}\n'
                     + json.dumps({"prompt": "Name a colour.", "target": "Blue"}).encode() + b"\n")
    return path


def test_non_utf8_jsonl_names_the_line(zygote, tmp_path):
    data = _with_bad_bytes(tmp_path / "d.jsonl")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data,
          has=(f"{data}, row 2", "not UTF-8", "0xe9", "not_utf8"))


def test_non_utf8_jsonl_is_skipped_and_counted(zygote, tmp_path):
    data = _with_bad_bytes(tmp_path / "d.jsonl")
    out = ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--on-bad-row", "skip")
    assert "not_utf8: 1" in out
    assert [p["target"] for p in prompts(tmp_path / "r")] == ["4", "Blue"]
    summary = json.loads(manifest_file(tmp_path / "r" / "prompts").read_text())["summary"]
    assert summary["bad_rows"] == {"not_utf8": 1}


def test_utf8_bom_is_accepted(zygote, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data)
    assert prompts(tmp_path / "r")[0]["messages"][0]["content"] == "What is 2+2?"


def test_jsonl_rows_are_editor_line_numbers(zygote, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD | {"prompt": "x?"}) + "\n"
                    + json.dumps({"prompt": "y?", "target": 3}) + "\n")  # line 4 is bad; line 2 is blank
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data,
          has=(f"{data}, row 4, column 'target'",))


def test_invalid_json_line(zygote, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + '\n{"prompt": \n')
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data,
          has=(f"{data}, row 2", "not valid JSON", "invalid_json"))


def test_emoji_and_right_to_left_text_round_trip(zygote, tmp_path):
    rows = [{"prompt": "Translate 👋🏽 into Arabic 🙂", "target": "مرحبا 👋"},
            {"prompt": "מה שלומך? (Hebrew, RTL) \u200f", "target": "טוב, תודה"}]
    ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", jsonl(tmp_path / "d.jsonl", rows))
    got = {p["messages"][0]["content"]: p["target"] for p in prompts(tmp_path / "r")}
    assert got == {r["prompt"].strip(): r["target"] for r in rows}


def test_100k_character_prompt_is_skipped_and_counted(zygote, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "long " * 20_000, "target": "x"}])
    out = ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data)
    assert "prompt_too_long: 1" in out
    assert len(prompts(tmp_path / "r")) == 1
    summary = json.loads(manifest_file(tmp_path / "r" / "prompts").read_text())["summary"]
    assert summary["bad_rows"] == {"prompt_too_long": 1}


def test_every_row_bad_with_skip(zygote, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "", "target": "x"}, {"prompt": "  ", "target": "y"}])
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", data, "--on-bad-row", "skip",
          has=("no usable prompts", "empty_prompt: 2"))


def test_bad_input_leaves_previous_output_alone(zygote, tmp_path):
    ok(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", jsonl(tmp_path / "good.jsonl", [GOOD]))
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "prompts").iterdir()}
    bad = _with_bad_bytes(tmp_path / "bad.jsonl")
    fails(zygote, tmp_path, "prepare", "--run", tmp_path / "r", "--input", bad, "--overwrite", has=("row 2",))
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "prompts").iterdir()} == before


# ------------------------------------------------------------------------------------------------ other commands

@pytest.fixture(scope="module")
def prepared(zygote, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    data = jsonl(tmp / "d.jsonl", [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()[:4]])
    ok(zygote, tmp, "prepare", "--run", tmp / "run", "--input", data, "--test-fraction", "0.25")
    return tmp / "run"


def test_sample_nonexistent_model_path(zygote, prepared, tmp_path):
    fails(zygote, tmp_path, "sample", "--run", prepared, "--model", tmp_path / "no-such-model", "--engine", "hf",
          "--out", tmp_path / "s", has=("no-such-model", "not found"))
    assert not (tmp_path / "s").exists() or manifest_file(tmp_path / "s") is None


def test_stage_before_its_input_exists(zygote, tmp_path):
    fails(zygote, tmp_path, "embed", "--run", tmp_path / "empty", has=("samples",))


def test_unknown_option_value(zygote, prepared, tmp_path):
    fails(zygote, tmp_path, "sample", "--run", prepared, "--engine", "tpu", has=("tpu",))


def test_eval_name_with_dotdot_is_refused(zygote, prepared, tmp_path):
    fails(zygote, tmp_path, "eval", "--run", prepared, "--model", "smollm2-135m", "--name", "../escape",
          has=("../escape",))
    assert not (prepared.parent / "escape").exists()


def test_inspect_broken_manifest(zygote, tmp_path):
    (tmp_path / "r" / "prompts").mkdir(parents=True)
    (tmp_path / "r" / "prompts" / "_manifest.json").write_text('{"stage": "prompts", ')
    fails(zygote, tmp_path, "inspect", tmp_path / "r" / "prompts", code=2, has=("_manifest.json",))


# ------------------------------------------------------------------------------------------------ model stages

def _write_stage(path: Path, stage: str, rows: list[dict], schema: pa.Schema, info: dict | None = None) -> None:
    out = StageOutput.open(path, stage, {"made_by": "test_bad_input"}, {}, info=info)
    out.write_shard(0, pa.Table.from_pylist(rows, schema=schema))
    assert out.finish(1)


@pytest.fixture(scope="module")
def made_run(zygote, tmp_path_factory) -> Path:
    """Two prompts with hand-made samples: for the first every candidate is its target; embed, filter and pair run
    on them with the real default embedder. Plus a tiny random policy at RUN/../tiny."""
    tmp = tmp_path_factory.mktemp("made")
    run = tmp / "run"
    texts = {"What is the capital of France?": ("Paris", ["Paris", "Paris", "Paris", "Paris"]),
             "What is 2+2?": ("4", ["4", "5", "four", "I think it is seven."])}
    prompts, samples = [], []
    for prompt, (target, candidates) in texts.items():
        messages = [{"role": "user", "content": prompt}]
        prompts.append({"prompt_id": prompt_id(messages), "messages": messages, "target": target, "negatives": None})
        samples += [{"prompt_id": prompt_id(messages), "sample_idx": i, "text": t, "num_tokens": 2,
                     "finish_reason": "stop", "seed": i, "engine": "hf", "model": "hand"}
                    for i, t in enumerate(candidates)]
    _write_stage(run / "prompts", "prompts", [{n: r.get(n) for n in PROMPTS_SCHEMA.names} for r in prompts],
                 PROMPTS_SCHEMA)
    _write_stage(run / "samples", "sample", samples, SAMPLE_SCHEMA, info={"num_samples": 4})
    for stage in ("embed", "filter", "pair"):
        ok(zygote, tmp, stage, "--run", run)
    tiny_model(tmp / "tiny")
    return run


def test_every_candidate_identical_to_the_target(made_run) -> None:
    negatives = {(r["prompt_id"], r["sample_idx"]): r for r in
                 open_stage(made_run / "negatives", "filter").read().to_pylist()}
    paris = prompt_id([{"role": "user", "content": "What is the capital of France?"}])
    dropped = [negatives[(paris, i)] for i in range(4)]
    assert not any(r["kept"] for r in dropped) and all(r["drop_reason"] for r in dropped)
    pairs = open_stage(made_run / "pairs", "pair")
    assert [g["prompt_id"] for g in pairs.read().to_pylist()] != [] and paris not in \
        {g["prompt_id"] for g in pairs.read().to_pylist()}
    assert sum(pairs.manifest["summary"]["skipped"].values()) == 1  # counted, not silently lost


def test_train_num_negatives_larger_than_any_group(zygote, made_run, tmp_path) -> None:
    fails(zygote, tmp_path, "train", "--run", made_run, "--model", made_run.parent / "tiny", "--num-negatives", "50",
          "--allow-template-mismatch", "--max-steps", "1", "--name", "k50",
          has=("--num-negatives 50", "no group"))
    assert manifest_file(made_run / "models" / "k50") is None or \
        json.loads(manifest_file(made_run / "models" / "k50").read_text())["status"] != "complete"


def test_train_nonexistent_model_path(zygote, made_run, tmp_path) -> None:
    fails(zygote, tmp_path, "train", "--run", made_run, "--model", tmp_path / "nope", "--name", "nope",
          has=("nope", "not found"))


def test_corrupt_checkpoint_is_not_resumed(zygote, made_run, tmp_path) -> None:
    args = ("train", "--run", made_run, "--model", made_run.parent / "tiny", "--allow-template-mismatch",
            "--max-steps", "3", "--save-steps", "1", "--batch-size", "1", "--resume", "--name", "ck")
    rc = zygote.run([*args], log=tmp_path / "log.txt", env={"NEGALIGN_CRASH_AT": "checkpoint-save:3"})
    assert rc == -9
    checkpoints = [p for p in (made_run / "models").glob(".ck.checkpoints-*/checkpoint-*")]
    assert checkpoints, list((made_run / "models").iterdir())
    for p in checkpoints:  # corrupt every checkpoint's weights
        for f in p.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
    ok(zygote, tmp_path, *args)  # starts over instead of loading broken weights
    summary = json.loads(manifest_file(made_run / "models" / "ck").read_text())["summary"]
    assert summary["steps"] == 3


def test_embedder_with_another_dimension_on_resume(zygote, made_run, tmp_path) -> None:
    run = tmp_path / "run"
    for name in ("prompts", "samples"):
        shutil.copytree(made_run / name, run / name)
    emb = tiny_embedder(tmp_path / "emb", 32)
    rc = zygote.run(["embed", "--run", run, "--embedder", emb], log=tmp_path / "log.txt",
                    env={"NEGALIGN_CRASH_AT": "manifest-tmp-written:2"})
    assert rc == -9
    def files() -> dict[str, bytes]:  # a killed write's temporary file may be cleaned up: not compared
        return {p.name: p.read_bytes() for p in (run / "embeddings").iterdir() if p.is_file() and p.name[0] != "."}

    before = files()
    shutil.rmtree(emb)
    tiny_embedder(emb, 48)  # same folder, other model: 48 dimensions
    fails(zygote, tmp_path, "embed", "--run", run, "--embedder", emb, has=("--overwrite",))
    assert files() == before and before


# ------------------------------------------------------------------------------------------------ run

@pytest.mark.parametrize(("steps", "message"), [
    ([{"name": "a", "stage": "smaple"}], "unknown stage 'smaple'"),
    ([{"name": "a", "stage": "slice", "prompts": "@b", "out": "x/a"},
      {"name": "b", "stage": "slice", "prompts": "@a", "out": "x/b"}], "cycle: a -> b -> a"),
], ids=["unknown-stage", "cycle"])
def test_pipeline_unknown_stage_or_cycle(zygote, tmp_path, steps, message) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run": str(tmp_path / "run"), "steps": steps}))
    fails(zygote, tmp_path, "run", path, has=(str(path), message))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
