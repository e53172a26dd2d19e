"""losses.py against hand-computed values, against each other's special cases, and against TRL 1.16's DPO loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from negalign import losses


def nls(z: float) -> float:
    """-log σ(z) by hand."""
    return math.log1p(math.exp(-z))


def rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = (-20 * torch.rand(*shape, generator=g, dtype=torch.float64)).requires_grad_(requires_grad)
    return t


# Fixed numbers: B = 2 prompts, K = 2 negatives.
PC = torch.tensor([-10.0, -12.0], dtype=torch.float64)
RC = torch.tensor([-11.0, -12.5], dtype=torch.float64)
PR = torch.tensor([[-20.0, -15.0], [-9.0, -30.0]], dtype=torch.float64)
RR = torch.tensor([[-19.0, -16.0], [-10.0, -28.0]], dtype=torch.float64)
# r(chosen) = [1, 0.5]; r(rejected) = [[-1, 1], [1, -2]]; h = [[2, 0], [-0.5, 2.5]]
H = [[2.0, 0.0], [-0.5, 2.5]]


def test_sc_by_hand():
    loss, m = losses.sc(PC, RC, PR, RR, beta=0.1)
    want = sum(nls(0.1 * h) for row in H for h in row) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["rewards/chosen"] == pytest.approx(0.1 * 0.75)
    assert m["rewards/rejected"] == pytest.approx(0.1 * (-1 + 1 + 1 - 2) / 4)
    assert m["rewards/margin"] == pytest.approx(0.1 * sum(sum(r) for r in H) / 4)
    assert m["rewards/accuracy"] == pytest.approx(2 / 4)  # h = 0 is not a win


def test_dpo_by_hand():
    loss, m = losses.dpo(PC, RC, PR[:, 0], RR[:, 0], beta=0.5)
    assert loss.item() == pytest.approx((nls(0.5 * 2.0) + nls(0.5 * -0.5)) / 2, abs=1e-12)
    assert m["rewards/accuracy"] == 0.5
    with pytest.raises(ValueError):
        losses.dpo(PC, RC, PR, RR, beta=0.5)


def test_dpop_by_hand():
    """Per negative i: β·(r* − rᵢ⁻ − λ·max(0, −r*)), written out with floats; r* = policy − ref summed log-probs."""
    pc = torch.tensor([-10.0, -13.0, -7.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -12.5, -7.0], dtype=torch.float64)  # r* = 1 (above ref), -0.5 (below), 0 (equal)
    pr = torch.tensor([[-20.0, -15.0], [-9.0, -30.0], [-4.0, -8.0]], dtype=torch.float64)
    rr = torch.tensor([[-19.0, -16.0], [-10.0, -28.0], [-6.0, -8.5]], dtype=torch.float64)
    beta, lam = 0.1, 3.0
    logits, penalties = [], []
    for b in range(3):
        r_star = pc[b].item() - rc[b].item()
        penalties.append(max(0.0, -r_star))
        for i in range(2):
            r_neg = pr[b, i].item() - rr[b, i].item()
            logits.append(beta * (r_star - r_neg - lam * max(0.0, -r_star)))
    loss, m = losses.dpop(pc, rc, pr, rr, beta=beta, lam=lam)
    assert loss.item() == pytest.approx(sum(nls(z) for z in logits) / 6, abs=1e-6)
    assert m["dpop_penalty"] == pytest.approx(sum(penalties) / 3, abs=1e-6)
    assert m["rewards/accuracy"] == pytest.approx(sum(z > 0 for z in logits) / 6)
    assert m["rewards/chosen"] == pytest.approx(beta * (1 - 0.5 + 0) / 3)  # rewards are β·r, not penalised
    # The penalty pulls the chosen up once it is below the reference (row 1), and not above it (row 0).
    pc_ = pc.clone().requires_grad_()
    g = torch.autograd.grad(losses.dpop(pc_, rc, pr, rr, beta=beta, lam=lam)[0], pc_)[0]
    g0 = torch.autograd.grad(losses.sc(pc_, rc, pr, rr, beta=beta)[0], pc_)[0]
    assert g[1] < g0[1] < 0 and g[0] == pytest.approx(g0[0].item(), abs=1e-12)
    for t in m.values():
        assert isinstance(t, float)  # detached numbers for logging


def test_dpop_lambda0_equals_sc_and_k1_equals_dpo():
    B, K = 4, 3
    pc, rc, pr, rr = rand(B, seed=50), rand(B, seed=51), rand(B, K, seed=52), rand(B, K, seed=53)
    a, ma = losses.dpop(pc, rc, pr, rr, beta=0.1, lam=0.0)
    b, mb = losses.sc(pc, rc, pr, rr, beta=0.1)
    assert a.item() == b.item()
    assert {k: v for k, v in ma.items() if k != "dpop_penalty"} == mb
    c, _ = losses.dpop(pc, rc, pr[:, :1], rr[:, :1], beta=0.1, lam=0.0)
    assert c.item() == pytest.approx(losses.dpo(pc, rc, pr[:, 0], rr[:, 0], beta=0.1)[0].item(), abs=1e-12)


def test_ipo_by_hand():
    loss, _ = losses.ipo(PC, RC, PR, RR, beta=0.25)  # 1/(2β) = 2
    want = sum((h - 2.0) ** 2 for row in H for h in row) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)


PCQ = torch.tensor([-9.0, -11.0], dtype=torch.float64)
RCQ = torch.tensor([-10.0, -11.0], dtype=torch.float64)
PRQ = torch.tensor([[-21.0, -15.0], [-9.5, -31.0]], dtype=torch.float64)
RRQ = torch.tensor([[-20.0, -16.0], [-10.0, -29.0]], dtype=torch.float64)
# r_q(chosen) = [1, 0]; r_q(rejected) = [[-1, 1], [0.5, -2]]; h_q = [[2, 0], [-0.5, 2]]
HQ = [[2.0, 0.0], [-0.5, 2.0]]
PAIRS = [(h, hq) for rh, rq in zip(H, HQ, strict=True) for h, hq in zip(rh, rq, strict=True)]


def test_sr_dpo_by_hand():
    beta, lam = 0.1, 0.3
    loss, m = losses.sr_dpo(PC, RC, PR, RR, policy_chosen_q=PCQ, policy_rejected_q=PRQ, ref_chosen_q=RCQ,
                            ref_rejected_q=RRQ, beta=beta, lam=lam)
    want = sum(nls(beta * h - lam * beta * hq) for h, hq in PAIRS) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["delta"] == pytest.approx(beta * sum(sum(r) for r in HQ) / 4)


def test_sr_ipo_by_hand():
    beta, lam = 0.25, 0.5
    loss, _ = losses.sr_ipo(PC, RC, PR, RR, policy_chosen_q=PCQ, policy_rejected_q=PRQ, ref_chosen_q=RCQ,
                            ref_rejected_q=RRQ, beta=beta, lam=lam)
    want = sum((h - lam * beta * hq - 2.0) ** 2 for h, hq in PAIRS) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_selm_by_hand():
    beta, alpha = 0.01, 0.5
    py, ry = torch.tensor([-5.0, -7.0], dtype=torch.float64), torch.tensor([-6.0, -4.0], dtype=torch.float64)
    loss, m = losses.selm(PC, RC, PR[:, :1], RR[:, :1], policy_yref=py, ref_yref=ry, beta=beta, alpha=alpha)
    want = ((nls(beta * 2.0) + alpha * beta * 1.0) + (nls(beta * -0.5) + alpha * beta * -3.0)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["optimism"] == pytest.approx(-1.0)


def test_d2o_by_hand():
    beta, alpha = 0.1, 0.2
    pa_, ra = PR, RR  # anchors: r = [[-1, 1], [1, -2]] -> mean [0, -0.5]
    pn = torch.tensor([[-3.0, -4.0], [-5.0, -6.0]], dtype=torch.float64)
    rn = torch.tensor([[-2.0, -6.0], [-5.0, -5.0]], dtype=torch.float64)  # r_n = [[-1, 2], [0, -1]]
    loss, m = losses.d2o(pa_, ra, pn, rn, beta=beta, alpha=alpha)
    z = [[0.0 + alpha * 1.0, 0.0 - alpha * 2.0], [beta * -0.5 - 0.0, beta * -0.5 + alpha * 1.0]]
    want = sum(nls(v) for row in z for v in row) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["anchor"] == pytest.approx(-0.25)
    one, _ = losses.d2o(pa_, ra, pn[:, 0], rn[:, 0], beta=beta, alpha=alpha)  # M = 1 as a (B,) tensor
    assert one.item() == pytest.approx((nls(z[0][0]) + nls(z[1][0])) / 2, abs=1e-12)


def test_sc_k1_equals_dpo():
    pc, rc, pr, rr = rand(5, seed=1), rand(5, seed=2), rand(5, 1, seed=3), rand(5, 1, seed=4)
    a, ma = losses.sc(pc, rc, pr, rr, beta=0.1)
    b, mb = losses.dpo(pc, rc, pr[:, 0], rr[:, 0], beta=0.1)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    assert ma == pytest.approx(mb)


def test_sc_equals_pair_expansion_in_loss_and_gradient():
    """The reference code repeats y* K times, runs K DPO pairs, and scales accumulation by K."""
    B, K = 3, 4
    pc, pr = rand(B, seed=5, requires_grad=True), rand(B, K, seed=6, requires_grad=True)
    rc, rr = rand(B, seed=7), rand(B, K, seed=8)
    loss, _ = losses.sc(pc, rc, pr, rr, beta=0.1)
    g_c, g_r = torch.autograd.grad(loss, [pc, pr])

    pc2, pr2 = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    total = 0.0
    for k in range(K):  # K separate DPO batches of B pairs, each recomputing y*, accumulated with 1/K
        lk, _ = losses.dpo(pc2 * 1.0, rc, pr2[:, k], rr[:, k], beta=0.1)
        total = total + lk / K
    g_c2, g_r2 = torch.autograd.grad(total, [pc2, pr2])
    assert loss.item() == pytest.approx(total.item(), abs=1e-12)
    torch.testing.assert_close(g_c, g_c2)
    torch.testing.assert_close(g_r, g_r2)


def test_special_cases_reduce():
    B, K = 4, 3
    pc, rc, pr, rr = rand(B, seed=9), rand(B, seed=10), rand(B, K, seed=11), rand(B, K, seed=12)
    q = dict(policy_chosen_q=rand(B, seed=13), policy_rejected_q=rand(B, K, seed=14),
             ref_chosen_q=rand(B, seed=15), ref_rejected_q=rand(B, K, seed=16))
    assert losses.sr_dpo(pc, rc, pr, rr, **q, beta=0.1, lam=0.0)[0].item() == pytest.approx(
        losses.sc(pc, rc, pr, rr, beta=0.1)[0].item(), abs=1e-12)
    assert losses.sr_dpo(pc, rc, pr[:, :1], rr[:, :1], **{k: (v[:, :1] if v.dim() == 2 else v) for k, v in q.items()},
                         beta=0.1, lam=0.0)[0].item() == pytest.approx(
        losses.dpo(pc, rc, pr[:, 0], rr[:, 0], beta=0.1)[0].item(), abs=1e-12)
    assert losses.sr_ipo(pc, rc, pr, rr, **q, beta=0.1, lam=0.0)[0].item() == pytest.approx(
        losses.ipo(pc, rc, pr, rr, beta=0.1)[0].item(), abs=1e-12)
    assert losses.selm(pc, rc, pr[:, :1], rr[:, :1], policy_yref=rand(B, seed=17), ref_yref=rand(B, seed=18),
                       beta=0.01, alpha=0.0)[0].item() == pytest.approx(
        losses.dpo(pc, rc, pr[:, 0], rr[:, 0], beta=0.01)[0].item(), abs=1e-12)


def test_sr_delta_has_no_gradient_and_selm_optimism_has():
    B, K = 2, 2
    pcq = rand(B, seed=20, requires_grad=True)
    prq = rand(B, K, seed=21, requires_grad=True)
    pc = rand(B, seed=22, requires_grad=True)
    loss, _ = losses.sr_dpo(pc, rand(B, seed=23), rand(B, K, seed=24), rand(B, K, seed=25), policy_chosen_q=pcq,
                            policy_rejected_q=prq, ref_chosen_q=rand(B, seed=26), ref_rejected_q=rand(B, K, seed=27),
                            beta=0.1, lam=1.0)
    loss.backward()
    assert pcq.grad is None and prq.grad is None and pc.grad is not None
    py = rand(B, seed=28, requires_grad=True)
    loss, _ = losses.selm(rand(B, seed=29), rand(B, seed=30), rand(B, 1, seed=31), rand(B, 1, seed=32),
                          policy_yref=py, ref_yref=rand(B, seed=33), beta=0.01, alpha=0.001)
    loss.backward()
    torch.testing.assert_close(py.grad, torch.full((B,), 0.001 * 0.01 / B, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ TRL 1.16
def _trl_loss(loss_type: str, beta: float, pc, rc, pr, rr, n_c, n_r) -> float:
    """Run TRL 1.16's own `DPOTrainer._compute_loss` on given summed log-probs. Building a real DPOTrainer needs a
    model forward; here a stand-in model returns per-token log-probs that sum to the given values (TRL sums them over
    the completion), and a stand-in accelerator gathers on one process. Everything after the forward is TRL's code."""
    from trl import DPOTrainer

    B = pc.shape[0]
    n = torch.cat([n_c, n_r])
    T = int(n.max()) + 1
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, k in enumerate(n.tolist()):
        completion_mask[i, 1:1 + k] = 1
    shift = completion_mask[:, 1:].double()
    total = torch.cat([pc, pr])
    per_token = shift * (total / n).unsqueeze(1)

    def model(**kwargs):
        z = torch.zeros(2 * B, T - 1, dtype=torch.float64)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    model.training = True
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return float(DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False))


