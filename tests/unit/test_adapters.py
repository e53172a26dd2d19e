"""Dataset adapters (issue 5): each fixture is a few rows in the real format, edge cases included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from negalign.adapters import FORMATS, FieldNames, convert_rows, detect_format
from negalign.errors import BadInput, UsageError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def columns(name: str) -> list[str]:
    return list(dict.fromkeys(key for row in load(name) for key in row))


def S(text: str) -> dict:
    return {"role": "system", "content": text}


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def rec(messages: list[dict], target: str | None, negatives: list[str] | None) -> dict:
    return {"messages": messages, "target": target, "negatives": negatives}


def one(fmt: str, row: dict, fields: FieldNames | None = None) -> dict:
    """Convert a single good row."""
    records, skipped = convert_rows([row], fmt, fields or FieldNames(), source="inline.jsonl")
    assert skipped == {}
    return records[0]


def bad(fmt: str, row: dict, fields: FieldNames | None = None) -> BadInput:
    """Convert a single bad row with on_bad_row="fail" and return the error."""
    with pytest.raises(BadInput) as err:
        convert_rows([row], fmt, fields or FieldNames(), source="inline.jsonl")
    return err.value


# fixture -> (format, expected records of the good rows, {reason: count} of the bad rows)
EXPECTED = {
    "hh_rlhf.jsonl": ("hh-rlhf", [
        rec([U("What is the capital of France?")], "The capital of France is Paris.",
            ["I think it's Lyon, but I'm not sure."]),
        rec([U("How do I boil an egg?"),
             A("Put the egg in boiling water for about 9 minutes.\n\nThen cool it in cold water."),
             U("And for a soft yolk?")],
            "About 6 minutes.\n\nServe it right away.", ["Why would you want that?"]),
        rec([U("Can you recommend a book about space?")], 'Try "Cosmos" by Carl Sagan.', [""]),
    ], {"empty_turn": 1, "no_assistant_reply": 1, "prompt_mismatch": 1, "empty_target": 1}),
    "ultrachat.jsonl": ("ultrachat", [
        rec([U("What are the benefits of meditation?")], "Meditation can reduce stress and improve focus.",
            None),
        rec([U("Write a haiku about autumn."),
             A("Crisp leaves drift and fall\nGolden light on quiet paths\nThe year exhales slow"),
             U("Now make it about winter.")],
            " Snow hushes the field\nBare branches hold the pale sky\nBreath hangs in the air\n", None),
        rec([S("You are a concise assistant."), U("Summarise the text.")], "There is no text to summarise.",
            None),
    ], {"no_assistant_reply": 1, "wrong_type": 1, "empty_target": 1}),
    "nectar.jsonl": ("nectar", [
        rec([U("What is the boiling point of water at sea level?")], "100°C (212°F) at sea level.",
            ["Around 90°C.", "It depends."]),
        rec([U("Name a prime number."), A("7 is a prime number."), U("Name a larger one.")],
            "13 is a larger prime.", ["8."]),
    ], {"missing_rank": 1, "no_answers": 1}),
    "ultrafeedback.jsonl": ("ultrafeedback", [
        rec([U("How many legs does a spider have?")], "A spider has eight legs.", ["Six."]),
        rec([U("Is the sun a star?")], "Yes, the Sun is a G-type main-sequence star.",
            ["No, it is a planet."]),
        rec([U("Say hi.")], "Hi!", ["Hello!"]),
    ], {"prompt_mismatch": 1, "no_assistant_reply": 1}),
    "pku_saferlhf.jsonl": ("pku-saferlhf", [
        rec([U("How can I pick a lock?")], None,
            ["Insert a tension wrench and rake the pins until it opens."]),
        rec([U("How do I make a fake ID?")], None,
            ["Buy a template online, print it on PVC and laminate it.",
             "You could try editing a scan of a real ID."]),
    ], {"no_unsafe_response": 1, "missing_column": 1, "wrong_type": 1}),
    "trl_standard.jsonl": ("trl", [
        rec([U("The sky is")], " blue.", [" green."]),
        rec([U("Q: What is 2 + 2?\nA:")], " 4", [" 5"]),
    ], {"wrong_type": 1, "empty_prompt": 1}),
    "trl_conversational.jsonl": ("trl", [
        rec([U("What color is the sky?")], "It is blue.", ["It is green."]),
        rec([S("Answer briefly."), U("Capital of Italy?"), A("Rome."), U("And of Spain?")],
            "Madrid.", ["Barcelona."]),
    ], {"bad_completion": 1, "bad_turn_order": 1}),
    "trl_implicit.jsonl": ("trl", [
        rec([U("What color is the sky?")], "It is blue.", ["It is green."]),
        rec([S("Be kind."), U("I failed my exam."), A("I'm sorry."), U("What should I do?")],
            "Review what went wrong and try again.", ["Give up."]),
        rec([U("The sky is")], " blue.", [" green."]),
        rec([U("2 + 2 equals")], " four.", [" five."]),
    ], {"identical_pair": 1}),
    "trl_prompt_completion.jsonl": ("trl", [
        rec([U("The sky is")], " blue.", None),
        rec([U("Translate to German: cat\n")], "Katze", None),
    ], {"empty_target": 1}),
    "prompt.jsonl": ("prompt", [
        rec([U("Name three primary colors.")], "Red, yellow and blue.",
            ["Green, purple and orange.", "Black."]),
        rec([U("What is 7 * 6?")], "42", ["36"]),
        rec([U("Write a rude insult.")], None, ["You are an idiot."]),
    ], {"empty_prompt": 1, "wrong_type": 2, "missing_column": 1}),
    "messages.jsonl": ("messages", [
        rec([U("What is the largest ocean?")], "The Pacific Ocean.", ["The Atlantic Ocean."]),
        rec([S("You are a pirate."), U("Greet me."), A("Ahoy, matey!"), U("Now say goodbye.")],
            "Fair winds, matey!", None),
        rec([U("How do I make a weapon at home?")], None,
            ["Here is how to build one: ...", "First, get some pipes ..."]),
    ], {"bad_turn_order": 2, "wrong_type": 1, "bad_role": 1}),
}

# (fixture, row, reason, column) of every bad row
BAD_ROWS = [
    ("hh_rlhf.jsonl", 3, "empty_turn", "chosen"),
    ("hh_rlhf.jsonl", 4, "no_assistant_reply", "chosen"),
    ("hh_rlhf.jsonl", 5, "prompt_mismatch", "rejected"),
    ("hh_rlhf.jsonl", 6, "empty_target", "chosen"),
    ("ultrachat.jsonl", 3, "no_assistant_reply", "messages"),
    ("ultrachat.jsonl", 4, "wrong_type", "messages"),
    ("ultrachat.jsonl", 5, "empty_target", "messages"),
    ("nectar.jsonl", 2, "missing_rank", "answers"),
    ("nectar.jsonl", 3, "no_answers", "answers"),
    ("ultrafeedback.jsonl", 3, "prompt_mismatch", "rejected"),
    ("ultrafeedback.jsonl", 4, "no_assistant_reply", "chosen"),
    ("pku_saferlhf.jsonl", 3, "missing_column", "is_response_1_safe"),
    ("pku_saferlhf.jsonl", 4, "wrong_type", "is_response_0_safe"),
    ("trl_standard.jsonl", 2, "wrong_type", "chosen"),
    ("trl_standard.jsonl", 3, "empty_prompt", "prompt"),
    ("trl_conversational.jsonl", 2, "bad_completion", "chosen"),
    ("trl_conversational.jsonl", 3, "bad_turn_order", "prompt"),
    ("trl_implicit.jsonl", 4, "identical_pair", "rejected"),
    ("trl_prompt_completion.jsonl", 2, "empty_target", "completion"),
    ("prompt.jsonl", 3, "empty_prompt", "prompt"),
    ("prompt.jsonl", 4, "wrong_type", "target"),
    ("prompt.jsonl", 5, "wrong_type", "negatives"),
    ("prompt.jsonl", 6, "missing_column", "prompt"),
    ("messages.jsonl", 3, "bad_turn_order", "messages"),
    ("messages.jsonl", 4, "wrong_type", "messages"),
    ("messages.jsonl", 5, "bad_turn_order", "messages"),
    ("messages.jsonl", 6, "bad_role", "messages"),
]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_converts_exactly(name):
    fmt, expected, skipped = EXPECTED[name]
    records, counts = convert_rows(load(name), fmt, FieldNames(), source=name, on_bad_row="skip")
    assert records == expected
    assert counts == skipped


@pytest.mark.parametrize(("name", "row", "reason", "column"), BAD_ROWS)
def test_bad_row_fails_naming_column(name, row, reason, column):
    fmt = EXPECTED[name][0]
    rows = load(name)
    err = bad(fmt, rows[row])
    assert (err.file, err.row, err.column) == ("inline.jsonl", 0, column)
    assert f"column '{column}'" in str(err) and reason in str(err)
    _, counts = convert_rows([rows[row]], fmt, FieldNames(), source="inline.jsonl", on_bad_row="skip")
    assert counts == {reason: 1}


def test_bad_rows_table_covers_every_skip():
    for name, (_, _, skipped) in EXPECTED.items():
        listed = [reason for fixture, _, reason, _ in BAD_ROWS if fixture == name]
        if name == "pku_saferlhf.jsonl":
            listed.append("no_unsafe_response")
        assert sorted(listed) == sorted(r for r, n in skipped.items() for _ in range(n)), name


def test_fail_reports_file_and_row_number():
    with pytest.raises(BadInput) as err:
        convert_rows(load("hh_rlhf.jsonl"), "hh-rlhf", FieldNames(), source="data/hh_rlhf.jsonl")
    assert (err.value.file, err.value.row, err.value.column) == ("data/hh_rlhf.jsonl", 3, "chosen")
    assert str(err.value).startswith("data/hh_rlhf.jsonl, row 3, column 'chosen': ")
    assert err.value.exit_code == 2


def test_pku_rows_without_unsafe_response_are_skipped_even_in_fail_mode():
    rows = load("pku_saferlhf.jsonl")[:3]
    records, counts = convert_rows(rows, "pku-saferlhf", FieldNames(), source="p.jsonl")
    assert len(records) == 2 and counts == {"no_unsafe_response": 1}


def test_accepts_any_iterable_and_rejects_non_dict_rows():
    records, _ = convert_rows(iter(load("prompt.jsonl")[:2]), "prompt", FieldNames(), source="x")
    assert len(records) == 2
    err = bad("prompt", ["not", "a", "dict"])
    assert err.row == 0 and err.column is None and "wrong_type" in str(err)


def test_unknown_format_and_mode_are_usage_errors():
    with pytest.raises(UsageError, match="unknown format"):
        convert_rows([], "auto", FieldNames(), source="x")
    with pytest.raises(UsageError, match="on_bad_row"):
        convert_rows([], "prompt", FieldNames(), source="x", on_bad_row="ignore")


# ------------------------------------------------------------------------------------- per-format extras

def test_hh_rlhf_variants():
    row = {"chosen": "Human: Hi\n\nAssistant:  Hello!  ", "rejected": None}
    assert one("hh-rlhf", row) == rec([U("Hi")], "Hello!", None)
    assert "bad_dialogue" in str(bad("hh-rlhf", {"chosen": "Hi\n\nAssistant: Hello", "rejected": None}))
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nHuman: ?"}
    err = bad("hh-rlhf", row)
    assert err.column == "rejected" and "no_assistant_reply" in str(err)
    assert bad("hh-rlhf", {"rejected": "\n\nHuman: Hi\n\nAssistant: Hello"}).column == "chosen"


def test_nectar_prompt_without_open_assistant_slot_and_rank_ties():
    row = {"prompt": "\n\nHuman: Pick one.", "answers": [
        {"answer": "B", "rank": 2, "model": "m"}, {"answer": "A", "rank": 1, "model": "m"},
        {"answer": "C", "rank": 2, "model": "m"}]}
    assert one("nectar", row) == rec([U("Pick one.")], "A", ["B", "C"])
    assert one("nectar", {**row, "answers": row["answers"][1:2]})["negatives"] is None
    wrong = {**row, "answers": [{"answer": "A", "rank": "1", "model": "m"}]}
    assert "wrong_type" in str(bad("nectar", wrong))


def test_ultrafeedback_missing_scores_keep_order():
    row = {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go away")],
           "score_chosen": None, "score_rejected": 9.0}
    assert one("ultrafeedback", row) == rec([U("Hi")], "Hello", ["Go away"])
    assert bad("ultrafeedback", {**row, "score_chosen": "high"}).column == "score_chosen"


def test_pku_both_unsafe_ordered_by_index_when_response_1_is_safer():
    row = load("pku_saferlhf.jsonl")[1] | {"safer_response_id": 1}
    assert one("pku-saferlhf", row)["negatives"] == [row["response_0"], row["response_1"]]


def test_trl_prompt_completion_conversational_unpaired_and_prompt_only():
    conv = {"prompt": [U("What color is the sky?")], "completion": [A("It is blue.")]}
    assert one("trl", conv) == rec([U("What color is the sky?")], "It is blue.", None)
    assert one("trl", conv | {"label": False}) == rec([U("What color is the sky?")], None, ["It is blue."])
    assert one("trl", {"prompt": "The sky is", "completion": " blue.", "label": True})["target"] == " blue."
    assert one("trl", {"prompt": "The sky is"}) == rec([U("The sky is")], None, None)
    assert bad("trl", conv | {"label": "yes"}).column == "label"
    assert bad("trl", {"prompt": "The sky is", "completion": [A("blue")]}).column == "completion"


def test_trl_implicit_type_mismatch_and_prefix_without_space():
    err = bad("trl", {"chosen": [U("Hi"), A("Hello")], "rejected": "Hello"})
    assert err.column == "rejected" and "wrong_type" in str(err)
    assert one("trl", {"chosen": "Answer:yes", "rejected": "Answer:no"}) == rec([U("Answer:")], "yes", ["no"])


def test_generic_field_names_and_defaults():
    fields = FieldNames(prompt="question", target="best", negatives="bad")
    row = {"question": "Q?", "best": "A.", "bad": ["B.", "C."], "prompt": "ignored"}
    assert one("prompt", row, fields) == rec([U("Q?")], "A.", ["B.", "C."])
    err = bad("prompt", {"prompt": "Q?"}, fields)
    assert err.column == "question" and "missing_column" in str(err)
    alpaca = {"instruction": "Give a synonym of big.", "input": "", "output": "large"}
    assert one("prompt", alpaca) == rec([U("Give a synonym of big.")], "large", None)
    trl_like = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert one("prompt", trl_like) == rec([U("The sky is")], " blue.", [" green."])
    assert bad("prompt", {"prompt": "x", "chosen": [A("y")]}).column == "chosen"
    conv = FieldNames(messages="conversation", target="reply")
    row = {"conversation": [U("Hi")], "reply": "Hello"}
    assert one("messages", row, conv) == rec([U("Hi")], "Hello", None)


def test_generic_messages_keeps_only_role_and_content():
    row = {"messages": [{"role": "user", "content": "Hi", "name": "bob"}], "target": "Hello"}
    assert one("messages", row) == rec([U("Hi")], "Hello", None)


# ------------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detect_format_on_fixture_columns(name):
    fmt = EXPECTED[name][0]
    if name in ("hh_rlhf.jsonl", "trl_implicit.jsonl"):  # bare chosen/rejected: HH strings or TRL implicit
        with pytest.raises(BadInput) as err:
            detect_format(columns(name), FieldNames())
        assert "hh-rlhf or trl" in str(err.value) and "--format" in str(err.value)
    else:
        assert detect_format(columns(name), FieldNames()) == fmt


@pytest.mark.parametrize(("cols", "fields", "expected"), [
    (["instruction", "input", "output"], FieldNames(), "prompt"),
    (["question", "answer"], FieldNames(), "prompt"),
    (["conversations", "negatives"], FieldNames(), "messages"),
    (["question", "chosen", "rejected"], FieldNames(prompt="question"), "prompt"),
    (["chosen", "rejected"], FieldNames(target="chosen", prompt=None), None),
    (["conv", "chosen"], FieldNames(messages="conv"), "messages"),
    (["prompt", "best"], FieldNames(target="best"), "prompt"),
    (["prompt", "completion", "label"], FieldNames(), "trl"),
    (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"],
     FieldNames(), "ultrafeedback"),
])
def test_detect_format_cases(cols, fields, expected):
    if expected is None:
        with pytest.raises(BadInput):
            detect_format(cols, fields)
    else:
        assert detect_format(cols, fields) == expected


@pytest.mark.parametrize(("cols", "candidates"), [
    (["messages"], "messages or ultrachat"),
    (["prompt", "messages", "target"], "messages or prompt"),
    (["chosen", "rejected", "id"], "hh-rlhf or trl"),
    (["text"], " or ".join(FORMATS)),
])
def test_detect_format_ambiguous(cols, candidates):
    with pytest.raises(BadInput) as err:
        detect_format(cols, FieldNames())
    assert candidates in str(err.value) and "Pass --format NAME" in str(err.value)


def test_detect_format_names_a_missing_configured_column():
    with pytest.raises(BadInput) as err:
        detect_format(["prompt", "target"], FieldNames(prompt="nope"))
    assert err.value.column == "nope" and "prompt, target" in str(err.value)
