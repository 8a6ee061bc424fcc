"""Divergences checked against scipy and direct float64 formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as scipy_log_softmax
from scipy.special import rel_entr

from monitor.analytics.divergence import (
    LN2,
    DivergenceBatch,
    compare_distributions,
    compare_topk,
    log_softmax,
)

FloatArray = npt.NDArray[np.float64]
Pair = tuple[FloatArray, FloatArray]

RTOL = 1e-9
ATOL = 1e-12


def _normalised(logits: FloatArray) -> FloatArray:
    result: FloatArray = scipy_log_softmax(logits, axis=1)
    return result


def _random_pair(rng: np.random.Generator) -> Pair:
    primary = _normalised(3.0 * rng.standard_normal((16, 257)))
    twin = _normalised(3.0 * rng.standard_normal((16, 257)))
    return primary, twin


def _zeros_pair(rng: np.random.Generator) -> Pair:
    """Both sides have -inf log-probabilities, also where the other side is positive."""
    logits = 3.0 * rng.standard_normal((2, 16, 257))
    logits[rng.random(logits.shape) < 0.3] = -np.inf
    logits[:, :, 0] = 0.0  # keeps every row a distribution
    return _normalised(logits[0]), _normalised(logits[1])


def _one_hot_pair(rng: np.random.Generator) -> Pair:
    primary = np.full((16, 257), -np.inf)
    primary[np.arange(16), rng.integers(0, 257, 16)] = 0.0
    twin = primary.copy()
    twin[8:] = _normalised(3.0 * rng.standard_normal((8, 257)))
    return primary, twin


def _underflow_pair(rng: np.random.Generator) -> Pair:
    """Most probabilities underflow float64 (log p < -745) on both sides at the same tokens."""
    base = 2000.0 * rng.standard_normal((16, 257))
    primary = _normalised(base)
    twin = _normalised(base + 0.5 * rng.standard_normal((16, 257)))
    return primary, twin


def _near_tie_pair(rng: np.random.Generator) -> Pair:
    """Exact ties from repeated integer logits, and near ties that differ in the 12th digit."""
    ties = rng.integers(0, 3, (8, 257)).astype(np.float64)
    near = np.ones((8, 257)) + 1e-12 * rng.standard_normal((8, 257))
    primary = _normalised(np.concatenate([ties, near]))
    twin = _normalised(np.concatenate([ties[::-1], near + 1e-12 * rng.standard_normal((8, 257))]))
    return primary, twin


FAMILIES: dict[str, Callable[[np.random.Generator], Pair]] = {
    "random": _random_pair,
    "zeros": _zeros_pair,
    "one_hot": _one_hot_pair,
    "underflow": _underflow_pair,
    "near_tie": _near_tie_pair,
}


def _direct_js(p: FloatArray, q: FloatArray) -> FloatArray:
    m = 0.5 * (p + q)
    result: FloatArray = 0.5 * (rel_entr(p, m).sum(axis=1) + rel_entr(q, m).sum(axis=1))
    return result


def _reference_top_k(log_p: FloatArray, log_q: FloatArray, k: int) -> FloatArray:
    """Overlap of the k first indices after a stable sort by decreasing value."""
    top_p = np.argsort(-log_p, axis=1, kind="stable")[:, :k]
    top_q = np.argsort(-log_q, axis=1, kind="stable")[:, :k]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(top_p, top_q, strict=True)])


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_distributions_matches_scipy(family: str) -> None:
    primary, twin = FAMILIES[family](np.random.default_rng(7))
    p = np.exp(primary)
    q = np.exp(twin)

    batch = compare_distributions(primary, twin, top_k=5)

    np.testing.assert_allclose(batch.kl, rel_entr(p, q).sum(axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(batch.kl_reverse, rel_entr(q, p).sum(axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(batch.js, _direct_js(p, q), rtol=RTOL, atol=ATOL)
    # scipy returns the square root of the JS divergence, and NaN where rounding makes it slightly negative.
    with np.errstate(invalid="ignore"):
        scipy_js = jensenshannon(p, q, base=math.e, axis=1) ** 2
    defined = np.isfinite(scipy_js)
    np.testing.assert_allclose(batch.js[defined], scipy_js[defined], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(batch.tv, 0.5 * np.abs(p - q).sum(axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(batch.l2, np.linalg.norm(p - q, axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(batch.top1_agree, np.argmax(primary, axis=1) == np.argmax(twin, axis=1))
    np.testing.assert_array_equal(batch.topk_overlap, _reference_top_k(primary, twin, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_distributions_respects_bounds(family: str) -> None:
    primary, twin = FAMILIES[family](np.random.default_rng(11))

    batch = compare_distributions(primary, twin)

    assert np.all(batch.js >= 0.0)
    assert np.all(batch.js <= LN2)
    assert np.all(batch.tv >= 0.0)
    assert np.all(batch.tv <= 1.0)
    assert np.all(batch.kl >= 0.0)
    assert np.all(batch.kl_reverse >= 0.0)
    assert np.all(batch.l2 <= math.sqrt(2.0))


def test_compare_distributions_disjoint_supports_reach_bounds() -> None:
    primary = np.array([[math.log(0.5), math.log(0.5), -np.inf, -np.inf]])
    twin = np.array([[-np.inf, -np.inf, math.log(0.25), math.log(0.75)]])

    batch = compare_distributions(primary, twin, top_k=2)

    assert batch.js[0] == pytest.approx(LN2, rel=1e-15)
    assert batch.tv[0] == 1.0
    assert batch.kl[0] == math.inf
    assert batch.topk_overlap[0] == 0.0


def test_compare_distributions_identical_inputs_are_zero() -> None:
    logp = log_softmax(np.random.default_rng(3).standard_normal((8, 1000)))

    batch = compare_distributions(logp, logp)

    np.testing.assert_array_equal(batch.kl, 0.0)
    np.testing.assert_array_equal(batch.kl_reverse, 0.0)
    np.testing.assert_array_equal(batch.js, 0.0)
    np.testing.assert_array_equal(batch.tv, 0.0)
    np.testing.assert_array_equal(batch.l2, 0.0)
    np.testing.assert_array_equal(batch.top1_agree, 1.0)
    np.testing.assert_array_equal(batch.topk_overlap, 1.0)


def test_compare_distributions_float32_kl_nonnegative() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, 4096)).astype(np.float32)
    primary = log_softmax(logits)
    twin = log_softmax(logits + np.float32(1e-6) * rng.standard_normal((64, 4096)).astype(np.float32))

    batch = compare_distributions(primary, twin)

    assert np.all(batch.kl >= 0.0)
    assert np.all(batch.kl < 1e-9)
    assert np.all(batch.js >= 0.0)


def test_compare_distributions_underflowed_q_stays_finite() -> None:
    # q = exp(-800) underflows float64, but its log-probability is finite, so KL stays finite.
    primary = np.log(np.array([[0.5, 0.5]]))
    twin = np.array([[-800.0, 0.0]])

    batch = compare_distributions(primary, twin, top_k=1)

    expected = 0.5 * (math.log(0.5) + 800.0) + 0.5 * math.log(0.5)
    assert batch.kl[0] == pytest.approx(expected, rel=1e-14)
    # m = (0.25, 0.75): JS = (KL(p||m) + KL(q||m)) / 2, and q's first entry contributes nothing.
    kl_p_m = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    kl_q_m = math.log(4.0 / 3.0)
    assert batch.js[0] == pytest.approx(0.5 * (kl_p_m + kl_q_m), rel=1e-12)


def test_compare_distributions_subnormal_mixture_stays_finite() -> None:
    # p = 5e-324 (the smallest subnormal) and q = exp(-800) = 0 in float64: (p + q) / 2 rounds to 0.
    primary = np.array([[math.log1p(-5e-324), math.log(5e-324)]])
    twin = np.array([[0.0, -800.0]])

    batch = compare_distributions(primary, twin, top_k=1)

    assert batch.js[0] == pytest.approx(0.0, abs=1e-300)
    assert math.isfinite(batch.kl[0])


def test_compare_distributions_zero_q_gives_inf() -> None:
    primary = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    twin = np.array([[-np.inf, 0.0], [math.log(0.5), math.log(0.5)]])

    batch = compare_distributions(primary, twin, top_k=1)
    summary = batch.summary()

    assert batch.kl[0] == math.inf
    assert math.isfinite(batch.kl_reverse[0])
    assert math.isfinite(batch.js[0])
    assert summary.nonfinite == 1
    assert summary.count == 1
    assert summary.kl == 0.0


def test_compare_distributions_counts_nan_row() -> None:
    primary = log_softmax(np.random.default_rng(1).standard_normal((3, 50)))
    twin = primary.copy()
    twin[1, 7] = np.nan

    batch = compare_distributions(primary, twin)
    summary = batch.summary()

    assert np.isnan(batch.kl[1])
    assert np.isnan(batch.topk_overlap[1])
    assert np.all(np.isfinite(batch.kl[[0, 2]]))
    assert summary.nonfinite == 1
    assert summary.count == 2


def test_compare_distributions_summary_averages_finite_rows() -> None:
    primary, twin = _random_pair(np.random.default_rng(2))

    summary = compare_distributions(primary, twin).summary()

    p = np.exp(primary)
    q = np.exp(twin)
    assert summary.kl == pytest.approx(rel_entr(p, q).sum(axis=1).mean(), rel=RTOL)
    assert summary.js == pytest.approx(_direct_js(p, q).mean(), rel=RTOL)
    assert summary.top1_agree == pytest.approx(np.mean(np.argmax(p, axis=1) == np.argmax(q, axis=1)))
    assert summary.count == 16
    assert summary.nonfinite == 0


def test_summary_without_finite_rows_is_nan() -> None:
    primary = np.log(np.array([[0.5, 0.5]]))
    twin = np.array([[-np.inf, 0.0]])

    summary = compare_distributions(primary, twin, top_k=1).summary()

    assert summary.count == 0
    assert summary.nonfinite == 1
    assert math.isnan(summary.kl)


def test_compare_distributions_ties_go_to_lowest_index() -> None:
    # Both rows tie on tokens 1 and 3; the twin also ties tokens 0 and 2 one level lower.
    primary = np.log(np.array([[0.1, 0.4, 0.1, 0.4]]))
    twin = np.log(np.array([[0.2, 0.3, 0.2, 0.3]]))

    batch = compare_distributions(primary, twin, top_k=3)

    assert batch.top1_agree[0] == 1.0
    # Top-3: primary {1, 3, 0}, twin {1, 3, 0}.
    assert batch.topk_overlap[0] == 1.0


def test_compare_distributions_arrays_are_read_only() -> None:
    primary, twin = _random_pair(np.random.default_rng(4))

    batch = compare_distributions(primary, twin)

    with pytest.raises(ValueError, match="read-only"):
        batch.kl[0] = 0.0


def test_compare_distributions_blocks_match_rows() -> None:
    # 40 rows of 32,000 tokens span several internal row blocks.
    rng = np.random.default_rng(9)
    primary = log_softmax(rng.standard_normal((40, 32_000)))
    twin = log_softmax(rng.standard_normal((40, 32_000)))

    batch = compare_distributions(primary, twin)

    expected = [compare_distributions(primary[i : i + 1], twin[i : i + 1]).kl[0] for i in range(40)]
    np.testing.assert_allclose(batch.kl, expected, rtol=1e-13)


@pytest.mark.parametrize(
    ("primary_shape", "twin_shape", "top_k", "message"),
    [
        ((4, 10), (4, 11), 5, "same shape"),
        ((10,), (10,), 5, "2-D"),
        ((2, 3, 4), (2, 3, 4), 2, "2-D"),
        ((0, 10), (0, 10), 5, "non-empty"),
        ((4, 10), (4, 10), 0, "top_k must be an integer in \\[1, 10\\]"),
        ((4, 10), (4, 10), 11, "top_k must be an integer in \\[1, 10\\]"),
    ],
)
def test_compare_distributions_rejects_bad_shapes(
    primary_shape: tuple[int, ...], twin_shape: tuple[int, ...], top_k: int, message: str
) -> None:
    primary = np.full(primary_shape, -math.log(primary_shape[-1]))
    twin = np.full(twin_shape, -math.log(twin_shape[-1]))

    with pytest.raises(ValueError, match=message):
        compare_distributions(primary, twin, top_k=top_k)


def test_compare_distributions_rejects_logits() -> None:
    logits = np.random.default_rng(0).standard_normal((4, 100)) + 5.0

    with pytest.raises(ValueError, match=r"primary_logp row 0 sums to probability .* pass log-probabilities"):
        compare_distributions(logits, logits)


def test_compare_distributions_rejects_row_without_mass() -> None:
    primary = np.log(np.full((2, 4), 0.25))
    twin = primary.copy()
    twin[1] = -np.inf

    with pytest.raises(ValueError, match="twin_logp row 1 sums to probability 0"):
        compare_distributions(primary, twin, top_k=2)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(2, 40)),
        elements=st.floats(-1e4, 1e4),
    ),
    st.floats(-50.0, 50.0),
)
def test_compare_distributions_finite_logits_never_nan(logits: FloatArray, shift: float) -> None:
    primary = log_softmax(logits)
    twin = log_softmax(logits[:, ::-1] * shift)

    batch = compare_distributions(primary, twin, top_k=1)

    for field in _fields(batch):
        assert np.all(np.isfinite(field))


def _fields(batch: DivergenceBatch) -> list[FloatArray]:
    return [batch.kl, batch.kl_reverse, batch.js, batch.tv, batch.top1_agree, batch.topk_overlap, batch.l2]


def test_log_softmax_matches_scipy() -> None:
    logits = 4.0 * np.random.default_rng(0).standard_normal((3, 5, 300))

    result = log_softmax(logits)

    assert result.dtype == np.float32
    assert result.shape == (3, 5, 300)
    np.testing.assert_allclose(result, scipy_log_softmax(logits, axis=-1), rtol=1e-6, atol=1e-6)


def test_log_softmax_large_logits_stay_finite() -> None:
    logits = np.array([[1e30, 1e30 - 1e24, -1e30], [-1e4, -1e4, -1e4]], dtype=np.float64)

    result = log_softmax(logits)

    np.testing.assert_allclose(result[0, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(result[1], -math.log(3.0), rtol=1e-6)
    assert result[0, 2] == pytest.approx(-2e30, rel=1e-6)


def test_log_softmax_masked_tokens_get_minus_infinity() -> None:
    logits = np.array([[0.0, -np.inf, 0.0]])

    result = log_softmax(logits)

    assert result[0, 1] == -np.inf
    np.testing.assert_allclose(result[0, [0, 2]], math.log(0.5), rtol=1e-6)


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (np.array([[0.0, np.nan]]), "NaN or \\+inf"),
        (np.array([[0.0, np.inf]]), "NaN or \\+inf"),
        (np.array([[0.0, 1.0], [-np.inf, -np.inf]]), "at index \\(1,\\)"),
        (np.float64(1.0), "at least one axis"),
        (np.zeros((2, 0)), "non-empty last"),
        (np.array([[1 + 1j]]), "real numbers"),
    ],
)
def test_log_softmax_rejects_invalid_logits(logits: npt.NDArray[np.generic], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        log_softmax(logits)


# Top-k estimators against the full computation.


def _topk_inputs(primary: FloatArray, k: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    ids = np.argsort(-primary, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(primary, ids, axis=1)


def _heavy_tail(rng: np.random.Generator, vocabulary: int) -> Pair:
    """A nearly flat primary, so most of its mass is in the tail."""
    return _normalised(0.1 * rng.standard_normal((6, vocabulary))), _normalised(
        2.0 * rng.standard_normal((6, vocabulary))
    )


def _tail_starved(rng: np.random.Generator, vocabulary: int) -> Pair:
    """The twin gives the primary's tail almost no mass, the worst case for the lower bound."""
    primary = _normalised(rng.standard_normal((6, vocabulary)))
    twin = np.full((6, vocabulary), -40.0)
    ids, _ = _topk_inputs(primary, 8)
    np.put_along_axis(twin, ids, 0.0, axis=1)
    return primary, _normalised(twin)