def test_dpo_equals_trl_sigmoid_and_ipo_equals_trl_ipo_after_scaling():
    B = 6
    pc, rc, pr, rr = rand(B, seed=40), rand(B, seed=41), rand(B, seed=42), rand(B, seed=43)
    n_c = torch.tensor([3, 5, 7, 2, 9, 4])
    n_r = torch.tensor([6, 2, 8, 3, 1, 5])
    for beta in (0.1, 0.5):
        ours = losses.dpo(pc, rc, pr, rr, beta=beta)[0].item()
        assert ours == pytest.approx(_trl_loss("sigmoid", beta, pc, rc, pr, rr, n_c, n_r), abs=1e-9)
        # TRL's IPO divides each log-ratio by its token count: feed ours the per-token log-probs to compare.
        ours_ipo = losses.ipo(pc / n_c, rc / n_c, pr / n_r, rr / n_r, beta=beta)[0].item()
        assert ours_ipo == pytest.approx(_trl_loss("ipo", beta, pc, rc, pr, rr, n_c, n_r), rel=1e-9)


# ------------------------------------------------------------------------------------------ the dispatch table
def test_table_has_every_objective_and_group_loss_equals_the_functions():
    from negalign.config import OBJECTIVES

    assert set(losses.LOSSES) == set(OBJECTIVES)
    B, K, A = 3, 2, 2
    pol, ref, cnt = rand(B, 1 + K + 1, seed=60), rand(B, 1 + K + 1, seed=61), torch.tensor([[2, 3, 4, 5]] * B)
    g = losses.Group(policy=pol, counts=cnt, ref=ref, policy_q=rand(B, 4, seed=62), ref_q=rand(B, 4, seed=63))
    p = losses.Params(beta=0.2, alpha=0.05, lam=0.3, num_negatives=K, num_anchors=A)
    pc, rc, pr, rr = pol[:, 0], ref[:, 0], pol[:, 1:1 + K], ref[:, 1:1 + K]
    q = dict(policy_chosen_q=g.policy_q[:, 0], policy_rejected_q=g.policy_q[:, 1:1 + K], ref_chosen_q=g.ref_q[:, 0],
             ref_rejected_q=g.ref_q[:, 1:1 + K])
    want = {"sc": losses.sc(pc, rc, pr, rr, beta=0.2), "ipo": losses.ipo(pc, rc, pr, rr, beta=0.2),
            "sr-dpo": losses.sr_dpo(pc, rc, pr, rr, **q, beta=0.2, lam=0.3),
            "sr-ipo": losses.sr_ipo(pc, rc, pr, rr, **q, beta=0.2, lam=0.3),
            "selm": losses.selm(pc, rc, pr, rr, policy_yref=pol[:, -1], ref_yref=ref[:, -1], beta=0.2, alpha=0.05),
            "d2o": losses.d2o(pol[:, :A], ref[:, :A], pol[:, A:], ref[:, A:], beta=0.2, alpha=0.05)}
    nll = -pol[:, 0].sum() / cnt[:, 0].sum()
    for name, (loss, metrics) in want.items():
        got, m = losses.group_loss(name, g, p)
        assert got.item() == loss.item(), name
        assert {k: m[k] for k in metrics} == metrics and m["sft_nll"] == pytest.approx(nll.item())
    assert losses.group_loss("sft", g, p)[0].item() == pytest.approx(nll.item())
    one = losses.Params(beta=0.2, num_negatives=1)
    assert losses.group_loss("dpo", g, one)[0].item() == losses.dpo(pc, rc, pol[:, 1], ref[:, 1], beta=0.2)[0].item()
    # --sft-weight adds W × the chosen's NLL where the layout has a chosen (not d2o), --dpop-lambda switches to DPOP
    w = losses.Params(beta=0.2, sft_weight=0.5, dpop_lambda=2.0, num_negatives=K, num_anchors=A)
    assert losses.group_loss("sc", g, w)[0].item() == pytest.approx(
        losses.dpop(pc, rc, pr, rr, beta=0.2, lam=2.0)[0].item() + 0.5 * nll.item(), abs=1e-12)
    assert losses.group_loss("d2o", g, w)[0].item() == losses.d2o(pol[:, :A], ref[:, :A], pol[:, A:], ref[:, A:],
                                                                  beta=0.2, alpha=0.1)[0].item()


