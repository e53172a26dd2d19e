"""Uncertainty for eval and report: bootstrap intervals over prompts, paired differences, McNemar's exact test.

All resampling is over *prompts* (the unit that was drawn from the task), with a fixed seed so a report is
reproducible. Intervals are percentile intervals: the 2.5th and 97.5th percentiles of the resampled statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                 level: float = LEVEL) -> dict[str, Any]:
    """Mean of `values` (one per prompt) and its percentile bootstrap interval: resample prompts with replacement.

    NaNs (prompts where the metric does not apply) are left out. Returns {mean, lo, hi, n}; mean is None when empty.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // x.size)  # resamples per draw: bounded memory for large evals
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(chunk, n_boot - i), x.size))].mean(axis=1)
                            for i in range(0, n_boot, chunk)])
    lo, hi = _percentiles(means, level)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(x.size)}


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT,
                        seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """Mean of a − b over prompts scored by both, with the bootstrap interval of that mean.

    Pairing resamples the *same* prompts for both models, so the prompt-to-prompt spread (hard vs easy prompts)
    cancels: a 3-point difference can be clear even when the two unpaired intervals overlap.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length ({a.size} vs {b.size})")
    ok = np.isfinite(a) & np.isfinite(b)
    return bootstrap_ci(a[ok] - b[ok], n_boot=n_boot, seed=seed, level=level)


def win_tie_loss(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                 tol: float = 0.0) -> dict[str, int]:
    """Counts of a > b, |a − b| <= tol, a < b over the pairs where both are defined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    return {"win": int((d > tol).sum()), "tie": int((np.abs(d) <= tol).sum()), "loss": int((d < -tol).sum())}


def win_scores(reward: Sequence[float] | np.ndarray, reward_ref: Sequence[float] | np.ndarray,
               tol: float = 0.0) -> np.ndarray:
    """Per-pair win score of an answer against a reference answer: 1 win, 0.5 tie (|Δ| <= tol), 0 loss."""
    r, ref = np.asarray(reward, dtype=np.float64), np.asarray(reward_ref, dtype=np.float64)
    d = r - ref
    out = np.where(d > tol, 1.0, np.where(d < -tol, 0.0, 0.5))
    return np.where(np.isfinite(d), out, np.nan)


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """McNemar's exact test for paired binary outcomes (e.g. checker right/wrong of two models on the same prompts).

    Only discordant pairs count: n01 = a right and b wrong, n10 = a wrong and b right. Under H0 each discordant
    pair goes either way with probability 1/2, so p = min(1, 2·P[Binom(n01 + n10, 1/2) <= min(n01, n10)]).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length ({a.size} vs {b.size})")
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n = n01 + n10
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"a_only": n01, "b_only": n10, "both": int((a & b).sum()), "neither": int((~a & ~b).sum()),
            "p": min(1.0, 2.0 * tail)}


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error (sample sd / √n) of per-seed values; se is None for a single seed."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"mean": float(x.mean()), "se": se, "n": int(x.size)}


def fmt_interval(v: dict[str, Any] | None, *, scale: float = 1.0, digits: int = 3, unit: str = "", sign: str = "",
                 seeds: str = "list") -> str:
    """The one interval formatter: "0.420 [0.300, 0.550]" for a bootstrap interval {mean, lo, hi}, or for mean ± s.e.
    over seeds {mean, se, seeds} "0.420 ± 0.010 (seeds: 0.41, 0.43)" (seeds="list") / "0.420 ±0.010 (n=2)"
    (seeds="count"); "–" when the metric was not computed. Values are multiplied by `scale` (100 for percent), `unit`
    follows the mean, `sign="+"` signs every number (differences)."""
    if not v or v.get("mean") is None:
        return "–"

    def num(x: float) -> str:
        return f"{scale * x:{sign}.{digits}f}"

    mean = num(v["mean"]) + unit
    if v.get("se") is not None:
        if seeds == "count":
            return f"{mean} ±{scale * v['se']:.{digits}f} (n={len(v['seeds'])})"
        return f"{mean} ± {scale * v['se']:.{digits}f} (seeds: {', '.join(num(s) for s in v['seeds'])})"
    return f"{mean} [{num(v['lo'])}, {num(v['hi'])}]"
