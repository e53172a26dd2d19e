"""Preference losses of the four papers (SPEC §1) as pure functions: no I/O, no model.

Inputs are **summed** response log-probs (prompt masked, EOS included): `*_chosen` of shape (B,), `*_rejected` of
shape (B, K) (a (B,) tensor counts as K = 1). `r(y) = logp(π, x, y) − logp(πref, x, y)`. Every function returns
`(loss, metrics)`: `loss` a scalar tensor averaged over prompts (and over the K negatives inside a prompt), `metrics` a
dict of floats computed from detached tensors: `rewards/chosen`, `rewards/rejected` (β·r, as TRL reports them),
`rewards/margin`, `rewards/accuracy` and the objective's own term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISPLACEMENT_THRESHOLD = -0.5
"""Nats per token. `train` warns of likelihood displacement when the chosen answer's mean log-ratio to the reference,
`logratio/chosen_per_token` = (logp(π, y*) − logp(πref, y*)) / |y*|, over the last 10 % of the logged steps is below
this. A heuristic, chosen so: at −0.5 the chosen's tokens keep on average e^−0.5 ≈ 61 % of their reference
probability, so a 5-token answer keeps e^−2.5 ≈ 8 % of its sequence probability and greedy decoding may no
longer give it back; and it is far outside the drift that a healthy DPO run needs, since the paper's ~200-token
answers reach a comfortable margin with about 0.07 nats per token in all. A small fall of the chosen is common in
DPO (arXiv 2402.13228, 2410.08847) and does not trigger it."""

DISPLACEMENT_WINDOW = 0.1
"""The share of the logged steps (at least one) that `train`'s warning and `report`'s displacement plot average
over: one step holds only a few groups, so single steps are noisy."""


def displacement_window(num_steps: int) -> int:
    """How many consecutive logged steps one displacement mean covers."""
    return max(1, math.ceil(num_steps * DISPLACEMENT_WINDOW))


def displacement_means(values: list[float]) -> list[float]:
    """The mean of every `displacement_window(len(values))` consecutive logged values; the last is the run's end."""
    n = displacement_window(len(values))
    return [sum(values[i:i + n]) / n for i in range(len(values) - n + 1)]

Metrics = dict[str, float]


def _as_bk(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-1) if t.dim() == 1 else t


def _metrics(beta: float, r_chosen: torch.Tensor, r_rejected: torch.Tensor, logits: torch.Tensor) -> Metrics:
    """β-scaled rewards of (B,) chosen and (B, K) rejected; margin and accuracy from the loss's own logits."""
    with torch.no_grad():
        c, r = beta * r_chosen.detach().float(), beta * r_rejected.detach().float()
        lg = logits.detach().float()
        return {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
                "rewards/margin": (c.unsqueeze(-1) - r).mean().item(),
                "rewards/accuracy": (lg > 0).float().mean().item()}


def _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected):
    r_c = policy_chosen - ref_chosen
    r_r = _as_bk(policy_rejected) - _as_bk(ref_rejected)
    return r_c, r_r, r_c.unsqueeze(-1) - r_r  # h: (B, K)


