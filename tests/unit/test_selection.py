"""Negative selection (negalign.selection): the Self-Contrast rule, its oracle, the extras, real FAISS."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from negalign import selection
from negalign.selection import (
    Candidates,
    cosine_to_target,
    draw_negatives,
    select,
    select_random,
    select_self_contrast,
    select_threshold,
)


def one_prompt(sims, texts=None, empty=(), truncated=(), n=None, sample_idx=None) -> Candidates:
    """A single prompt (group 0); texts default to distinct ones."""
    k = len(sims)
    texts = list(range(k)) if texts is None else texts
    return Candidates(
        group=np.zeros(k, dtype=np.int64),
        sample_idx=np.arange(k) if sample_idx is None else np.asarray(sample_idx),
        text_hash=np.asarray(texts, dtype=np.uint64),
        is_empty=np.isin(np.arange(k), list(empty)),
        sim=np.asarray(sims, dtype=np.float32),
        is_truncated=np.isin(np.arange(k), list(truncated)),
        num_samples=np.array([k if n is None else n]),
    )


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_candidates(seed: int, prompts: int = 300, n: int = 16, dim: int = 8,
                      shuffle: bool = True) -> Candidates:
    """Random prompts of varying size with injected duplicates, empties, ties, truncation; rows shuffled
    (else in (prompt, sample) order)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, n + 1, size=prompts)
    group = np.repeat(np.arange(prompts), sizes)
    sample_idx = np.concatenate([rng.permutation(s) if shuffle else np.arange(s) for s in sizes])
    m = len(group)
    text = rng.integers(0, 1 << 40, size=m, dtype=np.uint64)
    dup = rng.random(m) < 0.25                      # copy the text of another row of the same prompt
    src = np.flatnonzero(dup)
    start = np.cumsum(sizes) - sizes
    text[src] = text[start[group[src]] + rng.integers(0, sizes[group[src]])]
    sim = rng.choice(np.linspace(-0.2, 1.0, 25), size=m).astype(np.float32)   # many exact ties
    emb = unit(rng.standard_normal((m, dim)))
    perm = rng.permutation(m) if shuffle else np.arange(m)
    return Candidates(group=group[perm], sample_idx=sample_idx[perm], text_hash=text[perm],
                      is_empty=(rng.random(m) < 0.05)[perm], sim=sim[perm],
                      is_truncated=(rng.random(m) < 0.1)[perm],
                      num_samples=sizes + rng.integers(0, 3, size=prompts), emb=emb[perm])


# -------------------------------------------------------------------------------- the self-contrast rule
def test_keeps_least_similar_floor_of_n_p():
    # N = 5, p = 0.75 -> N*p = 3.75 -> m = 3 least similar kept
    sel = select_self_contrast(one_prompt([0.9, 0.1, 0.5, 0.3, 0.7]), 0.75)
    assert sel.kept.tolist() == [False, True, True, True, False]
    assert sel.rank.tolist() == [4, 0, 2, 1, 3]
    assert sel.drop_reason.tolist() == ["near_target", None, None, None, "near_target"]


def test_always_drops_the_most_similar():
    # p = 1: m = min(N, n_unique - 1) -> the most similar one still goes
    sel = select_self_contrast(one_prompt([0.2, 0.8, 0.4]), 1.0)
    assert sel.kept.tolist() == [True, False, True]


def test_ties_by_sample_idx():
    sims = [0.5, 0.5, 0.5, 0.5, 0.9]
    # input rows out of sample order: sample_idx 3, 1, 0, 2, 4
    sel = select_self_contrast(one_prompt(sims, sample_idx=[3, 1, 0, 2, 4]), 0.5)   # m = floor(2.5) = 2
    assert sel.rank.tolist() == [3, 1, 0, 2, 4]
    assert sel.kept.tolist() == [False, True, True, False, False]


def test_duplicates_keep_first_occurrence_and_count_in_n():
    # texts: A B A C A ; the first A is sample 0 (row 2 in input order)
    c = one_prompt([0.1, 0.2, 0.3, 0.4, 0.5], texts=[1, 2, 1, 3, 1], sample_idx=[4, 1, 0, 2, 3])
    sel = select_self_contrast(c, 0.75)
    assert sel.drop_reason.tolist() == ["duplicate", None, None, "near_target", "duplicate"]
    # N = 5 -> floor(3.75) = 3, but n_unique = 3 -> m = 2
    assert sel.kept.sum() == 2
    assert sel.rank.tolist() == [-1, 0, 1, 2, -1]


