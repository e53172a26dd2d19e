"""Every artifact's columns, in one place (SPEC §2): the Arrow schemas the stages write and the required columns
the store checks when it opens an output.

`REQUIRED[kind]` maps a required column to a predicate on its Arrow type (extra columns are allowed, and a column
may be wider than written, e.g. large_list); the `*_SCHEMA` constants are what the stages write. Pure data: this
module imports nothing from negalign.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# ----------------------------------------------------------------------------------------------- written schemas

PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("target", pa.string()),
    ("negatives", pa.list_(pa.string())),
    ("task", pa.string()),  # optional family name for per-family eval; older prompts folders lack it
])

SAMPLE_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("text", pa.string()), ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("seed", pa.int64()), ("engine", pa.string()), ("model", pa.string()),
])


def embed_schema(dim: int) -> pa.Schema:
    """embed's rows: one per unique text, its L2-normalised embedding as a fixed-size float32 list."""
    return pa.schema([
        ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("source", pa.string()), ("text_sha", pa.string()),
        ("is_empty", pa.bool_()), ("embedding", pa.list_(pa.float32(), dim)),
    ])


NEGATIVES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("text_sha", pa.string()),
    ("sim_to_target", pa.float32()), ("rank", pa.int32()), ("kept", pa.bool_()), ("drop_reason", pa.string()),
])

PAIR_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)), ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())), ("rejected_sim", pa.list_(pa.float32())),
    ("rejected_idx", pa.list_(pa.int32())), ("num_kept", pa.int32()), ("anchors", pa.list_(pa.string())),
    ("negatives", pa.list_(pa.string())), ("y_ref", pa.string()),
])
TRL_SCHEMA = pa.schema([("prompt", pa.list_(MESSAGE)), ("chosen", pa.list_(MESSAGE)), ("rejected", pa.list_(MESSAGE))])

SCORES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("task", pa.string()), ("text", pa.string()),
    ("target", pa.string()), ("num_tokens", pa.int32()), ("finish_reason", pa.string()),
    ("checker_kind", pa.string()), ("correct", pa.bool_()), ("embed_sim", pa.float32()),
    ("reward", pa.float32()), ("reward_target", pa.float32()), ("win", pa.float32()),
])
PREF_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("task", pa.string()), ("reward_chosen", pa.float64()),
    ("reward_rejected", pa.list_(pa.float64())), ("accuracy", pa.float64()),
])

# ----------------------------------------------------------------------------------------------- store checks


def _is_list_of_str(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type)


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"role", "content"} <= names


def _is_float_vector(t: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)) and pa.types.is_float32(t.value_type)


_str, _int = pa.types.is_string, pa.types.is_integer
# Required columns per stage kind (the manifest's "stage") and a predicate on their Arrow type.
REQUIRED: dict[str, dict[str, Callable[[pa.DataType], bool]]] = {
    "prompts": {"prompt_id": _str, "messages": _is_messages, "target": _str, "negatives": _is_list_of_str},
    "sample": {"prompt_id": _str, "sample_idx": _int, "text": _str, "num_tokens": _int, "finish_reason": _str,
               "seed": _int, "engine": _str, "model": _str},
    "embed": {"prompt_id": _str, "sample_idx": _int, "text_sha": _str, "embedding": _is_float_vector},
    "filter": {"prompt_id": _str, "sample_idx": _int, "sim_to_target": pa.types.is_floating, "rank": _int,
               "kept": pa.types.is_boolean, "drop_reason": _str},
    "pair": {"prompt_id": _str, "messages": _is_messages, "chosen": _str, "rejected": _is_list_of_str,
             "rejected_sim": lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type),
             "anchors": _is_list_of_str, "y_ref": _str},
}
