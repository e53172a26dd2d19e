"""Checker kinds on right, wrong, wrongly formatted and empty answers (issue 11)."""

from __future__ import annotations

import pytest

from negalign import checkers
from negalign.checkers import check

CASES = {
    "exact": [
        ("Paris", "Paris", True),
        ("  paris. ", "Paris", True),            # case, whitespace, one trailing period
        ("New   York", "new york", True),        # inner whitespace collapses
        ("Lyon", "Paris", False),
        ("The capital is Paris.", "Paris", False),  # right answer, wrong format
        ("Paris..", "Paris", False),             # only one trailing period is dropped
        ("", "Paris", False),
        ("   ", "Paris", False),
    ],
    "number": [
        ("42", "42", True),
        ("The answer is 42.", "42", True),
        ("answer: 1,000", "1000", True),
        ("-3.50", "-3.5", True),
        ("41", "42", False),
        ("42 apples", "42", False),              # more than a number
        ("about 42", "42", False),
        ("forty-two", "42", False),
        ("", "42", False),
        ("42", "forty-two", False),              # a target that is not a number: nothing is right
    ],
    "contains": [
        ("The capital of France is Paris.", "Paris", True),
        ("PARIS", "paris", True),
        ("It is New York, of course", "new york", True),
        ("Lyon", "Paris", False),
        ("Parisian food", "Paris", False),       # word boundaries
        ("Par is", "Paris", False),
        ("", "Paris", False),
        ("Paris", "", False),                    # an empty target matches nothing
    ],
    "json": [
        ('{"a": 1, "b": [2, 3]}', '{"b": [2, 3], "a": 1}', True),
        ('```json\n{"a": 1}\n```', '{"a": 1}', True),  # one code fence is allowed
        ("[1, 2]", "[1,2]", True),
        ('{"a": 2}', '{"a": 1}', False),
        ("{'a': 1}", '{"a": 1}', False),         # Python, not JSON
        ('Here you go: {"a": 1}', '{"a": 1}', False),
        ("1", '"1"', False),                     # number vs string
        ("", '{"a": 1}', False),
    ],
    "choice": [
        ("B", "B", True),
        ("(b)", "B", True),
        ("B) Paris", "B", True),
        ("The answer is B.", "(B)", True),
        ("C", "B", False),
        ("I think B", "B", False),               # not a clean pick
        ("Because", "B", False),
        ("A dog", "A", False),                   # a sentence starting with an article is not option A
        ("", "B", False),
    ],
}


@pytest.mark.parametrize("kind", checkers.KINDS)
def test_each_kind_has_right_wrong_misformatted_and_empty_cases(kind):
    cases = CASES[kind]
    assert len(cases) >= 6
    assert any(ok for *_, ok in cases) and any(not ok for *_, ok in cases)
    assert any(reply.strip() == "" for reply, *_ in cases)


@pytest.mark.parametrize(("kind", "reply", "target", "expected"),
                         [(k, r, t, e) for k, cases in CASES.items() for r, t, e in cases])
def test_checker(kind, reply, target, expected):
    assert check(kind, reply, target) is expected


def test_exact_each_is_exact_for_every_reply():
    replies = [reply for reply, _, _ in CASES["exact"]] + ["", " .", "Paris", "paris."]
    for target in {t for _, t, _ in CASES["exact"]} | {"", ".", "Paris"}:
        assert checkers.exact_each(replies, target) == [checkers.exact(r, target) for r in replies]


def test_no_target_is_not_scored_and_none_reply_is_empty():
    assert check("exact", "Paris", None) is None
    assert check("exact", None, "Paris") is False


def test_parsers():
    assert checkers.parse_number("The final answer is 12") == 12.0
    assert checkers.parse_number("12 + 3") is None
    assert checkers.parse_choice("Answer: (c)") == "C"
    assert checkers.normalise("  Hello   World. ") == "hello world"


def test_none_kind_leaves_open_ended_answers_unchecked():
    """`none` (e.g. one-sentence definitions): no accuracy at all, not a 0 that drags the mean down."""
    assert check("none", "A river is a stream of water.", "A river is a large natural stream of water.") is None
    assert check("none", "", "anything") is None