def test_empties_dropped_before_dedup():
    c = one_prompt([0.0, 0.1, 0.2, 0.3, 0.4], texts=[7, 7, 1, 2, 7], empty=[0, 1])
    sel = select_self_contrast(c, 0.75)
    # row 4 is not a duplicate of the (dropped) empties; 3 unique, m = min(3, 2) = 2
    assert sel.drop_reason.tolist() == ["empty", "empty", None, None, "near_target"]
    assert sel.rank.tolist() == [-1, -1, 0, 1, 2]


def test_single_unique_keeps_nothing():
    sel = select_self_contrast(one_prompt([0.1, 0.1, 0.3], texts=[5, 5, 5]), 0.75)
    assert not sel.kept.any()
    assert sel.drop_reason.tolist() == ["near_target", "duplicate", "duplicate"]
    assert sel.rank.tolist() == [0, -1, -1]
    sel = select_self_contrast(one_prompt([0.1, 0.2], empty=[0, 1]), 0.75)
    assert not sel.kept.any() and sel.rank.tolist() == [-1, -1]


def test_n_is_samples_generated_not_rows():
    # 4 rows, but 8 samples were generated (the others were duplicates collapsed upstream)
    sel = select_self_contrast(one_prompt([0.1, 0.2, 0.3, 0.4], n=8), 0.25)   # floor(2) = 2
    assert sel.kept.tolist() == [True, True, False, False]
    sel = select_self_contrast(one_prompt([0.1, 0.2, 0.3, 0.4], n=4), 0.25)   # floor(1) = 1
    assert sel.kept.tolist() == [True, False, False, False]


def test_truncated():
    c = one_prompt([0.1, 0.2, 0.3, 0.4, 0.5], texts=[1, 2, 1, 3, 4], truncated=[0, 4])
    assert select_self_contrast(c).drop_reason.tolist() == [None, None, "duplicate", None, "near_target"]
    sel = select_self_contrast(c, drop_truncated=True)
    # the truncated first copy goes; its later untruncated duplicate takes its place
    assert sel.drop_reason.tolist() == ["truncated", None, None, "near_target", "truncated"]
    assert sel.kept.tolist() == [False, True, True, False, False]
    assert sel.reason_counts() == {"kept": 2, "truncated": 2, "near_target": 1}


def test_groups_are_independent_and_string_hashes():
    c = Candidates(group=[1, 0, 1, 0, 1, 1], sample_idx=[0, 0, 1, 1, 2, 3],
                   text_hash=np.array(["aa", "aa", "bb", "cc", "aa", "dd"], dtype=object),
                   is_empty=[False] * 6, sim=[0.3, 0.9, 0.1, 0.2, 0.0, 0.5], num_samples=[2, 4])
    sel = select_self_contrast(c, 0.75)
    # prompt 0: 2 unique, m = min(1, 1) = 1 -> keeps sim 0.2 ; prompt 1: aa, bb, dd unique, m = min(3, 2)
    assert sel.drop_reason.tolist() == [None, "near_target", None, None, "duplicate", "near_target"]


def _per_row(c: Candidates, sel) -> dict:
    return {(int(g), int(i)): (int(code), int(r)) for g, i, code, r in
            zip(c.group, c.sample_idx, sel.reason_code, sel.rank, strict=True)}