def _peaked(rng: np.random.Generator, vocabulary: int) -> Pair:
    logits = rng.standard_normal((6, vocabulary))
    logits[:, 3] += 20.0
    return _normalised(logits), _normalised(logits + rng.standard_normal((6, vocabulary)))


def _tie_at_k(rng: np.random.Generator, vocabulary: int) -> Pair:
    """Ranks k and k + 1 of the primary tie exactly."""
    logits = rng.standard_normal((6, vocabulary)) - 10.0
    logits[:, :9] = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 2.0])
    return _normalised(logits), _normalised(rng.standard_normal((6, vocabulary)))


def _twin_on_tail(rng: np.random.Generator, vocabulary: int) -> Pair:
    """The twin concentrates on a token that the primary keeps in its tail."""
    primary = _normalised(rng.standard_normal((6, vocabulary)))
    twin_logits = rng.standard_normal((6, vocabulary))
    tail_token = np.argsort(primary, axis=1)[:, 0]
    twin_logits[np.arange(6), tail_token] += 30.0
    return primary, _normalised(twin_logits)


TOPK_FAMILIES: dict[str, Callable[[np.random.Generator, int], Pair]] = {
    "random": lambda rng, v: (
        _normalised(3 * rng.standard_normal((6, v))),
        _normalised(3 * rng.standard_normal((6, v))),
    ),
    "heavy_tail": _heavy_tail,
    "tail_starved": _tail_starved,
    "peaked": _peaked,
    "tie_at_k": _tie_at_k,
    "twin_on_tail": _twin_on_tail,
}
TOPK_CASES = [(family, vocabulary, k) for family in TOPK_FAMILIES for vocabulary in (256, 32_000) for k in (1, 8, 64)]


