"""Dataset adapters for `negalign prepare --format NAME` (SPEC §2 input, §5; issue 5).

Each format has one small converter that turns a row (a dict of plain Python values, as given by json,
`pyarrow.Table.to_pylist()` or a `datasets` row) into a prompt record::

    {"messages": [{"role", "content"}, ...],  # ends with a user turn; a system turn may come first
     "target": str | None,                    # the trusted response (SFT target)
     "negatives": list[str] | None}           # given bad responses (D2O input, DPO-on-given-pairs baseline)

A bad row raises `_Bad(reason, column, detail)`; `convert_rows` turns it into `BadInput` naming file, row and
column, or skips it and counts it by reason. No files are read or written here.

Edge-case decisions (also in docs/formats.md):
- HH-style strings ("\\n\\nHuman: " / "\\n\\nAssistant: "): each turn's surrounding whitespace is stripped.
  A dialogue must end with an Assistant turn (a trailing "Human:" is `no_assistant_reply`); an empty turn in
  the prompt is `empty_turn`; an empty final reply is `empty_target`. The rejected reply is kept, even empty.
- chosen/rejected pairs whose prompts differ (hh-rlhf, ultrafeedback) are bad rows (`prompt_mismatch`): the
  pair is not a preference pair, and silently dropping half of it would hide the problem.
- ultrachat / ultrafeedback / trl conversations must end with the assistant reply, as HH dialogues do.
- nectar: answers sorted by rank (ties keep the given order); the best is the target, the rest negatives.
- ultrafeedback: if score_chosen < score_rejected the two are swapped; ties and missing scores keep the order.
- pku-saferlhf: no target; the unsafe responses are the negatives, the less safe one first. A row with no
  unsafe response is always skipped and counted as `no_unsafe_response`, even with on_bad_row="fail".
- trl implicit prompt: the prompt is the shared prefix of chosen and rejected (message lists: whole messages;
  strings: cut before the last whitespace of the shared prefix, so no word is split).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass
from typing import Any

from negalign.errors import BadInput, UsageError

FORMATS: tuple[str, ...] = (
    "messages", "prompt", "hh-rlhf", "ultrachat", "nectar", "ultrafeedback", "pku-saferlhf", "trl",
)

#: column names tried, in order, when a FieldNames entry is None (generic formats only)
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "instruction", "question", "input"),
    "messages": ("messages", "conversation", "conversations"),
    "target": ("target", "response", "output", "answer", "completion", "chosen"),
    "negatives": ("negatives", "rejected"),
}

ROLES = ("system", "user", "assistant")


@dataclass
class FieldNames:
    """Column names for the generic formats; None = the first of DEFAULT_FIELDS that the row has."""

    prompt: str | None = None
    messages: str | None = None
    target: str | None = None
    negatives: str | None = None


class _Bad(Exception):
    """A bad row: a snake_case reason, the column at fault and a readable detail."""

    def __init__(self, reason: str, column: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.column, self.detail = reason, column, detail


class _Skip(_Bad):
    """A well-formed row with nothing to offer: always skipped and counted."""


Messages = list[dict[str, str]]
Record = dict[str, Any]


# ------------------------------------------------------------------------------------------------ checks

def _get(row: dict, col: str) -> Any:
    """row[col]; a missing or null value is a bad row."""
    value = row.get(col)
    if value is None:
        raise _Bad("missing_column", col, "missing or null")
    return value


def _text(value: Any, col: str) -> str:
    if not isinstance(value, str):
        raise _Bad("wrong_type", col, f"expected a string, got {type(value).__name__}")
    return value


def _messages(value: Any, col: str) -> Messages:
    """A list of {role, content} (string values, known roles), copied with just those two keys."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise _Bad("wrong_type", col, "expected a list of {role, content} messages with string values")
    for m in value:
        if m["role"] not in ROLES:
            raise _Bad("bad_role", col, f"unknown role {m['role']!r} (expected system, user or assistant)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(messages: Messages, col: str) -> Messages:
    """Check prompt messages: not empty, system only first, ends with a non-empty user turn, no empty turn."""
    if not messages:
        raise _Bad("empty_prompt", col, "no prompt turns")
    if any(m["role"] == "system" for m in messages[1:]):
        raise _Bad("bad_turn_order", col, "a system turn may only come first")
    if messages[-1]["role"] != "user":
        raise _Bad("bad_turn_order", col, f"the prompt must end with a user turn, not {messages[-1]['role']}")
    if not messages[-1]["content"].strip():
        raise _Bad("empty_prompt", col, "the last user turn is empty")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _Bad("empty_turn", col, f"prompt turn {i} ({m['role']}) is empty")
    return messages


def _user_prompt(value: Any, col: str) -> Messages:
    """A plain prompt string as a single user turn (content kept as is)."""
    if not _text(value, col).strip():
        raise _Bad("empty_prompt", col, "the prompt is empty")
    return [{"role": "user", "content": value}]


def _target(value: Any, col: str) -> str:
    if not _text(value, col).strip():
        raise _Bad("empty_target", col, "the target response is empty")
    return value


def _negatives(value: Any, col: str) -> list[str] | None:
    """None, a string (one negative) or a list of strings."""
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad("wrong_type", col, "expected a string or a list of strings")
    return list(value)


def _split_last_reply(messages: Messages, col: str) -> tuple[Messages, str]:
    """(prompt, reply): the conversation must end with an assistant message."""
    if not messages or messages[-1]["role"] != "assistant":
        raise _Bad("no_assistant_reply", col, "the conversation does not end with an assistant reply")
    return _prompt(messages[:-1], col), messages[-1]["content"]


def _record(messages: Messages, target: str | None, negatives: list[str] | None) -> Record:
    return {"messages": messages, "target": target, "negatives": negatives}


# ----------------------------------------------------------------------------------------- HH-style text

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(value: Any, col: str) -> Messages:
    """Split "\\n\\nHuman: …\\n\\nAssistant: …" into messages; each turn's content is stripped."""
    parts = _HH_TURN.split(_text(value, col))
    if len(parts) < 3 or parts[0].strip():
        raise _Bad("bad_dialogue", col, "expected '\\n\\nHuman: …' / '\\n\\nAssistant: …' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2], strict=True)]


# ------------------------------------------------------------------------------------------------ formats

def _column(row: dict, fields: FieldNames, kind: str) -> str | None:
    """The column to read for `kind`: the configured one, else the first default the row has."""
    name = getattr(fields, kind)
    if name is not None:
        return name
    return next((c for c in DEFAULT_FIELDS[kind] if c in row), None)


def _required_column(row: dict, fields: FieldNames, kind: str) -> str:
    col = _column(row, fields, kind)
    if col is None:
        raise _Bad("missing_column", DEFAULT_FIELDS[kind][0],
                   f"no {kind} column (looked for {', '.join(DEFAULT_FIELDS[kind])})")
    return col


def _generic_extras(row: dict, fields: FieldNames) -> tuple[str | None, list[str] | None]:
    """Optional target and negatives columns of the generic formats."""
    target_col, negatives_col = _column(row, fields, "target"), _column(row, fields, "negatives")
    target = row.get(target_col) if target_col else None
    target = None if target is None else _target(target, target_col)
    negatives = _negatives(row.get(negatives_col), negatives_col) if negatives_col else None
    return target, negatives


def _generic_messages(row: dict, fields: FieldNames) -> Record:
    """Generic: a chat messages column that ends with the user turn, plus optional target/negatives."""
    col = _required_column(row, fields, "messages")
    return _record(_prompt(_messages(_get(row, col), col), col), *_generic_extras(row, fields))


def _generic_prompt(row: dict, fields: FieldNames) -> Record:
    """Generic: a plain prompt string column, plus optional target/negatives."""
    col = _required_column(row, fields, "prompt")
    return _record(_user_prompt(_get(row, col), col), *_generic_extras(row, fields))


def _hh_rlhf(row: dict, fields: FieldNames) -> Record:
    """Anthropic/hh-rlhf: target = chosen's last reply, negative = rejected's last reply."""
    prompt, reply = _split_last_reply(_hh_turns(_get(row, "chosen"), "chosen"), "chosen")
    target = _target(reply, "chosen")
    if row.get("rejected") is None:
        return _record(prompt, target, None)
    rejected_prompt, rejected = _split_last_reply(_hh_turns(row["rejected"], "rejected"), "rejected")
    if rejected_prompt != prompt:
        raise _Bad("prompt_mismatch", "rejected", "the dialogue before the last reply differs from chosen's")
    return _record(prompt, target, [rejected])


def _ultrachat(row: dict, fields: FieldNames) -> Record:
    """HuggingFaceH4/ultrachat_200k: prompt = messages before the last (assistant) message, the target."""
    prompt, reply = _split_last_reply(_messages(_get(row, "messages"), "messages"), "messages")
    return _record(prompt, _target(reply, "messages"), None)


def _nectar(row: dict, fields: FieldNames) -> Record:
    """berkeley-nest/Nectar: HH-style prompt; answers sorted by rank, best = target, others = negatives."""
    turns = _hh_turns(_get(row, "prompt"), "prompt")
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]  # the open "\n\nAssistant:" slot
    prompt = _prompt(turns, "prompt")
    answers = _get(row, "answers")
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        raise _Bad("wrong_type", "answers", "expected a list of {answer, rank, model}")
    if not answers:
        raise _Bad("no_answers", "answers", "the list is empty")
    ranked = []
    for j, answer in enumerate(answers):
        rank = answer.get("rank")
        if rank is None:
            raise _Bad("missing_rank", "answers", f"answer {j} has no rank")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise _Bad("wrong_type", "answers", f"answer {j}: rank is a {type(rank).__name__}, not a number")
        ranked.append((rank, _text(answer.get("answer"), "answers")))
    texts = [text for _, text in sorted(ranked, key=lambda pair: pair[0])]
    return _record(prompt, _target(texts[0], "answers"), texts[1:] or None)


def _score(row: dict, col: str) -> float | None:
    value = row.get(col)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _Bad("wrong_type", col, f"expected a number, got {type(value).__name__}")
    return value


def _ultrafeedback(row: dict, fields: FieldNames) -> Record:
    """HuggingFaceH4/ultrafeedback_binarized: last replies of chosen/rejected (swapped if scores disagree)."""
    good, bad = "chosen", "rejected"
    score_chosen, score_rejected = _score(row, "score_chosen"), _score(row, "score_rejected")
    if score_chosen is not None and score_rejected is not None and score_chosen < score_rejected:
        good, bad = bad, good
    prompt, reply = _split_last_reply(_messages(_get(row, good), good), good)
    target = _target(reply, good)
    rejected_prompt, rejected = _split_last_reply(_messages(_get(row, bad), bad), bad)
    if rejected_prompt != prompt:
        raise _Bad("prompt_mismatch", bad, f"the conversation before the last reply differs from {good}'s")
    return _record(prompt, target, [rejected])


def _pku_saferlhf(row: dict, fields: FieldNames) -> Record:
    """PKU-Alignment/PKU-SafeRLHF for D2O: no target; the unsafe responses (less safe first) are negatives."""
    prompt = _user_prompt(_get(row, "prompt"), "prompt")
    unsafe = []
    for i in (0, 1):
        col = f"is_response_{i}_safe"
        safe = _get(row, col)
        if not isinstance(safe, bool):
            raise _Bad("wrong_type", col, f"expected true/false, got {type(safe).__name__}")
        if not safe:
            unsafe.append(i)
    if not unsafe:
        raise _Skip("no_unsafe_response", "is_response_0_safe", "both responses are safe")
    if len(unsafe) == 2 and row.get("safer_response_id") == 0:
        unsafe.reverse()
    return _record(prompt, None, [_text(_get(row, f"response_{i}"), f"response_{i}") for i in unsafe])


def _trl_prompt(value: Any, col: str) -> Messages:
    """A TRL prompt: a string (standard) or a message list (conversational)."""
    if isinstance(value, list):
        return _prompt(_messages(value, col), col)
    return _user_prompt(value, col)


def _trl_completion(value: Any, col: str, conversational: bool) -> str:
    """A TRL completion: a string, or exactly one assistant message."""
    if not conversational:
        return _text(value, col)
    messages = _messages(value, col)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _Bad("bad_completion", col, "expected exactly one assistant message")
    return messages[0]["content"]


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split TRL implicit-prompt chosen/rejected into (prompt, chosen completion, rejected completion)."""
    if isinstance(chosen, list):
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    else:
        chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if chosen == rejected:
        raise _Bad("identical_pair", "rejected", "chosen and rejected are identical: no completion to split")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):  # cut before the last whitespace of the shared prefix, if it has one
        n = max((i for i in range(n) if chosen[i].isspace()), default=n)
    return chosen[:n], chosen[n:], rejected[n:]


def _trl(row: dict, fields: FieldNames) -> Record:
    """TRL datasets: preference (explicit or implicit prompt), prompt-completion, unpaired, prompt-only."""
    if "chosen" in row or "rejected" in row:
        chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
        if row.get("prompt") is None:
            prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
            prompt_col = "chosen"
        else:
            prompt, prompt_col = row["prompt"], "prompt"
        conversational = isinstance(prompt, list)
        messages = _trl_prompt(prompt, prompt_col)
        target = _target(_trl_completion(chosen, "chosen", conversational), "chosen")
        return _record(messages, target, [_trl_completion(rejected, "rejected", conversational)])
    prompt = _get(row, "prompt")
    messages = _trl_prompt(prompt, "prompt")
    if row.get("completion") is None:
        return _record(messages, None, None)
    completion = _trl_completion(row["completion"], "completion", isinstance(prompt, list))
    label = row.get("label")
    if label is not None and not isinstance(label, bool):
        raise _Bad("wrong_type", "label", f"expected true/false, got {type(label).__name__}")
    if label is False:  # unpaired preference: an undesirable completion is a given negative
        return _record(messages, None, [completion])
    return _record(messages, _target(completion, "completion"), None)


_CONVERTERS: dict[str, Callable[[dict, FieldNames], Record]] = {
    "messages": _generic_messages,
    "prompt": _generic_prompt,
    "hh-rlhf": _hh_rlhf,
    "ultrachat": _ultrachat,
    "nectar": _nectar,
    "ultrafeedback": _ultrafeedback,
    "pku-saferlhf": _pku_saferlhf,
    "trl": _trl,
}
assert tuple(_CONVERTERS) == FORMATS


# ---------------------------------------------------------------------------------------------- public

def _task(row: dict, task_field: str | None) -> str | None:
    """The row's task family (for per-family eval): `task_field`, else a `task` column when present; may be null."""
    col = task_field or ("task" if "task" in row else None)
    if col is None:
        return None
    if col not in row:
        raise _Bad("missing_column", col, f"no task column '{col}'")
    value = row[col]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad("wrong_type", col, f"a task family must be a string, got {type(value).__name__}")
    return str(value).strip() or None


def convert_rows(rows: Iterable[dict], fmt: str, fields: FieldNames | None = None, *, source: str,
                 on_bad_row: str = "fail", task_field: str | None = None, row_numbers: Sequence[int] | None = None,
                 max_prompt_chars: int | None = None) -> tuple[list[Record], dict[str, int]]:
    """Convert rows of format `fmt`; returns (records, {reason: skipped rows}).

    Rows are named in errors by `row_numbers[i]` (JSONL: the line number an editor shows), else from 0.
    A prompt whose turns hold more than `max_prompt_chars` characters in all is skipped and counted
    (`prompt_too_long`) in either mode: it is well-formed, just unusable.

    A record gets `task` when the row has one: column `task_field` (default: `task` when the row has it).

    on_bad_row="fail" raises BadInput(file=source, row=i, column=…) on the first bad row; "skip" skips and
    counts it. Fine but unusable rows (pku-saferlhf: no unsafe response) are always skipped and counted.
    """
    if fmt not in _CONVERTERS:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if on_bad_row not in ("fail", "skip"):
        raise UsageError(f"on_bad_row must be 'fail' or 'skip', not {on_bad_row!r}")
    convert, fields = _CONVERTERS[fmt], fields or FieldNames()
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Bad("wrong_type", None, f"a row must be an object, got {type(row).__name__}")
            record, task = convert(row, fields), _task(row, task_field)
            chars = sum(len(m["content"]) for m in record["messages"])
            if max_prompt_chars is not None and chars > max_prompt_chars:
                raise _Skip("prompt_too_long", None, f"{chars} characters")
            if task is not None:
                record["task"] = task
            records.append(record)
        except _Skip as skip:
            skipped[skip.reason] += 1
        except _Bad as bad:
            if on_bad_row == "skip":
                skipped[bad.reason] += 1
            else:
                raise BadInput(f"{bad.detail} [{fmt}: {bad.reason}]", file=source,
                               row=row_numbers[i] if row_numbers is not None else i, column=bad.column) from None
    return records, dict(skipped)


def _ambiguous(candidates: list[str], columns: set[str], why: str) -> BadInput:
    have = ", ".join(sorted(columns)) or "none"
    return BadInput(f"cannot tell the input format from its columns ({have}): {why}; it could be "
                    f"{' or '.join(candidates)}. Pass --format NAME (one of: {', '.join(FORMATS)})")


def _detect_generic(columns: set[str], fields: FieldNames) -> str:
    """Pick "messages" or "prompt" from the field names given and the columns present."""
    for name in astuple(fields):
        if name is not None and name not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise BadInput(f"no such column; the input has: {have}", column=name)
    if fields.messages:
        return "messages"
    if fields.prompt:
        return "prompt"
    has = {kind: any(c in columns for c in names) for kind, names in DEFAULT_FIELDS.items()}
    target_or_negatives = fields.target or fields.negatives or has["target"] or has["negatives"]
    if has["messages"] and has["prompt"]:
        raise _ambiguous(["messages", "prompt"], columns, "it has both a chat and a plain prompt column")
    if has["messages"] and not target_or_negatives:
        raise _ambiguous(["messages", "ultrachat"], columns,
                         "a chat column without target/negatives is either prompts only or whole chats "
                         "whose last assistant reply is the target")
    if has["messages"]:
        return "messages"
    if has["prompt"]:
        return "prompt"
    raise _ambiguous(list(FORMATS), columns, "no known format matches")


def detect_format(columns: list[str], fields: FieldNames | None = None) -> str:
    """The format name for `--format auto`, when the columns make it unambiguous; else BadInput.

    Giving any field name (--prompt-field, …) selects the generic formats ("messages" or "prompt").
    """
    cols, fields = set(columns), fields or FieldNames()
    if any(name is not None for name in astuple(fields)):
        return _detect_generic(cols, fields)
    if {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"} <= cols:
        return "pku-saferlhf"
    if {"prompt", "answers"} <= cols:
        return "nectar"
    if {"chosen", "rejected"} <= cols:
        if {"score_chosen", "score_rejected"} & cols:
            return "ultrafeedback"
        if "prompt" in cols:
            return "trl"
        raise _ambiguous(["hh-rlhf", "trl"], cols, "'chosen'/'rejected' without 'prompt' are HH-style "
                         "dialogues (hh-rlhf) or TRL's implicit-prompt preference format")
    if {"prompt", "completion"} <= cols:
        return "trl"
    if {"messages", "prompt_id"} <= cols and not ({"target", "negatives"} & cols):
        return "ultrachat"
    return _detect_generic(cols, fields)