@pytest.mark.parametrize("seed", range(4))
def test_row_order_and_other_prompts_do_not_matter(seed):
    # The outcome of a row depends only on its own prompt's rows, not on their order in the input nor on the
    # other prompts (so filter may select per shard, or over any set of shards, with the same result).
    c = random_candidates(seed, prompts=120, dim=4, shuffle=False)
    options = [{}, {"drop_truncated": True, "near_dup_sim": 0.8}]
    for opts in options:
        expected = _per_row(c, select_self_contrast(c, 0.75, **opts))
        assert {code for code, _ in expected.values()} >= ({0, 1, 2, 3, 5, 6} if opts else {0, 1, 3, 6})
        perm = np.random.default_rng(seed).permutation(len(c))
        shuffled = Candidates(group=c.group[perm], sample_idx=c.sample_idx[perm], text_hash=c.text_hash[perm],
                              is_empty=c.is_empty[perm], sim=c.sim[perm], is_truncated=c.is_truncated[perm],
                              num_samples=c.num_samples, emb=c.emb[perm])
        assert _per_row(shuffled, select_self_contrast(shuffled, 0.75, **opts)) == expected
        half = c.group < 60                                          # the first half of the prompts alone
        part = Candidates(group=c.group[half], sample_idx=c.sample_idx[half], text_hash=c.text_hash[half],
                          is_empty=c.is_empty[half], sim=c.sim[half], is_truncated=c.is_truncated[half],
                          num_samples=c.num_samples[:60], emb=c.emb[half])
        got = _per_row(part, select_self_contrast(part, 0.75, **opts))
        assert got == {k: v for k, v in expected.items() if k[0] < 60}


def test_signed_zero_and_negative_sims_tie_like_floats():
    c = one_prompt([0.0, -0.0, -0.5, 0.0, 1.0])
    sel = select_self_contrast(c, 1.0)
    assert sel.rank.tolist() == [1, 2, 0, 3, 4]


def test_no_rows():
    c = Candidates(group=np.zeros(0, np.int64), sample_idx=[], text_hash=np.zeros(0, np.uint64),
                   is_empty=np.zeros(0, bool), sim=[], num_samples=[3, 0])
    for sel in (select_self_contrast(c), select_random(c), select_threshold(c, 0.5)):
        assert sel.kept.shape == sel.rank.shape == (0,) and sel.reason_counts() == {}


def test_bad_inputs():
    with pytest.raises(ValueError, match="keep_fraction"):
        select_self_contrast(one_prompt([0.1, 0.2]), 1.5)
    with pytest.raises(ValueError, match="NaN"):
        select_self_contrast(one_prompt([0.1, float("nan")]))
    with pytest.raises(ValueError, match="num_samples"):
        Candidates(group=[0, 3], sample_idx=[0, 0], text_hash=[1, 2], is_empty=[0, 0], sim=[0, 0],
                   num_samples=[1, 1])
    with pytest.raises(ValueError, match="unknown strategy"):
        select("best", one_prompt([0.1]))


# ------------------------------------------------------------------------------------------ the K-draw
def test_draw_negatives():
    ids = list(range(10, 30))
    full = draw_negatives(ids, None, seed=1, prompt_id="abc")
    assert sorted(full) == ids and full != ids
    for k in (1, 2, 4, 8, 16):
        assert draw_negatives(ids, k, 1, "abc") == full[:k]                  # nested prefixes
    assert draw_negatives(ids[::-1], 8, 1, "abc") == full[:8]               # input order does not matter
    assert draw_negatives(ids, 8, 1, "abc") == draw_negatives(ids, 8, 1, "abc")
    assert draw_negatives(ids, None, 2, "abc") != full
    assert draw_negatives(ids, None, 1, "abd") != full
    assert draw_negatives(ids[:3], 4, 1, "abc") == []                       # fewer than K -> nothing
    assert draw_negatives([], 1, 1, "abc") == [] and draw_negatives([], None, 1, "x") == []


# ------------------------------------------------------------------------------------- other strategies
def test_random_keeps_every_unique():
    c = one_prompt([0.9, 0.1, 0.5, 0.3], texts=[1, 2, 1, 3], empty=[3])
    sel = select_random(c)
    assert sel.kept.tolist() == [True, True, False, False]
    assert sel.drop_reason.tolist() == [None, None, "duplicate", "empty"]
    assert sel.rank.tolist() == [1, 0, -1, -1]
    assert np.array_equal(select("random", c).kept, sel.kept)


def test_threshold():
    c = one_prompt([0.9, 0.1, 0.5, 0.3, 0.1], texts=[1, 2, 3, 4, 2])
    sel = select_threshold(c, max_sim=0.5)
    assert sel.drop_reason.tolist() == ["near_target", None, "near_target", None, "duplicate"]
    assert np.array_equal(select("threshold", c, max_sim=0.5).kept, sel.kept)
    with pytest.raises(ValueError, match="max_sim"):
        select("threshold", c)