def _tail_kl(primary: FloatArray, twin: FloatArray, ids: npt.NDArray[np.int64]) -> FloatArray:
    """Compute p_tail * KL(p | tail || q | tail) directly in float64."""
    p = np.exp(primary)
    q = np.exp(twin)
    tail = np.ones(primary.shape, dtype=bool)
    np.put_along_axis(tail, ids, False, axis=1)
    p_tail = np.where(tail, p, 0.0).sum(axis=1)
    q_tail = np.where(tail, q, 0.0).sum(axis=1)
    conditional = rel_entr(np.where(tail, p, 0.0) / p_tail[:, None], np.where(tail, q, 0.0) / q_tail[:, None])
    result: FloatArray = p_tail * conditional.sum(axis=1)
    return result


@pytest.mark.parametrize(("family", "vocabulary", "k"), TOPK_CASES)
def test_compare_topk_bounds_full_divergence(family: str, vocabulary: int, k: int) -> None:
    primary, twin = TOPK_FAMILIES[family](np.random.default_rng(vocabulary + k), vocabulary)
    ids, top_logp = _topk_inputs(primary, k)
    full = compare_distributions(primary, twin)

    estimate = compare_topk(ids, top_logp, twin)

    assert np.all(estimate.kl <= full.kl * (1 + 1e-12) + ATOL)
    assert np.all(full.kl <= estimate.kl_upper * (1 + 1e-12) + ATOL)
    assert np.all(estimate.js <= full.js + ATOL)
    assert np.all(full.js <= estimate.js_upper + ATOL)
    assert np.all(estimate.js_upper <= LN2)


