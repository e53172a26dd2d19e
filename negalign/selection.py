"""Negative selection for the ``filter`` stage (SPEC §1.1 step 3): pure, no file I/O.

The stage wrapper reads the embeddings, calls :func:`cosine_to_target` (FAISS), builds a :class:`Candidates`
and calls one of :func:`select_self_contrast`, :func:`select_random`, :func:`select_threshold`
(or :func:`select` by strategy name). Rows may come in any order; ``group`` = prompt index in ``0..P-1``.

Order of the drops (a row gets the first reason that applies):
``empty`` → ``truncated`` (only with ``drop_truncated``) → ``correct`` (``Candidates.is_correct``: the
checker marks it a right answer, so it is never a negative) → ``duplicate`` (exact text, the first occurrence
by ``sample_idx`` stays) → ``near_negative`` (opt-in) → ``near_duplicate`` (opt-in) → ranking →
``near_target`` (self-contrast / threshold) → ``same_as_target`` (``Candidates.is_target_copy``: a *kept*
row that is a copy of the target; it keeps its rank and counted in ``n_unique``, as the reference code
treats empty outputs, so the kept set is the rule's kept set minus the copies). The rows that reach the
ranking are the prompt's *unique candidates* (``n_unique`` of them).

Tie rule of the ranking: similarity ascending, then ``sample_idx`` ascending, then row order
(-0.0 == +0.0, as for floats). ``rank`` 0 = least similar (the best negative); ``rank`` = -1 for rows
dropped before the ranking. Similarities must be finite.

The rule is a plain loop over prompts (the paper's way). A vectorised version (padded prompt matrices, packed
sort keys) was 2-10x faster in one call over 100k prompts, but ``filter`` calls the rule once per shard, where
the whole command spends under 5 % of its time in it: see benchmarks/RESULTS_filter.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from negalign.errors import NegalignError

REASONS: tuple[str | None, ...] = (
    None, "empty", "truncated", "duplicate", "near_negative", "near_duplicate", "near_target", "correct",
    "same_as_target",
)
"""``Selection.reason_code`` indexes this tuple (0 = not dropped); new reasons go at the end (codes stay)."""
(KEPT, EMPTY, TRUNCATED, DUPLICATE, NEAR_NEGATIVE, NEAR_DUPLICATE, NEAR_TARGET, CORRECT,
 SAME_AS_TARGET) = range(len(REASONS))
_REASON_ARRAY = np.array(REASONS, dtype=object)

STRATEGIES = ("self-contrast", "random", "threshold")
_ROW_BLOCK = 1 << 18        # rows per FAISS call in cosine_to_target (bounds the index buffer)
_SINGLE_THREAD_ROWS = 1 << 16   # smaller similarity calls run FAISS on one thread


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Candidates:
    """One row per (prompt, candidate); arrays of equal length ``M``.

    group: int64 prompt index in ``0..P-1``. sample_idx: position in the prompt's sample order.
    text_hash: exact-text key (uint64/int64, or bytes/str such as a sha256); equal key = same text.
    is_empty: bool. sim: float32 cosine to the prompt's target. is_truncated: bool or None
    (``finish_reason == "length"``). num_samples: int64 ``(P,)``, ``N`` = samples generated per prompt;
    None = the number of rows of each prompt. emb: float32 ``(M, d)`` L2-normalised candidate
    embeddings, needed only by ``near_dup_sim`` / ``max_neg_sim``. is_correct: bool or None, a right answer
    by the prompt's checker (dropped as ``correct`` before the ranking). is_target_copy: bool or None, the
    text equals the target after normalisation (a kept one becomes ``same_as_target`` after the ranking).
    """

    group: np.ndarray
    sample_idx: np.ndarray
    text_hash: np.ndarray
    is_empty: np.ndarray
    sim: np.ndarray
    is_truncated: np.ndarray | None = None
    num_samples: np.ndarray | None = None
    emb: np.ndarray | None = None
    is_correct: np.ndarray | None = None
    is_target_copy: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.group = np.asarray(self.group, dtype=np.int64)
        self.sample_idx = np.asarray(self.sample_idx, dtype=np.int64)
        self.is_empty = np.asarray(self.is_empty, dtype=bool)
        self.sim = np.asarray(self.sim, dtype=np.float32)
        self.text_hash = np.asarray(self.text_hash)
        for name in ("is_truncated", "is_correct", "is_target_copy"):
            if getattr(self, name) is not None:
                setattr(self, name, np.asarray(getattr(self, name), dtype=bool))
        m = len(self.group)
        for name in ("sample_idx", "text_hash", "is_empty", "sim", "is_truncated", "is_correct", "is_target_copy"):
            arr = getattr(self, name)
            if arr is not None and (arr.ndim != 1 or len(arr) != m):
                raise ValueError(f"Candidates.{name}: expected shape ({m},), got {arr.shape}")
        if m and self.group.min() < 0:
            raise ValueError("Candidates.group: negative prompt index")
        if self.num_samples is None:
            self.num_samples = np.bincount(self.group, minlength=0).astype(np.int64)
        else:
            self.num_samples = np.asarray(self.num_samples, dtype=np.int64)
            if m and self.group.max() >= len(self.num_samples):
                raise ValueError(f"Candidates.group: index {self.group.max()} >= len(num_samples) "
                                 f"= {len(self.num_samples)}")
        if self.emb is not None and (self.emb.ndim != 2 or len(self.emb) != m):
            raise ValueError(f"Candidates.emb: expected shape ({m}, d), got {self.emb.shape}")

    @property
    def num_groups(self) -> int:
        return len(self.num_samples)

    def __len__(self) -> int:
        return len(self.group)


@dataclass
class Selection:
    """Per row: ``kept`` (bool), ``rank`` (int32, -1 = not ranked), ``reason_code`` (int8 into REASONS).
    ``capped_by_unique`` (self-contrast only, per prompt): ``n_unique − 1 < floor(N·p)``, so ``n_unique − 1``
    set ``m`` and only the single most similar unique candidate was dropped by the rule (None otherwise)."""

    kept: np.ndarray
    rank: np.ndarray
    reason_code: np.ndarray
    capped_by_unique: np.ndarray | None = None

    @property
    def drop_reason(self) -> np.ndarray:
        """Object array of ``str`` (the reason) or ``None`` (kept)."""
        return _REASON_ARRAY[self.reason_code]

    def reason_counts(self) -> dict[str, int]:
        """Rows per outcome: ``{"kept": n, "duplicate": n, ...}`` (reasons with zero rows left out)."""
        counts = np.bincount(self.reason_code, minlength=len(REASONS))
        return {(r or "kept"): int(n) for r, n in zip(REASONS, counts, strict=True) if n}


# ------------------------------------------------------------------------------------------- similarity
FAISS_MISSING = ("FAISS is not installed, and the filter's similarities need it: pip install faiss-cpu "
                 "(faiss-gpu on a CUDA machine; `make install` installs every dependency)")


def import_faiss():
    """FAISS, imported only where it is used: train, sample and embed run without it (the CUDA check machine has
    none). Not installed -> a one-line error naming the package."""
    try:
        import faiss
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        raise NegalignError(FAISS_MISSING) from e
    return faiss


def _sp(a: np.ndarray):
    return import_faiss().swig_ptr(a)


def _check_index(idx: np.ndarray, size: int, name: str) -> None:
    """FAISS reads out of bounds (crash, not an exception) on a bad index: check first."""
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{name}: index out of range [0, {size})")


def cosine_to_target(cand_emb: np.ndarray, target_emb: np.ndarray, group: np.ndarray,
                     *, block_rows: int = _ROW_BLOCK) -> np.ndarray:
    """``sim[i] = <cand_emb[i], target_emb[group[i]]>`` (cosine: both sides L2-normalised), float32 ``(M,)``.

    ``faiss.pairwise_indexed_inner_product`` on blocks of ``block_rows`` rows, no gather of the embeddings.
    Calls under ``_SINGLE_THREAD_ROWS`` rows (``filter`` makes one per shard, ~2k rows) run on one OpenMP
    thread: FAISS's threads cost more than they save there (0.85 vs 19 ms per 2048 x 384 on a busy 2-core
    machine), and more so when other processes hold the cores. No GPU path: at this size the transfer costs
    more than the CPU computes (faiss-gpu's CPU functions are the same).
    """
    group = np.asarray(group, dtype=np.int64)
    if cand_emb.ndim != 2 or target_emb.ndim != 2 or cand_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: {cand_emb.shape} vs {target_emb.shape}")
    if group.shape != (len(cand_emb),):
        raise ValueError(f"group: expected shape ({len(cand_emb)},), got {group.shape}")
    _check_index(group, len(target_emb), "group")
    faiss = import_faiss()  # here, not at the top: train imports this module for take_first_k and needs no FAISS

    m, d = cand_emb.shape
    target = np.ascontiguousarray(target_emb, dtype=np.float32)
    out = np.empty(m, dtype=np.float32)
    ix = np.arange(min(block_rows, m), dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    if m < _SINGLE_THREAD_ROWS:
        faiss.omp_set_num_threads(1)
    try:
        for s in range(0, m, block_rows):
            e = min(s + block_rows, m)
            x = np.ascontiguousarray(cand_emb[s:e], dtype=np.float32)   # no copy if already float32/C
            iy = np.ascontiguousarray(group[s:e])
            faiss.pairwise_indexed_inner_product(d, e - s, _sp(x), _sp(ix), _sp(target), _sp(iy), _sp(out[s:e]))
    finally:
        faiss.omp_set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------------------- the rule
def _prompts(c: Candidates) -> list[np.ndarray]:
    """Row ids of each prompt in (sample_idx, row) order (lexsort is stable)."""
    order = np.lexsort((c.sample_idx, c.group))
    return np.split(order, np.cumsum(np.bincount(c.group, minlength=c.num_groups))[:-1])


def _survivors(c: Candidates, rows: list[int], code: np.ndarray, drop: list[int], hashes: list,
               near_dup_sim: float | None, max_neg_sim: float | None, negatives: np.ndarray | None) -> list[int]:
    """One prompt's rows (in sample order) that reach the ranking; the others get their reason in ``code``.
    ``drop[r]``: EMPTY, TRUNCATED or 0; ``hashes[r]``: the text key."""
    seen: set = set()
    alive: list[int] = []
    for r in rows:
        if drop[r]:
            code[r] = drop[r]
        elif hashes[r] in seen:
            code[r] = DUPLICATE
        else:
            seen.add(hashes[r])
            alive.append(r)
    if max_neg_sim is not None and alive and negatives is not None and len(negatives):
        best = (c.emb[alive] @ negatives.T).max(axis=1)             # cosine to the closest given negative
        code[np.asarray(alive)[best >= max_neg_sim]] = NEAR_NEGATIVE
        alive = [r for r in alive if code[r] == KEPT]
    if near_dup_sim is not None and len(alive) > 1:
        sims = c.emb[alive] @ c.emb[alive].T
        kept: list[int] = []                                         # greedy, in sample order
        for i, r in enumerate(alive):
            if kept and (sims[i, kept] >= near_dup_sim).any():
                code[r] = NEAR_DUPLICATE
            else:
                kept.append(i)
        alive = [alive[i] for i in kept]
    return alive


def _select(c: Candidates, *, drop_truncated: bool, near_dup_sim: float | None, max_neg_sim: float | None,
            neg_emb: np.ndarray | None, neg_group: np.ndarray | None, keep: Callable[[int, np.ndarray], int]
            ) -> Selection:
    """Drops, then the ranking of each prompt's survivors; ``keep(g, sims in rank order)`` = how many of the
    least similar stay, the rest are ``near_target``."""
    if (near_dup_sim is not None or max_neg_sim is not None) and c.emb is None:
        raise ValueError("near_dup_sim / max_neg_sim need Candidates.emb")
    negatives: list[np.ndarray | None] = [None] * c.num_groups
    if max_neg_sim is not None:
        if neg_emb is None or neg_group is None:
            raise ValueError("max_neg_sim needs neg_emb and neg_group")
        neg_group = np.asarray(neg_group, dtype=np.int64)
        if neg_emb.ndim != 2 or neg_emb.shape[1] != c.emb.shape[1] or neg_group.shape != (len(neg_emb),):
            raise ValueError(f"negatives: shapes {neg_emb.shape}, {neg_group.shape} do not match "
                             f"candidates' dim {c.emb.shape[1]}")
        _check_index(neg_group, c.num_groups, "neg_group")
        for g in np.unique(neg_group):
            negatives[g] = neg_emb[neg_group == g]
    code = np.zeros(len(c), dtype=np.int8)
    rank = np.full(len(c), -1, dtype=np.int32)
    drop = np.zeros(len(c), dtype=np.int8)
    if c.is_correct is not None:
        drop[c.is_correct] = CORRECT
    if drop_truncated and c.is_truncated is not None:
        drop[c.is_truncated] = TRUNCATED
    drop[c.is_empty] = EMPTY
    drop_list, hashes = drop.tolist(), c.text_hash.tolist()
    for g, rows in enumerate(_prompts(c)):
        alive = np.asarray(_survivors(c, rows.tolist(), code, drop_list, hashes, near_dup_sim, max_neg_sim,
                                      negatives[g]), dtype=np.int64)
        if not len(alive):
            continue
        sims = c.sim[alive]
        if not np.isfinite(sims).all():
            raise ValueError(f"sim must be finite: a candidate of prompt {g} is not (NaN/inf)")
        order = alive[np.argsort(sims, kind="stable")]               # ties: earlier sample first
        rank[order] = np.arange(len(order))
        code[order[keep(g, c.sim[order]):]] = NEAR_TARGET
    if c.is_target_copy is not None:
        code[(code == KEPT) & c.is_target_copy] = SAME_AS_TARGET
    return Selection(kept=code == KEPT, rank=rank, reason_code=code)


# ---------------------------------------------------------------------------------------- strategies
def select_self_contrast(c: Candidates, keep_fraction: float = 0.75, *, drop_truncated: bool = False,
                         near_dup_sim: float | None = None, max_neg_sim: float | None = None,
                         neg_emb: np.ndarray | None = None, neg_group: np.ndarray | None = None
                         ) -> Selection:
    """Self-Contrast ``lastdedup-p`` (SPEC §1.1 step 3).

    Per prompt: ``m = max(0, min(floor(N·p), n_unique − 1))`` with ``N = c.num_samples[g]`` — the number
    of samples *generated* for the prompt (as the reference code does; duplicates and empties count in
    N), ``p = keep_fraction`` (``int(N * p)``), ``n_unique`` = rows that reach the ranking. The ``m`` least
    similar are kept (``rank < m``); the other ranked rows are ``near_target``, so the most similar one is
    always dropped and a prompt with ``n_unique <= 1`` keeps nothing.
    Options: ``drop_truncated`` (reason ``truncated``), ``max_neg_sim`` with the prompt's given negatives
    ``neg_emb``/``neg_group`` (``near_negative``), ``near_dup_sim`` (``near_duplicate``); they need ``c.emb``.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    out = _select(c, drop_truncated=drop_truncated, near_dup_sim=near_dup_sim, max_neg_sim=max_neg_sim,
                  neg_emb=neg_emb, neg_group=neg_group,
                  keep=lambda g, s: max(0, min(int(int(c.num_samples[g]) * keep_fraction), len(s) - 1)))
    n_unique = np.bincount(c.group[out.rank >= 0], minlength=c.num_groups)
    by_fraction = (c.num_samples * keep_fraction).astype(np.int64)    # int(N * p), as in the rule
    out.capped_by_unique = (n_unique >= 1) & (n_unique - 1 < by_fraction)
    return out


def select_random(c: Candidates, *, drop_truncated: bool = False, near_dup_sim: float | None = None,
                  max_neg_sim: float | None = None, neg_emb: np.ndarray | None = None,
                  neg_group: np.ndarray | None = None) -> Selection:
    """``alldedup``: every unique non-empty candidate is kept (``pair`` shuffles them); rank still given."""
    return _select(c, drop_truncated=drop_truncated, near_dup_sim=near_dup_sim, max_neg_sim=max_neg_sim,
                   neg_emb=neg_emb, neg_group=neg_group, keep=lambda g, s: len(s))


def select_threshold(c: Candidates, max_sim: float, *, drop_truncated: bool = False,
                     near_dup_sim: float | None = None, max_neg_sim: float | None = None,
                     neg_emb: np.ndarray | None = None, neg_group: np.ndarray | None = None) -> Selection:
    """Keep the unique non-empty candidates with ``sim < max_sim``; the others are ``near_target``."""
    return _select(c, drop_truncated=drop_truncated, near_dup_sim=near_dup_sim, max_neg_sim=max_neg_sim,
                   neg_emb=neg_emb, neg_group=neg_group, keep=lambda g, s: int((s < max_sim).sum()))


def select(strategy: str, c: Candidates, **options) -> Selection:
    """By CLI name: ``self-contrast`` (``keep_fraction``), ``random``, ``threshold`` (needs ``max_sim``)."""
    if strategy == "self-contrast":
        return select_self_contrast(c, **options)
    if strategy == "random":
        return select_random(c, **options)
    if strategy == "threshold":
        if "max_sim" not in options:
            raise ValueError("strategy 'threshold' needs max_sim")
        return select_threshold(c, **options)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------------------ the K-draw
def negatives_rng(seed: int, prompt_id: str | bytes | int) -> np.random.Generator:
    """numpy Generator seeded from sha256(``"negalign/negatives/{seed}/{prompt_id}"``), first 8 bytes."""
    pid = prompt_id.hex() if isinstance(prompt_id, bytes) else str(prompt_id)
    digest = hashlib.sha256(f"negalign/negatives/{seed}/{pid}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw_negatives(kept_ids: Sequence, k: int | None, seed: int, prompt_id: str | bytes | int) -> list:
    """The kept ids of ONE prompt in a seeded random order; the first ``k`` of them, or ``[]`` if fewer.

    The order depends only on (seed, prompt_id, the set of ids) — ids are sorted first — and not on ``k``,
    so K = 1, 2, 4, 8, 16 are nested prefixes of one permutation; ``k=None`` returns the whole permutation.
    """
    ids = sorted(kept_ids)
    if k is not None and len(ids) < k:
        return []
    perm = negatives_rng(seed, prompt_id).permutation(len(ids))
    out = [ids[i] for i in perm]
    return out if k is None else out[:k]


# ------------------------------------------------------------------------------------------ take the first K
def take_first_k(groups: Sequence[Sequence], k: int) -> tuple[list[int], int]:
    """Indices of the groups that hold at least ``k`` items, and how many were skipped for holding fewer.

    ``pair`` stores every kept negative in a seeded order, so the first ``k`` of a group are its K-subset (nested in
    K); a group with fewer than ``k`` yields nothing, as in the reference rule (SPEC §1.1 step 3). Callers slice
    ``group[:k]`` for the indices returned.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    keep = [i for i, g in enumerate(groups) if len(g) >= k]
    return keep, len(groups) - len(keep)
