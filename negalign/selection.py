"""Negative selection for the ``filter`` stage (SPEC §1.1 step 3): pure, vectorised, no file I/O.

The stage wrapper reads the embeddings, calls :func:`cosine_to_target`, builds a :class:`Candidates`
and calls one of :func:`select_self_contrast`, :func:`select_random`, :func:`select_threshold`
(or :func:`select` by strategy name). Every function works on all prompts at once: rows of any order,
``group`` = prompt index in ``0..P-1``. :func:`reference_self_contrast` is the plain per-prompt loop
(the paper's way), kept as the test oracle and the benchmark baseline.

Order of the drops (a row gets the first reason that applies):
``empty`` → ``truncated`` (only with ``drop_truncated``) → ``duplicate`` (exact text, the first occurrence
by ``sample_idx`` stays) → ``near_negative`` (opt-in) → ``near_duplicate`` (opt-in) → ranking →
``near_target`` (self-contrast / threshold). The rows that reach the ranking are the prompt's
*unique candidates* (``n_unique`` of them).

Tie rule of the ranking: similarity ascending, then ``sample_idx`` ascending, then row order
(-0.0 == +0.0, as for floats). ``rank`` 0 = least similar (the best negative); ``rank`` = -1 for rows
dropped before the ranking. Similarities must be finite.

How it is vectorised: the rows of each prompt become one row of a padded ``(prompts, width)`` matrix
(prompts bucketed by size, width = next power of two), and dedup and ranking are row-wise sorts of
packed uint64 keys over all prompts at once. Rows already in (prompt, sample_idx) order — as ``sample``
writes them — take the fast path; other orders cost one extra sort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import faiss
import numpy as np

REASONS: tuple[str | None, ...] = (
    None, "empty", "truncated", "duplicate", "near_negative", "near_duplicate", "near_target",
)
"""``Selection.reason_code`` indexes this tuple (0 = not dropped)."""
KEPT, EMPTY, TRUNCATED, DUPLICATE, NEAR_NEGATIVE, NEAR_DUPLICATE, NEAR_TARGET = range(len(REASONS))
_REASON_ARRAY = np.array(REASONS, dtype=object)

STRATEGIES = ("self-contrast", "random", "threshold")
_ROW_BLOCK = 1 << 18        # rows per FAISS call in cosine_to_target (bounds the index buffer)
_PAIR_BUDGET = 1 << 22      # inner products per block in the many-to-many extras (~16 MiB of float32)
_BLOCK_CELLS = 1 << 20      # cells per padded (prompts x width) matrix in the selection


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Candidates:
    """One row per (prompt, candidate); arrays of equal length ``M``.

    group: int64 prompt index in ``0..P-1``. sample_idx: position in the prompt's sample order.
    text_hash: exact-text key (uint64/int64, or bytes/str such as a sha256); equal key = same text.
    is_empty: bool. sim: float32 cosine to the prompt's target. is_truncated: bool or None
    (``finish_reason == "length"``). num_samples: int64 ``(P,)``, ``N`` = samples generated per prompt;
    None = the number of rows of each prompt. emb: float32 ``(M, d)`` L2-normalised candidate
    embeddings, needed only by ``near_dup_sim`` / ``max_neg_sim``.
    """

    group: np.ndarray
    sample_idx: np.ndarray
    text_hash: np.ndarray
    is_empty: np.ndarray
    sim: np.ndarray
    is_truncated: np.ndarray | None = None
    num_samples: np.ndarray | None = None
    emb: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.group = np.asarray(self.group, dtype=np.int64)
        self.sample_idx = np.asarray(self.sample_idx, dtype=np.int64)
        self.is_empty = np.asarray(self.is_empty, dtype=bool)
        self.sim = np.asarray(self.sim, dtype=np.float32)
        self.text_hash = np.asarray(self.text_hash)
        if self.is_truncated is not None:
            self.is_truncated = np.asarray(self.is_truncated, dtype=bool)
        m = len(self.group)
        for name in ("sample_idx", "text_hash", "is_empty", "sim", "is_truncated"):
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
    """Per row: ``kept`` (bool), ``rank`` (int32, -1 = not ranked), ``reason_code`` (int8 into REASONS)."""

    kept: np.ndarray
    rank: np.ndarray
    reason_code: np.ndarray

    @property
    def drop_reason(self) -> np.ndarray:
        """Object array of ``str`` (the reason) or ``None`` (kept)."""
        return _REASON_ARRAY[self.reason_code]

    def reason_counts(self) -> dict[str, int]:
        """Rows per outcome: ``{"kept": n, "duplicate": n, ...}`` (reasons with zero rows left out)."""
        counts = np.bincount(self.reason_code, minlength=len(REASONS))
        return {(r or "kept"): int(n) for r, n in zip(REASONS, counts, strict=True) if n}


# ------------------------------------------------------------------------------------------- similarity
def _sp(a: np.ndarray):
    return faiss.swig_ptr(a)


def _check_index(idx: np.ndarray, size: int, name: str) -> None:
    """FAISS reads out of bounds (crash, not an exception) on a bad index: check first."""
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{name}: index out of range [0, {size})")


def cosine_to_target(cand_emb: np.ndarray, target_emb: np.ndarray, group: np.ndarray,
                     *, use_gpu: bool | None = None, block_rows: int = _ROW_BLOCK) -> np.ndarray:
    """``sim[i] = <cand_emb[i], target_emb[group[i]]>`` (cosine: both sides L2-normalised), float32 ``(M,)``.

    CPU: ``faiss.pairwise_indexed_inner_product`` on blocks of ``block_rows`` rows, no gather of the
    embeddings (extra memory ~12 bytes/row of a block). GPU (``use_gpu=None`` = when
    ``faiss.get_num_gpus() > 0``): rows sorted by group, ``faiss.pairwise_distance_gpu`` between each
    block of rows and its (at most 512) targets, then the row's own entry is gathered.
    """
    group = np.asarray(group, dtype=np.int64)
    if cand_emb.ndim != 2 or target_emb.ndim != 2 or cand_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: {cand_emb.shape} vs {target_emb.shape}")
    if group.shape != (len(cand_emb),):
        raise ValueError(f"group: expected shape ({len(cand_emb)},), got {group.shape}")
    _check_index(group, len(target_emb), "group")
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu:
        res = faiss.StandardGpuResources()

        def ip(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return faiss.pairwise_distance_gpu(res, a, b, metric=faiss.METRIC_INNER_PRODUCT)

        return _cosine_dense_blocks(cand_emb, target_emb, group, ip)
    m, d = cand_emb.shape
    target = np.ascontiguousarray(target_emb, dtype=np.float32)
    out = np.empty(m, dtype=np.float32)
    ix = np.arange(min(block_rows, m), dtype=np.int64)
    for s in range(0, m, block_rows):
        e = min(s + block_rows, m)
        x = np.ascontiguousarray(cand_emb[s:e], dtype=np.float32)   # no copy if already float32/C
        iy = np.ascontiguousarray(group[s:e])
        faiss.pairwise_indexed_inner_product(d, e - s, _sp(x), _sp(ix), _sp(target), _sp(iy), _sp(out[s:e]))
    return out


def _cosine_dense_blocks(cand_emb: np.ndarray, target_emb: np.ndarray, group: np.ndarray,
                         ip: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         block_rows: int = 8192, max_groups: int = 512) -> np.ndarray:
    """Same result as the CPU path with a dense ``ip(a, b) = a @ b.T`` (the GPU routine): rows sorted by
    group, each block of <= ``block_rows`` rows spanning < ``max_groups`` groups, own entry gathered."""
    order = np.argsort(group, kind="stable")
    gs = group[order]
    out = np.empty(len(group), dtype=np.float32)
    s = 0
    while s < len(order):
        e = min(s + block_rows, int(np.searchsorted(gs, gs[s] + max_groups, side="left")))
        rows = order[s:e]
        g0, g1 = int(gs[s]), int(gs[e - 1]) + 1
        a = np.ascontiguousarray(cand_emb[rows], dtype=np.float32)
        b = np.ascontiguousarray(target_emb[g0:g1], dtype=np.float32)
        dense = ip(a, b)
        out[rows] = dense[np.arange(e - s), gs[s:e] - g0]
        s = e
    return out


# ------------------------------------------------------------------------------------ shared machinery
def _hash_codes(text_hash: np.ndarray) -> np.ndarray:
    """Integer key per row: integers as they are, bytes/str mapped to their rank among distinct values."""
    if text_hash.dtype.kind in "iu":
        return text_hash
    if text_hash.dtype == object:
        text_hash = np.asarray(text_hash.tolist())
    return np.unique(text_hash, return_inverse=True)[1].ravel()


def _group_starts(sorted_group: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) per group for rows sorted by group."""
    counts = np.bincount(sorted_group, minlength=num_groups)
    return np.cumsum(counts) - counts, counts