def test_likelihood_metrics_by_hand():
    pol = torch.tensor([[-4.0, -10.0, -6.0], [-2.0, -8.0, -12.0]], dtype=torch.float64)
    ref = torch.tensor([[-5.0, -9.0, -9.0], [-3.0, -8.0, -10.0]], dtype=torch.float64)
    cnt = torch.tensor([[2, 5, 3], [4, 4, 2]])
    m = losses.group_loss("sc", losses.Group(policy=pol, counts=cnt, ref=ref), losses.Params(num_negatives=2))[1]
    assert m["logps/chosen"] == pytest.approx(-3.0)
    assert m["logps/rejected"] == pytest.approx((-10 - 6 - 8 - 12) / 4)
    assert m["logratio/chosen"] == pytest.approx(1.0)
    assert m["logratio/chosen_per_token"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["logratio/rejected"] == pytest.approx((-1 + 3 + 0 - 2) / 4)
    assert m["logratio/rejected_per_token"] == pytest.approx((-1 / 5 + 3 / 3 + 0 / 4 - 2 / 2) / 4)
    sft = losses.group_loss("sft", losses.Group(policy=pol[:, :1], counts=cnt[:, :1]), losses.Params())[1]
    assert sft["logps/chosen"] == pytest.approx(-3.0) and not any(k.startswith("logratio") for k in sft)