def sc(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
       ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Self-Contrast loss (Liu et al. 2024, https://arxiv.org/abs/2404.00604): DPO with one chosen and K negatives.

    .. math::

        L = \\mathrm{mean}_x \\frac{1}{K} \\sum_{i=1}^{K} -\\log \\sigma\\big(\\beta\\,(r(y^*) - r(y_i^-))\\big)

    `y*` is counted once per group; the value and gradient equal the reference code's expansion into K DPO pairs
    averaged together (each recomputing `y*`).
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    logits = beta * h
    loss = -F.logsigmoid(logits).mean()
    return loss, _metrics(beta, r_c, r_r, logits)


def dpo(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """DPO loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), TRL's `sigmoid` loss.

    .. math::

        L = \\mathrm{mean}_x -\\log \\sigma\\big(\\beta\\,(r(y_w) - r(y_l))\\big)

    `policy_rejected`/`ref_rejected` are (B,) or (B, 1). With K > 1 negatives use :func:`sc`.
    """
    if _as_bk(policy_rejected).shape[-1] != 1:
        raise ValueError("dpo takes one rejected response per prompt; use sc for K > 1")
    return sc(policy_chosen, ref_chosen, policy_rejected, ref_rejected, beta)


def dpop(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
         ref_rejected: torch.Tensor, beta: float = 0.1, lam: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """DPO-Positive (Pal et al. 2024, "Smaug", https://arxiv.org/abs/2402.13228): `sc`/`dpo` with a penalty that
    stops the chosen answer's likelihood from falling below the reference's.

    .. math::

        L = \\mathrm{mean}_x \\frac{1}{K} \\sum_{i=1}^{K}
            -\\log \\sigma\\big(\\beta\\,(r(y^*) - r(y_i^-) - \\lambda \\max(0, -r(y^*)))\\big)

    `max(0, −r(y*)) = max(0, log πref(y*|x) − log π(y*|x))` is zero while the policy gives the chosen at least the
    reference's (summed) log-prob; below it, each nat the chosen loses costs λ nats of margin. λ = 0 is :func:`sc`
    exactly. Summed log-probs and K negatives per group as in :func:`sc`; the metrics add `dpop_penalty`, the mean
    of `max(0, −r(y*))`.
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    penalty = torch.clamp(-r_c, min=0.0)  # (B,)
    logits = beta * (h - lam * penalty.unsqueeze(-1))
    loss = -F.logsigmoid(logits).mean()
    return loss, {**_metrics(beta, r_c, r_r, logits), "dpop_penalty": penalty.detach().float().mean().item()}


def ipo(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO loss (Azar et al. 2023, https://arxiv.org/abs/2310.12036) on **summed** log-probs.

    .. math::

        L = \\mathrm{mean}_x \\frac{1}{K} \\sum_i \\big(h_i - \\tfrac{1}{2\\beta}\\big)^2,
        \\quad h_i = r(y^+) - r(y_i^-)

    TRL 1.16 divides each log-ratio by its response's token count first (per-token IPO); negalign follows SPEC §1.2 and
    the Sr-IPO paper and uses sums, so the same β means a larger target margin here than in TRL.
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(beta, r_c, r_r, h - 1.0 / (2.0 * beta))


def _quality_delta(policy_chosen_q, policy_rejected_q, ref_chosen_q, ref_rejected_q, beta) -> torch.Tensor:
    """Δ = stopgrad(β·[r(y⁺|p⊕x) − r(y⁻|p⊕x)]), shape (B, K)."""
    with torch.no_grad():
        _, _, h_q = _pair_terms(policy_chosen_q.detach(), ref_chosen_q, policy_rejected_q.detach(), ref_rejected_q)
        return beta * h_q


def sr_dpo(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
           ref_rejected: torch.Tensor, policy_chosen_q: torch.Tensor, policy_rejected_q: torch.Tensor,
           ref_chosen_q: torch.Tensor, ref_rejected_q: torch.Tensor, beta: float = 0.1,
           lam: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """Sr-DPO loss (Yu et al. 2024, https://arxiv.org/abs/2405.21040), quality-aware self-refinement.

    .. math::

        h = r(y^+|x) - r(y^-|x), \\quad
        \\Delta = \\mathrm{sg}\\big(\\beta\\,[r(y^+|p\\oplus x) - r(y^-|p\\oplus x)]\\big), \\quad
        L = -\\log \\sigma(\\beta h - \\lambda \\Delta)

    The `_q` tensors are the log-probs with the quality prompt `p` prepended; no gradient flows through Δ.
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    delta = _quality_delta(policy_chosen_q, policy_rejected_q, ref_chosen_q, ref_rejected_q, beta)
    logits = beta * h - lam * delta
    loss = -F.logsigmoid(logits).mean()
    return loss, {**_metrics(beta, r_c, r_r, logits), "delta": delta.float().mean().item()}


def sr_ipo(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
           ref_rejected: torch.Tensor, policy_chosen_q: torch.Tensor, policy_rejected_q: torch.Tensor,
           ref_chosen_q: torch.Tensor, ref_rejected_q: torch.Tensor, beta: float = 0.1,
           lam: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """Sr-IPO loss (Yu et al. 2024, https://arxiv.org/abs/2405.21040) on summed log-probs.

    .. math::

        L = \\big(h - \\lambda \\Delta - \\tfrac{1}{2\\beta}\\big)^2 \\quad (h, \\Delta \\text{ as in } sr\\_dpo)
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    delta = _quality_delta(policy_chosen_q, policy_rejected_q, ref_chosen_q, ref_rejected_q, beta)
    inner = h - lam * delta - 1.0 / (2.0 * beta)
    loss = (inner ** 2).mean()
    return loss, {**_metrics(beta, r_c, r_r, inner), "delta": delta.float().mean().item()}


def selm(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
         ref_rejected: torch.Tensor, policy_yref: torch.Tensor, ref_yref: torch.Tensor, beta: float = 0.01,
         alpha: float = 0.001) -> tuple[torch.Tensor, Metrics]:
    """SELM loss (Zhang et al. 2024, https://arxiv.org/abs/2405.19332), optimism-regularised DPO.

    .. math::

        L = \\mathrm{mean}_x \\Big[-\\log \\sigma\\big(\\beta(r(y_w) - r(y_l))\\big)
            + \\alpha\\beta\\,\\big(\\log\\pi(y_{ref}|x) - \\log\\pi_{ref}(y_{ref}|x)\\big)\\Big]

    `y_ref` is the reference model's greedy response; the gradient flows through `logp(π, x, y_ref)`.
    With K > 1 negatives the DPO term is the mean over them.
    """
    r_c, r_r, h = _pair_terms(policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    logits = beta * h
    optimism = policy_yref - ref_yref
    loss = (-F.logsigmoid(logits).mean(-1) + alpha * beta * optimism).mean()
    return loss, {**_metrics(beta, r_c, r_r, logits), "optimism": optimism.detach().float().mean().item()}


def d2o(policy_anchors: torch.Tensor, ref_anchors: torch.Tensor, policy_negatives: torch.Tensor,
        ref_negatives: torch.Tensor, beta: float = 0.1, alpha: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """D2O loss (Duan et al. 2024, https://arxiv.org/abs/2403.03419), distributional dispreference optimisation.

    .. math::

        L = -\\log \\sigma\\Big(\\frac{\\beta}{K} \\sum_{i=1}^{K} r(y_i) - \\alpha\\, r(y_l)\\Big)

    Anchors `y_i ~ πref` are (B, K) self-samples; negatives `y_l` are (B, M) given bad responses, and the loss is
    averaged over the M negatives. Note β/K on the anchor term and α (not β) on the negative.
    """
    r_a = _as_bk(policy_anchors) - _as_bk(ref_anchors)
    r_n = _as_bk(policy_negatives) - _as_bk(ref_negatives)
    anchor = beta * r_a.mean(-1)  # (β/K)·Σ_i r(y_i)
    logits = anchor.unsqueeze(-1) - alpha * r_n
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {"rewards/chosen": anchor.detach().float().mean().item(),
                   "rewards/rejected": (alpha * r_n.detach().float()).mean().item(),
                   "rewards/margin": logits.detach().float().mean().item(),
                   "rewards/accuracy": (logits.detach() > 0).float().mean().item(),
                   "anchor": r_a.detach().float().mean().item()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------- over a group

@dataclass
class Group:
    """One step's summed log-probs in the objective's layout (train.py's docstring), each of shape (B, n):
    `sft` [chosen]; `dpo`/`ipo`/`sc`/`sr-*` [chosen, rejected₁..K]; `selm` [chosen, rejected₁..K, y_ref];
    `d2o` [anchor₁..K, negative₁..M]. `counts` are the responses' token counts (EOS included); `ref` the reference's
    log-probs (None for `sft`); `policy_q`/`ref_q` the same responses after the quality prompt p ⊕ x (Sr-* only;
    the policy's computed without gradient)."""

    policy: torch.Tensor
    counts: torch.Tensor
    ref: torch.Tensor | None = None
    policy_q: torch.Tensor | None = None
    ref_q: torch.Tensor | None = None


@dataclass(frozen=True)
class Params:
    """The objectives' hyper-parameters (train resolves the paper defaults of beta/alpha)."""

    beta: float = 0.1
    alpha: float = 0.1
    lam: float = 0.5
    dpop_lambda: float = 0.0
    sft_weight: float = 0.0
    num_negatives: int = 1
    num_anchors: int = 8


def chosen_nll(g: Group) -> torch.Tensor:
    """The SFT loss: mean token NLL of the chosen (column 0), Σ −logp / Σ tokens over the batch."""
    return -g.policy[:, 0].sum() / g.counts[:, 0].sum().clamp(min=1)


def _pairs(g: Group, p: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy chosen, ref chosen, policy rejected (B, K), ref rejected (B, K)) of a [chosen, rejected₁..K, …] group."""
    k = p.num_negatives
    assert g.ref is not None
    return g.policy[:, 0], g.ref[:, 0], g.policy[:, 1:1 + k], g.ref[:, 1:1 + k]


def _dpo_logit_group(fn: Callable[..., tuple[torch.Tensor, Metrics]]) -> Callable[[Group, Params],
                                                                                 tuple[torch.Tensor, Metrics]]:
    """`sc`/`dpo` over a group, or :func:`dpop` when `--dpop-lambda` is set (λ = 0 is the plain loss)."""
    def group_loss(g: Group, p: Params) -> tuple[torch.Tensor, Metrics]:
        if p.dpop_lambda:
            return dpop(*_pairs(g, p), beta=p.beta, lam=p.dpop_lambda)
        return fn(*_pairs(g, p), beta=p.beta)
    return group_loss


def _sr_group(fn: Callable[..., tuple[torch.Tensor, Metrics]]) -> Callable[[Group, Params], tuple[torch.Tensor,
                                                                                                    Metrics]]:
    def group_loss(g: Group, p: Params) -> tuple[torch.Tensor, Metrics]:
        k = p.num_negatives
        assert g.policy_q is not None and g.ref_q is not None
        return fn(*_pairs(g, p), policy_chosen_q=g.policy_q[:, 0], policy_rejected_q=g.policy_q[:, 1:1 + k],
                  ref_chosen_q=g.ref_q[:, 0], ref_rejected_q=g.ref_q[:, 1:1 + k], beta=p.beta, lam=p.lam)
    return group_loss


def _selm_group(g: Group, p: Params) -> tuple[torch.Tensor, Metrics]:
    assert g.ref is not None
    return selm(*_pairs(g, p), policy_yref=g.policy[:, -1], ref_yref=g.ref[:, -1], beta=p.beta, alpha=p.alpha)


def _d2o_group(g: Group, p: Params) -> tuple[torch.Tensor, Metrics]:
    a = p.num_anchors
    assert g.ref is not None
    return d2o(g.policy[:, :a], g.ref[:, :a], g.policy[:, a:], g.ref[:, a:], beta=p.beta, alpha=p.alpha)


def _chosen_and_rejected(p: Params) -> dict[str, slice]:
    return {"chosen": slice(0, 1), "rejected": slice(1, 1 + p.num_negatives)}


@dataclass(frozen=True)
class Objective:
    """One row of the dispatch table: the loss over a group, which layout columns are logged as which side
    (`logps/SIDE`, `logratio/SIDE`, `logratio/SIDE_per_token`), and whether `--sft-weight` adds the chosen's NLL."""

    loss: Callable[[Group, Params], tuple[torch.Tensor, Metrics]]
    sides: Callable[[Params], dict[str, slice]] = _chosen_and_rejected
    sft_term: bool = True


LOSSES: dict[str, Objective] = {
    "sft": Objective(lambda g, p: (chosen_nll(g), {}), sides=lambda p: {"chosen": slice(0, 1)}, sft_term=False),
    "dpo": Objective(_dpo_logit_group(dpo)),
    "ipo": Objective(lambda g, p: ipo(*_pairs(g, p), beta=p.beta)),
    "sc": Objective(_dpo_logit_group(sc)),
    "sr-dpo": Objective(_sr_group(sr_dpo)),
    "sr-ipo": Objective(_sr_group(sr_ipo)),
    "selm": Objective(_selm_group),
    "d2o": Objective(_d2o_group, sides=lambda p: {"anchors": slice(0, p.num_anchors),
                                                  "rejected": slice(p.num_anchors, None)}, sft_term=False),
}
"""Every objective of SPEC §1, by its `--objective` name: the only place `train` looks a loss up."""


def likelihood_metrics(g: Group, sides: dict[str, slice]) -> Metrics:
    """Per side (e.g. chosen, rejected): the policy's summed log-prob `logps/SIDE`, and with a reference its log-ratio
    `logratio/SIDE` = logp(π) − logp(πref) and `logratio/SIDE_per_token` (divided by the response's token count),
    each a mean over the batch and the side's columns. A falling `logratio/chosen` is likelihood displacement."""
    out: Metrics = {}
    with torch.no_grad():
        for side, cols in sides.items():
            lp = g.policy[:, cols].detach().double()
            out[f"logps/{side}"] = lp.mean().item()
            if g.ref is not None:
                ratio = lp - g.ref[:, cols].double()
                out[f"logratio/{side}"] = ratio.mean().item()
                out[f"logratio/{side}_per_token"] = (ratio / g.counts[:, cols].clamp(min=1)).mean().item()
    return out


def group_loss(objective: str, g: Group, p: Params) -> tuple[torch.Tensor, Metrics]:
    """The objective's loss over a group (plus `sft_weight` × the chosen's NLL where the layout has a chosen), and
    its metrics: the loss's own, the likelihood metrics and `sft_nll`."""
    row = LOSSES[objective]
    loss, metrics = row.loss(g, p)
    nll = chosen_nll(g)
    if row.sft_term and p.sft_weight:
        loss = loss + p.sft_weight * nll
    return loss, {**metrics, **likelihood_metrics(g, row.sides(p)), "sft_nll": nll.detach().item()}
