"""Grouped log-probs: one prompt, many responses, the prompt through the model once (SPEC §1.1, issue 10.3).

A batch is a list of groups `(prompt_ids, [response_ids, ...])`. :func:`pack` lays each group out in one row,
`[x, y₁, …, yₖ]`, with a block attention mask (a token sees the earlier tokens of its own block and its group's
prompt, nothing else) and position ids that restart at the prompt length for every response, so each response
sees exactly what it would see in a row of its own. :func:`pad` is the plain batch — one right-padded row
per (prompt, response) — kept as the oracle (`--no-share-prompt`). :func:`sequence_logps` runs either layout and
returns the **summed** log-prob of each response (prompt masked, EOS included) in group order.

The mask is boolean (True = attend), shape (B, 1, L, L); transformers' SDPA path takes such a 4D mask unchanged.
The first token of each response is predicted from the last prompt token, so the gather uses explicit predictor
positions instead of the usual shift, and only those positions go through the LM head (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def pack(groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """One row per group, right-padded to the longest: input_ids, position_ids, a (B, 1, L, L) bool mask, and the
    gather plan (`logit_pos`: flat index into (B × L) of the position whose logits predict `targets`; `segment`:
    the response each target belongs to). A row per group, not one row for the batch: attention costs L² per row,
    and nothing attends across groups anyway."""
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, block) per group
    for prompt, responses in groups:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        ids, pos, blk = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for b, resp in enumerate(responses, start=1):
            ids += resp
            pos += range(len(prompt), len(prompt) + len(resp))
            blk += [b] * len(resp)
        rows.append((ids, pos, blk))
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    block = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    logit_pos: list[int] = []
    targets: list[int] = []
    segment: list[int] = []
    r = 0
    for g, ((prompt, responses), (ids, pos, blk)) in enumerate(zip(groups, rows, strict=True)):
        input_ids[g, : len(ids)] = torch.tensor(ids)
        position_ids[g, : len(ids)] = torch.tensor(pos)
        block[g, : len(ids)] = torch.tensor(blk)
        s, last_prompt = g * width + len(prompt), g * width + len(prompt) - 1
        for resp in responses:
            logit_pos += [last_prompt, *range(s, s + len(resp) - 1)]
            targets += resp
            segment += [r] * len(resp)
            s += len(resp)
            r += 1
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    real = block >= 0
    visible_block = (block[:, None, :] == 0) | (block[:, :, None] == block[:, None, :])
    mask = causal[None] & visible_block & real[:, None, :] & real[:, :, None]
    mask |= torch.eye(width, dtype=torch.bool)[None] & ~real[:, :, None]  # padding sees itself: no all-masked row (NaN)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None],
            "logit_pos": torch.tensor(logit_pos), "targets": torch.tensor(targets), "segment": torch.tensor(segment),
            "num_responses": torch.tensor(r), "num_tokens": real.sum()}


def pad(groups: Sequence[Group], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The plain batch: one right-padded row `prompt + response` per response, a 2D attention mask, and the gather
    plan as flat indices into (rows × length)."""
    rows = [list(p) + list(resp) for p, responses in groups for resp in responses]
    width = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    logit_pos: list[int] = []
    targets: list[int] = []
    segment: list[int] = []
    r = 0
    for prompt, responses in groups:
        for resp in responses:
            row = list(prompt) + list(resp)
            input_ids[r, : len(row)] = torch.tensor(row)
            attention[r, : len(row)] = 1
            logit_pos += [r * width + t for t in range(len(prompt) - 1, len(row) - 1)]
            targets += resp
            segment += [r] * len(resp)
            r += 1
    return {"input_ids": input_ids, "attention_mask": attention, "logit_pos": torch.tensor(logit_pos),
            "targets": torch.tensor(targets), "segment": torch.tensor(segment), "num_responses": torch.tensor(r)}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob and token count of every response in `batch` (from :func:`pack` or :func:`pad`)."""
    logit_pos, targets, segment = batch["logit_pos"], batch["targets"], batch["segment"]
    num = int(batch["num_responses"])
    if batch["attention_mask"].dim() == 4:  # packed: only the predictor positions go through the LM head
        width = batch["input_ids"].shape[1]
        keep = torch.unique(logit_pos % width)  # sorted; the same positions are kept in every row
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False)
        logits = out.logits[logit_pos // width, torch.searchsorted(keep, logit_pos % width)]
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits.flatten(0, 1)[logit_pos]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    logps = torch.zeros(num, dtype=token_logps.dtype, device=token_logps.device).index_add(0, segment, token_logps)
    counts = torch.zeros(num, dtype=torch.long, device=segment.device).index_add(0, segment, torch.ones_like(segment))
    return logps, counts


def to_device(batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The batch on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def num_model_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that went through the model (padding excluded)."""
    return int(batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum())