@pytest.mark.parametrize(("family", "vocabulary", "k"), TOPK_CASES)
def test_compare_topk_gap_equals_tail_kl(family: str, vocabulary: int, k: int) -> None:
    primary, twin = TOPK_FAMILIES[family](np.random.default_rng(vocabulary * k), vocabulary)
    ids, top_logp = _topk_inputs(primary, k)
    full = compare_distributions(primary, twin)

    estimate = compare_topk(ids, top_logp, twin)

    np.testing.assert_allclose(full.kl - estimate.kl, _tail_kl(primary, twin, ids), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("vocabulary", [256, 32_000])
def test_compare_topk_tail_masses_match_direct_sums(vocabulary: int) -> None:
    primary, twin = _random_pair_of_size(np.random.default_rng(1), vocabulary)
    ids, top_logp = _topk_inputs(primary, 10)

    estimate = compare_topk(ids, top_logp, twin)

    tail = np.ones(primary.shape, dtype=bool)
    np.put_along_axis(tail, ids, False, axis=1)
    np.testing.assert_allclose(estimate.p_tail, np.where(tail, np.exp(primary), 0.0).sum(axis=1), rtol=1e-10)
    np.testing.assert_allclose(estimate.q_tail, np.where(tail, np.exp(twin), 0.0).sum(axis=1), rtol=1e-10)


def _random_pair_of_size(rng: np.random.Generator, vocabulary: int) -> Pair:
    return _normalised(2 * rng.standard_normal((6, vocabulary))), _normalised(2 * rng.standard_normal((6, vocabulary)))


def test_compare_topk_top1_matches_full() -> None:
    primary, twin = _random_pair_of_size(np.random.default_rng(8), 50)
    twin[:3] = primary[:3]
    ids, top_logp = _topk_inputs(primary, 5)

    estimate = compare_topk(ids, top_logp, twin)

    np.testing.assert_array_equal(estimate.top1_agree, compare_distributions(primary, twin).top1_agree)
    np.testing.assert_array_equal(estimate.top1_agree[:3], 1.0)


def test_compare_topk_top1_tie_goes_to_lowest_id() -> None:
    # Tokens 5 and 2 tie on the primary, listed in that order; the twin's argmax is token 2.
    ids = np.array([[5, 2]])
    top_logp = np.log(np.array([[0.3, 0.3]]))
    twin = np.log(np.array([[0.1, 0.1, 0.4, 0.1, 0.1, 0.2]]))

    estimate = compare_topk(ids, top_logp, twin)

    assert estimate.top1_agree[0] == 1.0


def test_compare_topk_empty_tail_is_exact() -> None:
    # The primary's support is its top-8, so p_tail is 0 and the coarse values are the full values.
    rng = np.random.default_rng(12)
    logits = np.full((6, 1000), -np.inf)
    logits[:, :8] = rng.standard_normal((6, 8))
    primary = _normalised(logits)
    twin = _normalised(rng.standard_normal((6, 1000)))
    ids, top_logp = _topk_inputs(primary, 8)
    full = compare_distributions(primary, twin)

    estimate = compare_topk(ids, top_logp, twin)

    np.testing.assert_array_equal(estimate.p_tail, 0.0)
    np.testing.assert_allclose(estimate.kl, full.kl, rtol=1e-12)
    np.testing.assert_array_equal(estimate.kl_upper, estimate.kl)


def test_compare_topk_all_tokens_equals_full() -> None:
    primary, twin = _random_pair_of_size(np.random.default_rng(13), 64)
    ids, top_logp = _topk_inputs(primary, 64)
    full = compare_distributions(primary, twin)

    estimate = compare_topk(ids, top_logp, twin)

    np.testing.assert_allclose(estimate.kl, full.kl, rtol=1e-10, atol=ATOL)
    np.testing.assert_allclose(estimate.js, full.js, rtol=1e-10, atol=ATOL)
    np.testing.assert_allclose(estimate.q_tail, 0.0, atol=ATOL)


def test_compare_topk_identical_distributions_are_zero() -> None:
    primary, _ = _random_pair_of_size(np.random.default_rng(14), 300)
    ids, top_logp = _topk_inputs(primary, 5)

    estimate = compare_topk(ids, top_logp, primary)

    np.testing.assert_allclose(estimate.kl, 0.0, atol=ATOL)
    np.testing.assert_allclose(estimate.js, 0.0, atol=ATOL)
    np.testing.assert_allclose(estimate.p_tail, estimate.q_tail, rtol=1e-12)


def test_compare_topk_summary_counts_nan_rows() -> None:
    primary, twin = _random_pair_of_size(np.random.default_rng(15), 100)
    ids, top_logp = _topk_inputs(primary, 4)
    top_logp[2, 0] = np.nan

    summary = compare_topk(ids, top_logp, twin).summary()

    assert summary.nonfinite == 1
    assert summary.count == 5


def test_compare_topk_rescales_heavy_top_mass() -> None:
    # Rounding on the primary can make the published probabilities sum to a little more than 1.
    ids = np.array([[0, 1]])
    top_logp = np.log(np.array([[0.5005, 0.5005]]))
    twin = np.log(np.array([[0.25, 0.25, 0.5]]))

    estimate = compare_topk(ids, top_logp, twin)

    assert estimate.p_tail[0] == 0.0
    assert estimate.kl[0] == pytest.approx(math.log(2.0), rel=1e-12)


@pytest.mark.parametrize(
    ("ids", "top_logp", "message"),
    [
        (np.array([[0, 0]]), np.log([[0.3, 0.2]]), "repeats a token id"),
        (np.array([[0, 9]]), np.log([[0.3, 0.2]]), "outside the vocabulary \\[0, 4\\)"),
        (np.array([[0, -1]]), np.log([[0.3, 0.2]]), "outside the vocabulary"),
        (np.array([[0.0, 1.0]]), np.log([[0.3, 0.2]]), "integer array"),
        (np.array([[0, 1]]), np.log([[0.3, 0.2, 0.1]]), "both must be \\(positions, k\\)"),
        (np.array([[0, 1]]), np.log([[0.8, 0.7]]), "sums to probability 1.5.* more than 1"),
    ],
)
def test_compare_topk_rejects_invalid_inputs(ids: npt.NDArray[np.generic], top_logp: FloatArray, message: str) -> None:
    twin = np.log(np.full((1, 4), 0.25))

    with pytest.raises(ValueError, match=message):
        compare_topk(ids, top_logp, twin)