# ------------------------------------------------------------------------------------------- the extras
def test_near_duplicate_greedy_chain():
    e = unit(np.array([[1.0, 0.0], [np.cos(0.3), np.sin(0.3)], [np.cos(0.6), np.sin(0.6)], [0.0, 1.0]]))
    c = one_prompt([0.1, 0.2, 0.3, 0.4], n=4)
    c.emb = e
    # cos(0.3) = 0.955 >= 0.95: row 1 is a near duplicate of row 0; row 2 is close only to the dropped row 1
    sel = select_random(c, near_dup_sim=0.95)
    assert sel.drop_reason.tolist() == [None, "near_duplicate", None, None]
    assert select_random(c, near_dup_sim=0.5).drop_reason.tolist() == [None, "near_duplicate",
                                                                      "near_duplicate", None]
    with pytest.raises(ValueError, match="emb"):
        select_random(one_prompt([0.1, 0.2]), near_dup_sim=0.9)


def brute_near_dup(c: Candidates, alive: np.ndarray, tau: float) -> np.ndarray:
    out = np.zeros(len(c), dtype=bool)
    for g in np.unique(c.group):
        rows = np.flatnonzero((c.group == g) & alive)
        rows = rows[np.argsort(c.sample_idx[rows], kind="stable")]
        kept: list[int] = []
        for r in rows:
            if any(float(c.emb[r] @ c.emb[k]) >= tau for k in kept):
                out[r] = True
            else:
                kept.append(r)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_near_duplicate_matches_brute_force(seed):
    c = random_candidates(seed, prompts=120, dim=4)
    base = select_random(c)
    sel = select_random(c, near_dup_sim=0.8)
    expected = brute_near_dup(c, base.kept, 0.8)
    assert expected.any()
    assert np.array_equal(sel.drop_reason == "near_duplicate", expected)
    assert np.array_equal(sel.kept, base.kept & ~expected)
    sc = select_self_contrast(c, near_dup_sim=0.8)      # n_unique counts what survives the extras
    ranked = sc.rank >= 0
    assert np.array_equal(ranked, sel.kept)


@pytest.mark.parametrize("seed", range(3))
def test_near_negative_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    c = random_candidates(seed, prompts=80, dim=4)
    neg_group = np.repeat(np.arange(c.num_groups), rng.integers(0, 4, size=c.num_groups))
    neg_emb = unit(rng.standard_normal((len(neg_group), 4)))
    sel = select_random(c, max_neg_sim=0.9, neg_emb=neg_emb, neg_group=neg_group)
    base = select_random(c)
    expected = np.zeros(len(c), dtype=bool)
    for r in np.flatnonzero(base.kept):
        negs = neg_emb[neg_group == c.group[r]]
        expected[r] = len(negs) > 0 and float((negs @ c.emb[r]).max()) >= 0.9
    assert expected.any()
    assert np.array_equal(sel.drop_reason == "near_negative", expected)
    assert np.array_equal(sel.kept, base.kept & ~expected)
    with pytest.raises(ValueError, match="neg_emb"):
        select_random(c, max_neg_sim=0.9)


