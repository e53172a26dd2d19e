"""Checker kinds for `eval`: is a reply correct against its target? Each kind is a pure function (reply, target).

- `exact`: equal after stripping whitespace (inner runs collapse to one space), case and one trailing period.
- `number`: the reply is only a number, or "the answer is N" (also "answer: N"); it equals the target's number.
  Thousands separators ("1,000") and a trailing period are allowed; "12 apples" or "about 12" are not.
- `contains`: the target (normalised as for `exact`) occurs in the reply on word boundaries.
- `json`: the reply (optionally inside one ```json fence) parses as JSON and equals the parsed target.
- `choice`: the reply picks the target's option label: "B", "(B)", "B.", "B) text", "the answer is B".

An empty reply is always wrong. A target that does not fit the kind (a `number` target that is not a number,
a `json` target that does not parse) makes every reply wrong, so a misconfigured checker shows up as 0 %.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

KINDS = ("exact", "number", "contains", "json", "choice")
NONE = "none"  # an open-ended family: no checker, embed-sim (and a reward model) judge it


def normalise(text: str) -> str:
    """Strip, collapse whitespace, casefold, drop one trailing period."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact(reply: str, target: str) -> bool:
    r = normalise(reply)
    return bool(r) and r == normalise(target)


def exact_each(replies: list[str], target: str) -> list[bool]:
    """`exact` for many replies to one target, which is normalised once (filter: 32 samples a prompt)."""
    want = normalise(target)
    return [bool(want) and normalise(r) == want for r in replies] if want else [False] * len(replies)


_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
_ONLY_NUMBER = re.compile(rf"^\s*(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*)?\$?({_NUMBER})\s*\.?\s*$",
                          re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The number a reply states: only a number, or "the answer is N"; None otherwise."""
    m = _ONLY_NUMBER.match(text)
    if not m:
        return None
    try:
        value = float(m.group(1).replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def number(reply: str, target: str) -> bool:
    want, got = parse_number(target), parse_number(reply)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def contains(reply: str, target: str) -> bool:
    t, r = normalise(target), " ".join(reply.split()).casefold()
    if not t or not r:
        return False
    return re.search(rf"(?<!\w){re.escape(t)}(?!\w)", r) is not None


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL | re.IGNORECASE)


def _parse_json(text: str) -> tuple[bool, object]:
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    if not body.strip():
        return False, None
    try:
        return True, json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_equal(reply: str, target: str) -> bool:
    ok_t, want = _parse_json(target)
    ok_r, got = _parse_json(reply)
    return ok_t and ok_r and got == want and type(got) is type(want)


_CHOICE = re.compile(r"^\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*)?"
                     r"[(\[]?([A-Za-z]|\d{1,2})(?:[)\].:]?\s*$|[)\].:]\s+\S|\s+[-–—]\s)", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """The option label a reply picks ("B", "(b)", "B) Paris", "The answer is B."), upper-cased; None if none."""
    m = _CHOICE.match(text)
    return m.group(1).upper() if m else None


def choice(reply: str, target: str) -> bool:
    want = parse_choice(target)
    return want is not None and parse_choice(reply) == want


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact, "number": number, "contains": contains, "json": json_equal, "choice": choice,
}


def check(kind: str, reply: str | None, target: str | None) -> bool | None:
    """Whether `reply` is right under checker `kind`; None when there is no target to check against."""
    if target is None or kind == NONE:
        return None
    return CHECKERS[kind](reply or "", target)