def _size_buckets(sizes: np.ndarray, cost_per_group: Callable[[int], int]
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """Groups of equal ``sizes`` value, in chunks whose summed cost stays within ``_PAIR_BUDGET``."""
    for size in np.unique(sizes):
        groups = np.flatnonzero(sizes == size)
        step = max(1, _PAIR_BUDGET // max(1, cost_per_group(int(size))))
        for s in range(0, len(groups), step):
            yield int(size), groups[s:s + step]


def _indexed_ip(emb_x: np.ndarray, ix: np.ndarray, emb_y: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """``out[j] = <emb_x[ix[j]], emb_y[iy[j]]>`` with FAISS (no gather of embeddings)."""
    out = np.empty(len(ix), dtype=np.float32)
    if len(ix):
        ix, iy = np.ascontiguousarray(ix, dtype=np.int64), np.ascontiguousarray(iy, dtype=np.int64)
        faiss.pairwise_indexed_inner_product(emb_x.shape[1], len(ix), _sp(emb_x), _sp(ix), _sp(emb_y),
                                             _sp(iy), _sp(out))
    return out


def _f32c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _drop_near_negative(c: Candidates, code: np.ndarray, neg_emb: np.ndarray, neg_group: np.ndarray,
                        tau: float) -> None:
    """Drop a surviving row whose max cosine to any of its prompt's given negatives is >= tau."""
    if c.emb is None:
        raise ValueError("max_neg_sim needs Candidates.emb")
    neg_group = np.asarray(neg_group, dtype=np.int64)
    if neg_emb.ndim != 2 or neg_emb.shape[1] != c.emb.shape[1] or neg_group.shape != (len(neg_emb),):
        raise ValueError(f"negatives: shapes {neg_emb.shape}, {neg_group.shape} do not match "
                         f"candidates' dim {c.emb.shape[1]}")
    _check_index(neg_group, c.num_groups, "neg_group")
    emb, nemb = _f32c(c.emb), _f32c(neg_emb)
    rows = np.flatnonzero(code == KEPT)
    rows = rows[np.argsort(c.group[rows], kind="stable")]
    r_start, r_count = _group_starts(c.group[rows], c.num_groups)
    negs = np.argsort(neg_group, kind="stable")
    q_start, q_count = _group_starts(neg_group[negs], c.num_groups)
    has = (r_count > 0) & (q_count > 0)
    # bucket by (n candidates, q negatives) so every block is a dense (B, n, q) array, no padding
    base = int(q_count.max(initial=0)) + 1
    key = np.where(has, r_count.astype(np.int64) * base + q_count, -1)
    for k, groups in _size_buckets(key, lambda k: (k // base) * (k % base)):
        if k < 0:
            continue
        n, q = int(r_count[groups[0]]), int(q_count[groups[0]])
        r = rows[r_start[groups][:, None] + np.arange(n)]           # (B, n) row ids
        qq = negs[q_start[groups][:, None] + np.arange(q)]          # (B, q) negative ids
        ix = np.broadcast_to(r[:, :, None], (len(groups), n, q)).ravel()
        iy = np.broadcast_to(qq[:, None, :], (len(groups), n, q)).ravel()
        best = _indexed_ip(emb, ix, nemb, iy).reshape(len(groups), n, q).max(axis=2)
        code[r[best >= tau]] = NEAR_NEGATIVE


def _drop_near_duplicates(c: Candidates, code: np.ndarray, tau: float) -> None:
    """Greedy in sample order per prompt: drop a surviving row whose cosine to an earlier kept-so-far
    row of the same prompt is >= tau. Vectorised over all prompts of one size at once."""
    if c.emb is None:
        raise ValueError("near_dup_sim needs Candidates.emb")
    emb = _f32c(c.emb)
    rows = np.flatnonzero(code == KEPT)
    rows = rows[np.lexsort((c.sample_idx[rows], c.group[rows]))]
    start, count = _group_starts(c.group[rows], c.num_groups)
    for n, groups in _size_buckets(count, lambda n: n * n):
        if n < 2:
            continue
        r = rows[start[groups][:, None] + np.arange(n)]             # (B, n) in sample order
        ti, tj = np.tril_indices(n, -1)                              # pairs i > j
        sims = np.zeros((len(groups), n, n), dtype=np.float32)
        sims[:, ti, tj] = _indexed_ip(emb, r[:, ti].ravel(), emb, r[:, tj].ravel()).reshape(len(groups), -1)
        close = sims >= tau
        alive = np.ones((len(groups), n), dtype=bool)
        for i in range(1, n):                                        # sequential in sample order only
            alive[:, i] = ~(close[:, i, :i] & alive[:, :i]).any(axis=1)
        code[r[~alive]] = NEAR_DUPLICATE


class _Block(NamedTuple):
    """Prompts of one size bucket as a padded matrix: matrix row = prompt, columns = its rows in order."""

    groups: np.ndarray   # (B,) prompt index of each matrix row
    idx: np.ndarray      # (B, w) row ids; padding (after the real columns) repeats a row of the prompt
    valid: np.ndarray    # (B, w) False on padding


def _sorted_by_group_sample(rows: np.ndarray, g: np.ndarray, si: np.ndarray, num_groups: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` (and their groups) in (group, sample_idx, position) order: one value sort of a packed unique
    uint64 key when the three fields fit in 64 bits, else a lexsort."""
    si = si - si.min()
    gbits, sbits, rbits = (int(x).bit_length() for x in (num_groups - 1, si.max(), len(rows) - 1))
    if gbits + sbits + rbits <= 64:
        key = ((g.astype(np.uint64) << np.uint64(sbits + rbits)) | (si.astype(np.uint64) << np.uint64(rbits))
               | np.arange(len(rows), dtype=np.uint64))
        o = (np.sort(key) & np.uint64((1 << rbits) - 1)).astype(np.intp)
    else:
        o = np.lexsort((si, g))
    return rows[o], g[o]


def _prompt_blocks(c: Candidates, rows: np.ndarray) -> list[_Block]:
    """The given rows as padded per-prompt matrices.

    Prompts are bucketed by size (width = next power of two, so padding < 2x) and cut into blocks of
    <= ``_BLOCK_CELLS`` cells. Order inside a matrix row: sample_idx ascending, then row order (stable).
    """
    g, si = c.group[rows], c.sample_idx[rows]
    if len(rows) > 1 and not ((g[1:] > g[:-1]) | ((g[1:] == g[:-1]) & (si[1:] >= si[:-1]))).all():
        rows, g = _sorted_by_group_sample(rows, g, si, c.num_groups)
    start, count = _group_starts(g, c.num_groups)
    width = np.zeros_like(count)
    width[count > 0] = 1 << np.ceil(np.log2(count[count > 0])).astype(np.int64)
    blocks = []
    for w in np.unique(width[width > 0]).tolist():
        groups = np.flatnonzero(width == w)
        step = max(1, _BLOCK_CELLS // w)
        col = np.arange(w)
        for b in range(0, len(groups), step):
            gb = groups[b:b + step]
            valid = col < count[gb][:, None]
            idx = rows[start[gb][:, None] + np.where(valid, col, 0)]
            blocks.append(_Block(gb, idx, valid))
    return blocks


def _mixed_hash(text_hash: np.ndarray) -> np.ndarray:
    """uint64 text key, mixed by an odd multiplier (a bijection mod 2**64: equal ⇔ equal) so that the high
    bits differ even for small integer keys."""
    return _hash_codes(text_hash).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def _mark_duplicates(c: Candidates, code: np.ndarray, blocks: list[_Block]) -> None:
    """Exact-text dedup per prompt: a row whose text key appeared earlier in its matrix row is a duplicate.

    Per block, one value sort of ``key = (hash with its low b bits cleared) | column`` (unique in a row)
    puts equal texts next to each other in column (= sample) order, the column read back from the low
    bits. Candidate pairs (equal high bits) are confirmed on the full hash; a block where two different
    hashes share their high bits (probability ~2**-50 per pair) is redone with a stable argsort.
    Padding repeats a real text of the prompt after every real column: it never hides a first occurrence.
    """
    h = _mixed_hash(c.text_hash)
    for b in blocks:
        w = b.idx.shape[1]
        bits = max(1, (w - 1).bit_length())
        low = np.uint64((1 << bits) - 1)
        hm = h[b.idx]
        ks = np.sort((hm & ~low) | np.arange(w, dtype=np.uint64), axis=1)
        row, j = np.nonzero((ks[:, 1:] ^ ks[:, :-1]) <= low)           # same high bits
        later = (ks[row, j + 1] & low).astype(np.intp)
        if not (hm[row, later] == hm[row, (ks[row, j] & low).astype(np.intp)]).all():   # high-bit clash
            o = np.argsort(hm, axis=1, kind="stable")
            hs = np.take_along_axis(hm, o, axis=1)
            row, j = np.nonzero(hs[:, 1:] == hs[:, :-1])
            later = o[row, j + 1]
        real = b.valid[row, later]
        code[b.idx[row[real], later[real]]] = DUPLICATE


def _prefilter(c: Candidates, drop_truncated: bool, near_dup_sim: float | None,
               max_neg_sim: float | None, neg_emb: np.ndarray | None,
               neg_group: np.ndarray | None) -> tuple[np.ndarray, list[_Block]]:
    """Reason code per row after the drops that come before the ranking (0 = reaches the ranking),
    and the prompt blocks of the non-empty (non-truncated) rows, reused by the ranking."""
    code = np.zeros(len(c), dtype=np.int8)
    code[c.is_empty] = EMPTY
    if drop_truncated and c.is_truncated is not None:
        code[c.is_truncated & (code == KEPT)] = TRUNCATED
    blocks = _prompt_blocks(c, np.flatnonzero(code == KEPT))
    _mark_duplicates(c, code, blocks)
    if max_neg_sim is not None:
        if neg_emb is None or neg_group is None:
            raise ValueError("max_neg_sim needs neg_emb and neg_group")
        _drop_near_negative(c, code, neg_emb, neg_group, max_neg_sim)
    if near_dup_sim is not None:
        _drop_near_duplicates(c, code, near_dup_sim)
    return code, blocks


def _rank(c: Candidates, code: np.ndarray, blocks: list[_Block], cut: np.ndarray | None = None) -> np.ndarray:
    """Rank (int32, -1 = not ranked) of the surviving rows within their prompt: sim ascending, ties in
    matrix-row order (= sample_idx ascending, then row order).

    With ``cut`` (per prompt, ``floor(N·p)``): rows with ``rank >= min(cut, n_unique - 1)`` get NEAR_TARGET.
    """
    alive_rows = code == KEPT
    if not np.isfinite(c.sim[alive_rows]).all():
        bad = np.flatnonzero(alive_rows & ~np.isfinite(c.sim))
        raise ValueError(f"sim must be finite: {len(bad)} candidate(s) are not (NaN/inf), first row {bad[0]}")
    # order-preserving map float32 -> uint32 (-0.0 made +0.0 first), column in the low 32 bits: keys are
    # unique in a matrix row, so a plain value sort gives (sim asc, column asc) and the column back
    u = (c.sim + np.float32(0.0)).view(np.uint32)
    sim_key = np.where(u >> np.uint32(31), ~u, u | np.uint32(0x80000000)).astype(np.uint64) << np.uint64(32)
    rank = np.full(len(c) + 1, -1, dtype=np.int32)                   # + a dummy slot for the padding
    for b in blocks:
        w = b.idx.shape[1]
        alive = b.valid & alive_rows[b.idx]
        key = np.where(alive, sim_key[b.idx], np.uint64(0xFFFFFFFF) << np.uint64(32))   # dropped/pad last
        key |= np.arange(w, dtype=np.uint64)
        o = (np.sort(key, axis=1) & np.uint64(0xFFFFFFFF)).astype(np.intp)   # the columns in rank order
        ranked = np.take_along_axis(np.where(b.valid, b.idx, len(c)), o, axis=1)   # row ids in rank order
        j = np.arange(w, dtype=np.int32)
        n_alive = alive.sum(axis=1)
        rank[ranked] = np.where(j < n_alive[:, None], j, -1)
        if cut is not None:
            m = np.minimum(cut[b.groups], n_alive - 1)
            code[ranked[(j >= m[:, None]) & (j < n_alive[:, None])]] = NEAR_TARGET
    return rank[:-1]


# ---------------------------------------------------------------------------------------- strategies
def select_self_contrast(c: Candidates, keep_fraction: float = 0.75, *, drop_truncated: bool = False,
                         near_dup_sim: float | None = None, max_neg_sim: float | None = None,
                         neg_emb: np.ndarray | None = None, neg_group: np.ndarray | None = None
                         ) -> Selection:
    """Self-Contrast ``lastdedup-p`` (SPEC §1.1 step 3), all prompts at once.

    Per prompt: ``m = max(0, min(floor(N·p), n_unique − 1))`` with ``N = c.num_samples[g]`` — the number
    of samples *generated* for the prompt (as the reference code does; duplicates and empties count in
    N), ``p = keep_fraction`` (``N·p`` in float64, floored like ``int(N * p)``), ``n_unique`` = rows that
    reach the ranking. The ``m`` least similar are kept (``rank < m``); the other ranked rows are
    ``near_target``, so the most similar one is always dropped and a prompt with ``n_unique <= 1`` keeps
    nothing.
    Options: ``drop_truncated`` (reason ``truncated``), ``max_neg_sim`` with the prompt's given negatives
    ``neg_emb``/``neg_group`` (``near_negative``), ``near_dup_sim`` (``near_duplicate``); they need ``c.emb``.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    code, blocks = _prefilter(c, drop_truncated, near_dup_sim, max_neg_sim, neg_emb, neg_group)
    cut = np.floor(c.num_samples.astype(np.float64) * keep_fraction).astype(np.int64)
    rank = _rank(c, code, blocks, cut)
    return Selection(kept=code == KEPT, rank=rank, reason_code=code)


def select_random(c: Candidates, *, drop_truncated: bool = False, near_dup_sim: float | None = None,
                  max_neg_sim: float | None = None, neg_emb: np.ndarray | None = None,
                  neg_group: np.ndarray | None = None) -> Selection:
    """``alldedup``: every unique non-empty candidate is kept (``pair`` shuffles them); rank still given."""
    code, blocks = _prefilter(c, drop_truncated, near_dup_sim, max_neg_sim, neg_emb, neg_group)
    return Selection(kept=code == KEPT, rank=_rank(c, code, blocks), reason_code=code)


def select_threshold(c: Candidates, max_sim: float, *, drop_truncated: bool = False,
                     near_dup_sim: float | None = None, max_neg_sim: float | None = None,
                     neg_emb: np.ndarray | None = None, neg_group: np.ndarray | None = None) -> Selection:
    """Keep the unique non-empty candidates with ``sim < max_sim``; the others are ``near_target``."""
    code, blocks = _prefilter(c, drop_truncated, near_dup_sim, max_neg_sim, neg_emb, neg_group)
    rank = _rank(c, code, blocks)
    code[(rank >= 0) & (c.sim >= max_sim)] = NEAR_TARGET
    return Selection(kept=code == KEPT, rank=rank, reason_code=code)


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


# ------------------------------------------------------------------------------------------ the oracle
def reference_self_contrast(c: Candidates, keep_fraction: float = 0.75, *,
                            drop_truncated: bool = False) -> Selection:
    """The paper's rule written the plain way: loop over prompts, dedup with a dict in sample order,
    ``np.argsort(kind="stable")`` of the similarities (ties → earlier sample first), keep the first
    ``min(int(N * p), n_unique - 1)``. Test oracle and benchmark baseline (no near-dup/negative extras)."""
    code = np.zeros(len(c), dtype=np.int8)
    rank = np.full(len(c), -1, dtype=np.int32)
    hashes, empty = c.text_hash.tolist(), c.is_empty.tolist()
    truncated = c.is_truncated.tolist() if drop_truncated and c.is_truncated is not None else None
    by_group = np.argsort(c.group, kind="stable")
    bounds = np.cumsum(np.bincount(c.group, minlength=c.num_groups))[:-1]
    for g, rows in enumerate(np.split(by_group, bounds)):
        rows = rows[np.argsort(c.sample_idx[rows], kind="stable")]
        seen: dict = {}
        unique: list[int] = []
        for r in rows.tolist():
            if empty[r]:
                code[r] = EMPTY
            elif truncated is not None and truncated[r]:
                code[r] = TRUNCATED
            elif hashes[r] in seen:
                code[r] = DUPLICATE
            else:
                seen[hashes[r]] = r
                unique.append(r)
        if not unique:
            continue
        order = np.asarray(unique)[np.argsort(c.sim[unique], kind="stable")]
        rank[order] = np.arange(len(order))
        m = max(0, min(int(int(c.num_samples[g]) * keep_fraction), len(unique) - 1))
        code[order[m:]] = NEAR_TARGET
    return Selection(kept=code == KEPT, rank=rank, reason_code=code)


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