# ----------------------------------------------------------------------------------------- similarity
def test_cosine_to_target_equals_einsum():
    rng = np.random.default_rng(0)
    cand, target = unit(rng.standard_normal((5000, 48))), unit(rng.standard_normal((300, 48)))
    group = rng.integers(0, 300, size=5000)
    expected = np.einsum("ij,ij->i", cand, target[group])
    for block in (1 << 18, 777):
        got = cosine_to_target(cand, target, group, block_rows=block)
        assert got.dtype == np.float32 and got.shape == (5000,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(cosine_to_target(cand, target, group), expected, atol=1e-5)   # auto


def test_cosine_to_target_checks_indices():
    e = unit(np.ones((3, 4)))
    with pytest.raises(ValueError, match="out of range"):
        cosine_to_target(e, e[:2], np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="shapes"):
        cosine_to_target(e, unit(np.ones((2, 5))), np.array([0, 1, 1]))


def test_cosine_to_target_small_calls_on_one_thread_then_restores(monkeypatch):
    # per-shard calls run FAISS single-threaded (OpenMP start-up costs more than it saves at ~2k rows)
    seen = []
    real = faiss.pairwise_indexed_inner_product

    def spy(*args):
        seen.append(faiss.omp_get_max_threads())
        return real(*args)

    monkeypatch.setattr(faiss, "pairwise_indexed_inner_product", spy)
    before = faiss.omp_get_max_threads()
    e = unit(np.random.default_rng(0).standard_normal((2048, 8)))
    cosine_to_target(e, e[:64], np.repeat(np.arange(64), 32))
    assert seen == [1] and faiss.omp_get_max_threads() == before
    monkeypatch.setattr(selection, "_SINGLE_THREAD_ROWS", 100)
    cosine_to_target(e, e[:64], np.repeat(np.arange(64), 32))
    assert seen[-1] == before


# ------------------------------------------------------------------- copies of the target, checker-correct rows
def brute_rule(c: Candidates, p: float, correct: np.ndarray | None = None) -> set[int]:
    """The reference rule written out per prompt: drop empties (and the checker-correct rows), dedup by text in
    sample order, m = min(floor(N·p), n_unique − 1), keep the m least similar (ties: earlier sample)."""
    kept: set[int] = set()
    for g in range(c.num_groups):
        rows = sorted(np.flatnonzero(c.group == g), key=lambda r: c.sample_idx[r])
        rows = [r for r in rows if not c.is_empty[r] and (correct is None or not correct[r])]
        seen, unique = set(), []
        for r in rows:
            if c.text_hash[r] not in seen:
                seen.add(c.text_hash[r])
                unique.append(r)
        m = max(0, min(int(c.num_samples[g] * p), len(unique) - 1))
        kept |= set(sorted(unique, key=lambda r: (c.sim[r], c.sample_idx[r]))[:m])
    return kept


def _with(c: Candidates, **extra) -> Candidates:
    return Candidates(group=c.group, sample_idx=c.sample_idx, text_hash=c.text_hash, is_empty=c.is_empty, sim=c.sim,
                      is_truncated=c.is_truncated, num_samples=c.num_samples, emb=c.emb, **extra)


@pytest.mark.parametrize("seed", range(3))
def test_same_as_target_is_the_reference_rule_minus_the_copies(seed):
    c = random_candidates(seed)
    copy = c.text_hash % 4 == 0                                      # a property of the text, as in the stage
    sel = select_self_contrast(_with(c, is_target_copy=copy), 0.75)
    expected = brute_rule(c, 0.75)
    assert set(np.flatnonzero(sel.kept)) == {r for r in expected if not copy[r]}
    assert set(np.flatnonzero(sel.drop_reason == "same_as_target")) == {r for r in expected if copy[r]}
    assert sel.reason_counts().get("same_as_target", 0) > 0
    base = select_self_contrast(c, 0.75)                             # the ranking is the rule's own
    assert (sel.rank == base.rank).all()


@pytest.mark.parametrize("seed", range(3))
def test_correct_rows_leave_before_the_rule(seed):
    c = random_candidates(seed)
    correct = c.text_hash % 3 == 0
    sel = select_self_contrast(_with(c, is_correct=correct), 0.75)
    assert set(np.flatnonzero(sel.kept)) == brute_rule(c, 0.75, correct)
    assert not (sel.kept & correct).any()
    assert set(np.flatnonzero(sel.drop_reason == "correct")) == set(np.flatnonzero(correct & ~c.is_empty))
    assert (sel.rank[correct] == -1).all()
    # random and threshold strategies never keep a correct row either
    for other in (select_random(_with(c, is_correct=correct)), select_threshold(_with(c, is_correct=correct), 0.5)):
        assert not (other.kept & correct).any()


def test_capped_by_unique_counts_prompts_where_n_unique_sets_m():
    c = Candidates(group=[0] * 5 + [1] * 4 + [2] * 2, sample_idx=[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1],
                   text_hash=[1, 2, 1, 3, 1, 1, 2, 3, 4, 5, 6], is_empty=[False] * 9 + [True, True],
                   sim=np.linspace(0, 1, 11), num_samples=[5, 4, 2])
    sel = select_self_contrast(c, 0.75)
    # prompt 0: 3 unique, floor(3.75) = 3 > 2 -> n_unique - 1 sets m; prompt 1: floor(3) = 3 = 4 - 1 -> not;
    # prompt 2: no candidate reaches the ranking -> not counted
    assert sel.capped_by_unique.tolist() == [True, False, False]
    assert select_random(c).capped_by_unique is None
