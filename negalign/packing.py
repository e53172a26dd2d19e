"""Grouped log-probs: one prompt, many responses, the prompt through the model once (SPEC §1.1, issue 10.3).

A batch is a list of groups `(prompt_ids, [response_ids, ...])`. :func:`pack` lays all of them out in ONE row:
`[x₁, y₁₁, …, y₁ₖ, x₂, y₂₁, …]` with a block attention mask (a token sees the earlier tokens of its own block and
its group's prompt, nothing else) and position ids that restart at the prompt length for every response, so each
response sees exactly what it would see in a row of its own. :func:`pad` is the plain batch — one right-padded row
per (prompt, response) — kept as the oracle (`--no-share-prompt`). :func:`sequence_logps` runs either layout and
returns the **summed** log-prob of each response (prompt masked, EOS included) in group order.

The mask is boolean (True = attend), shape (1, 1, L, L); transformers' SDPA path takes such a 4D mask unchanged.
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
    """One packed row for all groups: input_ids, position_ids, a (1, 1, L, L) bool mask, and the gather plan
    (`logit_pos`: position whose logits predict `targets`; `segment`: the response each target belongs to)."""
    ids: list[int] = []
    pos: list[int] = []
    grp: list[int] = []
    blk: list[int] = []
    logit_pos: list[int] = []
    targets: list[int] = []
    segment: list[int] = []
    r = 0
    for g, (prompt, responses) in enumerate(groups):
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        start = len(ids)
        ids += prompt
        pos += range(len(prompt))
        grp += [g] * len(prompt)
        blk += [0] * len(prompt)
        last_prompt = start + len(prompt) - 1
        for b, resp in enumerate(responses, start=1):
            s = len(ids)
            ids += resp
            pos += range(len(prompt), len(prompt) + len(resp))
            grp += [g] * len(resp)
            blk += [b] * len(resp)
            logit_pos += [last_prompt, *range(s, s + len(resp) - 1)]
            targets += resp
            segment += [r] * len(resp)
            r += 1
    gt, bt = torch.tensor(grp), torch.tensor(blk)
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril_()
    same_group = gt[:, None] == gt[None, :]
    visible_block = (bt[None, :] == 0) | (bt[:, None] == bt[None, :])
    mask = causal & same_group & visible_block
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "attention_mask": mask[None, None],
            "logit_pos": torch.tensor(logit_pos), "targets": torch.tensor(targets), "segment": torch.tensor(segment),
            "num_responses": torch.tensor(r)}


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
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"], logits_to_keep=logit_pos, use_cache=False)
        logits = out.logits[0]
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits.flatten(0, 1)[logit_pos]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    logps = torch.zeros(num, dtype=token_logps.dtype, device=token_logps.device).index_add(0, segment, token_logps)
    counts = torch.zeros(num, dtype=torch.long, device=segment.device).index_add(0, segment, torch.ones_like(segment))
    return logps, counts


def num_model_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that went through the model (padding excluded)."""
    mask = batch["attention_mask"]
    return int(batch["input_ids"].numel() if mask.dim() == 4 else mask.sum())
