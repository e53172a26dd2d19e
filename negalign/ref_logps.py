"""Reference log-probs as an artifact (issue 10.4): computed once before training, reused by every run and objective.

`RUN/ref_logps/` holds Parquet files, one row per (reference model, exact token sequence):
`ref_model` (models.model_fingerprint of the reference), `chat_template_sha`, `prompt_id`, `variant` (`plain`, or
`quality:<sha>` for Sr-*'s p⊕x), `response_sha` (sha256 of the response text), `tokens_sha` (sha256 of the prompt
and response token ids as trained, so truncation and template are part of the key), `logp` (summed, EOS included),
`num_tokens`. Lookups use (`ref_model`, `tokens_sha`). Files are written atomically every few groups, named
`part-<ref_model>-sha-<sha256 of the file>.parquet`, so a killed computation keeps what it finished, a re-run
computes only the rest, and a damaged file is refused by name (its content no longer matches). Nothing else lives
here: no reference model is held while training.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from negalign.errors import BadInput
from negalign.store import atomic_write, parquet_bytes

SCHEMA = pa.schema([("ref_model", pa.string()), ("chat_template_sha", pa.string()), ("prompt_id", pa.string()),
                    ("variant", pa.string()), ("response_sha", pa.string()), ("tokens_sha", pa.string()),
                    ("logp", pa.float64()), ("num_tokens", pa.int32())])


def tokens_sha(prompt: Sequence[int], response: Sequence[int]) -> str:
    data = np.asarray([len(prompt), *prompt, *response], dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Need:
    """One (prompt, response) whose reference log-prob a run needs."""

    prompt_id: str
    variant: str
    prompt: list[int]
    response: list[int]
    response_text: str

    @property
    def key(self) -> str:
        return tokens_sha(self.prompt, self.response)


def load(folder: Path, ref_model: str) -> dict[str, float]:
    """{tokens_sha: logp} of every cached row for this reference model; each file is checked against its name."""
    out: dict[str, float] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob(f"part-{ref_model}-*.parquet")):
        data = f.read_bytes()  # read once: hashed, then parsed
        expected = f.stem.split("-sha-")[-1] if "-sha-" in f.stem else None  # older files carry no checksum
        if expected is not None and hashlib.sha256(data).hexdigest()[:len(expected)] != expected:
            raise BadInput("corrupt reference log-prob cache file (its sha256 does not match its name); delete it "
                           "and its rows are recomputed", file=str(f))
        try:
            t = pq.read_table(pa.BufferReader(data), columns=["ref_model", "tokens_sha", "logp"])
        except (pa.ArrowException, OSError) as e:
            raise BadInput(f"unreadable reference log-prob cache file ({e}); delete it and its rows are recomputed",
                           file=str(f)) from e
        for m, k, v in zip(t.column("ref_model").to_pylist(), t.column("tokens_sha").to_pylist(),
                           t.column("logp").to_pylist(), strict=True):
            if m == ref_model:
                out[k] = v
    return out


def _write_part(folder: Path, ref_model: str, rows: list[dict[str, Any]]) -> Path:
    """Write rows atomically under a name that carries the file's own sha256."""
    data = parquet_bytes(pa.Table.from_pylist(rows, schema=SCHEMA))
    path = folder / f"part-{ref_model}-sha-{hashlib.sha256(data).hexdigest()[:32]}.parquet"
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def compute(model: Any, needs: list[Need], folder: Path, *, ref_model: str, template_sha: str,
            tokens_per_batch: int = 2048, flush_every_s: float = 60.0, on_progress=None) -> dict[str, float]:
    """Reference log-probs of `needs` (prompt-shared forward, no grad), flushed to `folder` as they come."""
    import torch

    from negalign.packing import pack, sequence_logps, to_device

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_prompt: dict[tuple[str, tuple[int, ...]], list[Need]] = {}
    seen: set[str] = set()
    for n in needs:
        if n.key not in seen:
            seen.add(n.key)
            by_prompt.setdefault((n.prompt_id, tuple(n.prompt)), []).append(n)
    groups = list(by_prompt.values())
    out: dict[str, float] = {}
    pending: list[dict[str, Any]] = []
    last_flush = time.time()

    def flush() -> None:
        nonlocal pending, last_flush
        if pending:
            _write_part(folder, ref_model, pending)
            pending = []
        last_flush = time.time()

    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(groups):
            batch, size = [], 0
            while i < len(groups) and (not batch or size + _group_tokens(groups[i]) <= tokens_per_batch):
                batch.append(groups[i])
                size += _group_tokens(groups[i])
                i += 1
            with torch.inference_mode():
                logps, counts = sequence_logps(model, to_device(pack([(g[0].prompt, [n.response for n in g])
                                                                     for g in batch]), model))
            flat = [n for g in batch for n in g]
            for n, lp, c in zip(flat, logps.tolist(), counts.tolist(), strict=True):
                out[n.key] = lp
                pending.append({"ref_model": ref_model, "chat_template_sha": template_sha,
                                "prompt_id": n.prompt_id, "variant": n.variant,
                                "response_sha": text_sha(n.response_text), "tokens_sha": n.key, "logp": lp,
                                "num_tokens": c})
            if on_progress is not None:
                on_progress(len(flat))
            if time.time() - last_flush > flush_every_s:
                flush()
        flush()
    finally:
        model.train(was_training)
    return out


def _group_tokens(group: list[Need]) -> int:
    return len(group[0].prompt) + sum(len(n.response) for n in group)

