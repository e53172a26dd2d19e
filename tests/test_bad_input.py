"""The bad-input matrix (issue 13): each case is a real `negalign` process with its exit code and its one-line error.

A bad input exits 2 with exactly one line `error: FILE, row N, column 'C': what` (the parts that exist), no
traceback, and nothing already on disk changes. JSONL rows are named by the line number an editor shows; Parquet
rows by their 0-based index. The README's "Guarantees" table lists these cases: change them together.

Processes are forked from the crash harness's zygote (tests/crash/zygote.py) so each case costs a fork, not a
fresh import of torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign.store import manifest_file, open_stage
from tests.conftest import EXAMPLE_DATA
from tests.crash.harness import Zygote

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
