"""Divergences between the next-token distributions of a primary and a twin.

Every quantity uses the natural logarithm, so divergences are in nats, and is computed in float64
whatever the input dtype. Inputs are log-probabilities of shape (B, V): B positions, V vocabulary
entries. A row that contains NaN or +inf in either input gives NaN in every field of that row, so that
one broken position is counted (see `DivergenceBatch.summary`) instead of failing the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

LN2 = math.log(2.0)

# Maximum |log(sum of probabilities)| of a row accepted as a distribution. Log-probabilities rounded to
# float16 sum to 1 within 0.03 % (measured on random rows of 256 and 32,000 tokens), while logits passed
# by mistake are typically off by several nats.
LOG_MASS_TOLERANCE = 0.01

# Rows are processed in blocks of about 2 MiB of float64, so that the temporaries of one block stay in
# cache and are reused instead of allocating arrays of the full batch size.
_BLOCK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class DivergenceSummary:
    """Means of the fields of a `DivergenceBatch` over its finite positions.

    A position is finite when every field is finite there. The means are NaN when `count` is 0.
    """

    kl: float
    kl_reverse: float
    js: float
    tv: float
    top1_agree: float
    topk_overlap: float
    l2: float
    count: int
    nonfinite: int


@dataclass(frozen=True, eq=False)
class DivergenceBatch:
    """Per-position divergences of two batches of next-token distributions, each of shape (B,).

    `kl` is KL(p||q) and `kl_reverse` is KL(q||p), with p the primary's distribution and q the twin's.
    `js` is the Jensen-Shannon divergence in [0, ln 2], `tv` the total variation distance in [0, 1],
    `top1_agree` is 1.0 where both argmax tokens agree, `topk_overlap` is |top-k(p) ∩ top-k(q)| / k and
    `l2` is the Euclidean norm of p - q. The arrays are read-only.
    """

    kl: FloatArray
    kl_reverse: FloatArray
    js: FloatArray
    tv: FloatArray
    top1_agree: FloatArray
    topk_overlap: FloatArray
    l2: FloatArray
    top_k: int

    def summary(self) -> DivergenceSummary:
        """Average every field over the positions where all fields are finite."""
        means, count, nonfinite = _finite_means(
            [self.kl, self.kl_reverse, self.js, self.tv, self.top1_agree, self.topk_overlap, self.l2]
        )
        kl, kl_reverse, js, tv, top1_agree, topk_overlap, l2 = means
        return DivergenceSummary(
            kl=kl,
            kl_reverse=kl_reverse,
            js=js,
            tv=tv,
            top1_agree=top1_agree,
            topk_overlap=topk_overlap,
            l2=l2,
            count=count,
            nonfinite=nonfinite,
        )


@dataclass(frozen=True)
class TopKSummary:
    """Means of the fields of a `TopKDivergence` over its finite positions (NaN when `count` is 0)."""

    kl: float
    kl_upper: float
    js: float
    js_upper: float
    top1_agree: float
    p_tail: float
    q_tail: float
    count: int
    nonfinite: int


@dataclass(frozen=True, eq=False)
class TopKDivergence:
    """Divergences estimated from the primary's top-k log-probabilities, each of shape (B,).

    Both distributions are coarse-grained to k + 1 buckets: the primary's k published tokens and one tail
    bucket for everything else. By the data-processing inequality, `kl` and `js` of the coarse-grained
    distributions are lower bounds of the full KL(p||q) and JS(p, q). The exact gap of the KL is
    p_tail * KL(p | tail || q | tail), so it is 0 when p_tail is 0. `kl_upper` and `js_upper` are upper
    bounds that hold for any primary tail (see `compare_topk`). `p_tail` and `q_tail` are the probability
    masses outside the k tokens. The arrays are read-only.
    """

    kl: FloatArray
    kl_upper: FloatArray
    js: FloatArray
    js_upper: FloatArray
    top1_agree: FloatArray
    p_tail: FloatArray
    q_tail: FloatArray

    def summary(self) -> TopKSummary:
        """Average every field over the positions where all fields are finite."""
        means, count, nonfinite = _finite_means(
            [self.kl, self.kl_upper, self.js, self.js_upper, self.top1_agree, self.p_tail, self.q_tail]
        )
        kl, kl_upper, js, js_upper, top1_agree, p_tail, q_tail = means
        return TopKSummary(
            kl=kl,
            kl_upper=kl_upper,
            js=js,
            js_upper=js_upper,
            top1_agree=top1_agree,
            p_tail=p_tail,
            q_tail=q_tail,
            count=count,
            nonfinite=nonfinite,
        )


def log_softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Normalise logits to log-probabilities over the last axis, for any leading shape.

    The maximum of each row is subtracted before exponentiating, so logits of any magnitude are safe.
    Entries of -inf (masked tokens) get log-probability -inf. The sum runs in float64 and only the result
    is rounded to float32.

    Raises:
        ValueError: the input is a scalar, has an empty last axis or is not real-valued, contains NaN or
            +inf, or a row is entirely -inf.
    """
    values = _as_real_array(logits, "logits")
    if values.ndim == 0 or values.shape[-1] == 0:
        raise ValueError(
            f"logits must have at least one axis and a non-empty last (vocabulary) axis, got shape {values.shape}"
        )
    rows = values.reshape(-1, values.shape[-1])
    result = np.empty(rows.shape, dtype=np.float32)

    for block in _row_blocks(rows.shape):
        chunk = rows[block].astype(np.float64)
        # The maximum is NaN for a row with NaN, +inf for a row with +inf and -inf for a row of -inf only.
        row_max = chunk.max(axis=1, keepdims=True)
        bad_rows = ~np.isfinite(row_max[:, 0])
        if bad_rows.any():
            row = block.start + int(np.argmax(bad_rows))
            index = tuple(int(i) for i in np.unravel_index(row, values.shape[:-1]))
            location = f" at index {index}" if values.ndim > 1 else ""
            raise ValueError(
                f"logits contain NaN or +inf, or a row of -inf only{location}; "
                "pass finite logits, with -inf only for masked tokens"
            )

        chunk -= row_max
        chunk -= np.log(np.exp(chunk).sum(axis=1, keepdims=True))
        result[block] = chunk

    return result.reshape(values.shape)


def compare_distributions(primary_logp: npt.ArrayLike, twin_logp: npt.ArrayLike, *, top_k: int = 5) -> DivergenceBatch:
    """Compare the primary's and the twin's next-token distributions position by position.

    Both inputs are log-probabilities of shape (B, V), for example from `log_softmax`. Each row is
    renormalised in float64 first. Rows rounded to float32 sum to 1 only within about 1e-7, which would
    otherwise show up as small negative KL values.

    A probability p == 0, from a log-probability of -inf or from exp() underflowing float64 (log p below
    about -745), contributes 0 to the p * log(p / q) terms. Where p > 0 and log q is -inf, KL(p||q) is
    +inf. The ratio p / q is taken in log space, so a q that underflows but has a finite log-probability
    still gives its exact finite contribution. Finite inputs never give NaN.

    Ties in the top-1 and top-k rankings go to the lowest token index on both sides.

    Raises:
        ValueError: the inputs are not 2-D or differ in shape, or `top_k` is not in [1, V]. Also raised
            when a row without NaN or +inf does not sum to 1 within `LOG_MASS_TOLERANCE`, which happens
            for logits passed instead of log-probabilities and for a row that is entirely -inf.
    """
    primary = _as_matrix(primary_logp, "primary_logp")
    twin = _as_matrix(twin_logp, "twin_logp")
    if primary.shape != twin.shape:
        raise ValueError(
            f"primary_logp has shape {primary.shape} but twin_logp has shape {twin.shape}; "
            "both must be (positions, vocabulary) with the same shape"
        )
    _check_top_k(top_k, primary.shape[1])

    results = np.empty((7, primary.shape[0]), dtype=np.float64)
    for block in _row_blocks(primary.shape):
        results[:, block] = _compare_block(primary[block], twin[block], top_k, block.start)

    results.setflags(write=False)
    kl, kl_reverse, js, tv, top1_agree, topk_overlap, l2 = results
    return DivergenceBatch(
        kl=kl,
        kl_reverse=kl_reverse,
        js=js,
        tv=tv,
        top1_agree=top1_agree,
        topk_overlap=topk_overlap,
        l2=l2,
        top_k=top_k,
    )


def compare_topk(primary_ids: npt.ArrayLike, primary_logp: npt.ArrayLike, twin_logp: npt.ArrayLike) -> TopKDivergence:
    """Estimate the divergences when the primary publishes only its top-k log-probabilities.

    `primary_ids` (B, k) are the token ids the primary published, `primary_logp` (B, k) their
    log-probabilities under the primary's full distribution and `twin_logp` (B, V) the twin's full
    log-probabilities. Both sides are reduced to k + 1 buckets: the k tokens and a tail bucket with
    p_tail = 1 - sum(p[ids]) and q_tail = 1 - sum(q[ids]), where q_tail is summed over the other tokens
    directly to avoid cancellation. KL and JS of these coarse-grained distributions are lower bounds of
    the full values (data-processing inequality), with the exact gaps

        KL(p||q) - KL_k = p_tail * KL(p | tail || q | tail)
        JS(p, q) - JS_k = m_tail * JS_w(p | tail, q | tail),  m_tail = (p_tail + q_tail) / 2,

    where JS_w is the Jensen-Shannon divergence with weights w = p_tail / (2 m_tail) and 1 - w. The twin
    does not see p | tail, but for any distribution a over the tail KL(a || b) <= -log(min b), and JS_w is
    at most the binary entropy h(w). Hence

        kl_upper = KL_k + p_tail * log(q_tail / min q over the tail)
        js_upper = min(JS_k + m_tail * h(w), ln 2).

    Both gaps and bounds are 0 when p_tail is 0. `kl_upper` is loose when the primary's tail is heavy and
    the twin gives some tail token a tiny probability, because it assumes the worst case that the whole
    tail mass sits on that token. The primary's top token is its largest published log-probability (ties
    to the lowest id) and the twin's is its argmax (ties to the lowest index).

    If the published probabilities sum to slightly more than 1 (within `LOG_MASS_TOLERANCE`, from rounding
    on the primary), they are scaled to sum to 1 and p_tail is 0.

    Raises:
        ValueError: the shapes disagree, or the ids are not integers, are outside [0, V) or repeat
            within a row. Also raised when the published probabilities of a row sum to more than 1
            beyond the tolerance, or a twin row does not sum to 1.
    """
    raw_ids = np.asarray(primary_ids)
    if not np.issubdtype(raw_ids.dtype, np.integer):
        raise ValueError(f"primary_ids must be an integer array of token ids, got dtype {raw_ids.dtype}")
    ids = raw_ids.astype(np.int64)
    top_logp = _as_matrix(primary_logp, "primary_logp")
    twin = _as_matrix(twin_logp, "twin_logp")
    _check_topk_inputs(ids, top_logp, twin)

    results = np.empty((7, twin.shape[0]), dtype=np.float64)
    for block in _row_blocks(twin.shape):
        results[:, block] = _compare_topk_block(ids[block], top_logp[block], twin[block], block.start)

    results.setflags(write=False)
    kl, kl_upper, js, js_upper, top1_agree, p_tail, q_tail = results
    return TopKDivergence(
        kl=kl,
        kl_upper=kl_upper,
        js=js,
        js_upper=js_upper,
        top1_agree=top1_agree,
        p_tail=p_tail,
        q_tail=q_tail,
    )


def _compare_block(
    primary_block: npt.NDArray[Any], twin_block: npt.NDArray[Any], top_k: int, first_row: int
) -> FloatArray:
    """Compute the seven fields of `DivergenceBatch` for a block of rows, as an array of shape (7, rows)."""
    primary = primary_block.astype(np.float64)
    twin = twin_block.astype(np.float64)

    # Rows with NaN or +inf get placeholders so the arithmetic stays quiet, and NaN results at the end.
    broken = _broken_rows(primary) | _broken_rows(twin)
    primary[broken] = 0.0
    twin[broken] = 0.0

    log_p = _normalise_rows(primary, broken, "primary_logp", first_row)
    log_q = _normalise_rows(twin, broken, "twin_logp", first_row)
    p = np.exp(log_p)
    q = np.exp(log_q)

    results = np.empty((7, primary.shape[0]), dtype=np.float64)
    results[0] = _kl_rows(p, log_p, log_q)
    results[1] = _kl_rows(q, log_q, log_p)
    results[2] = _js_rows(p, q, log_p, log_q)

    difference = np.subtract(p, q, out=p)
    # 0.5 * sum |p - q| exceeds 1 only by rounding, because both rows sum to 1.
    results[3] = np.minimum(0.5 * np.abs(difference).sum(axis=1), 1.0)
    results[6] = np.sqrt(np.einsum("ij,ij->i", difference, difference))

    # Rank on the inputs before renormalisation, which could merge values that differ in the last bit.
    results[4] = np.argmax(primary, axis=1) == np.argmax(twin, axis=1)
    in_top_p = _top_k_mask(primary, top_k)
    in_top_q = _top_k_mask(twin, top_k)
    results[5] = np.count_nonzero(in_top_p & in_top_q, axis=1) / top_k

    results[:, broken] = math.nan
    return results


def _compare_topk_block(
    ids: npt.NDArray[np.int64], top_logp_block: npt.NDArray[Any], twin_block: npt.NDArray[Any], first_row: int
) -> FloatArray:
    """Compute the seven fields of `TopKDivergence` for a block of rows, as an array of shape (7, rows)."""
    top_logp = top_logp_block.astype(np.float64)
    twin = twin_block.astype(np.float64)

    broken = _broken_rows(top_logp) | _broken_rows(twin)
    top_logp[broken] = -math.log(top_logp.shape[1])
    twin[broken] = 0.0

    # Primary side: the k published tokens and the tail mass 1 - sum(p[ids]).
    top_mass_log = _logsumexp_rows(top_logp)
    too_heavy = (top_mass_log > LOG_MASS_TOLERANCE) & ~broken
    if too_heavy.any():
        row = int(np.argmax(too_heavy))
        raise ValueError(
            f"primary_logp row {first_row + row} sums to probability {math.exp(top_mass_log[row]):.6f}, "
            "more than 1; the published values must be log-probabilities of the primary's full distribution"
        )
    top_logp -= np.maximum(top_mass_log, 0.0)[:, None]
    # -expm1(log s) = 1 - s without cancellation when s is close to 1.
    p_tail = np.maximum(-np.expm1(np.minimum(top_mass_log, 0.0)), 0.0)
    with np.errstate(divide="ignore"):
        log_p_tail = np.log(p_tail)

    # Twin side: the same k tokens and a tail summed over every other token.
    log_q = _normalise_rows(twin, broken, "twin_logp", first_row)
    in_top = np.zeros(twin.shape, dtype=bool)
    np.put_along_axis(in_top, ids, True, axis=1)
    log_q_tail = _logsumexp_rows(np.where(in_top, -np.inf, log_q))
    min_log_q_tail = np.where(in_top, np.inf, log_q).min(axis=1)
    q_tail = np.exp(log_q_tail)

    coarse_log_p = np.concatenate([top_logp, log_p_tail[:, None]], axis=1)
    coarse_log_q = np.concatenate([np.take_along_axis(log_q, ids, axis=1), log_q_tail[:, None]], axis=1)
    coarse_p = np.exp(coarse_log_p)
    coarse_q = np.exp(coarse_log_q)

    results = np.empty((7, twin.shape[0]), dtype=np.float64)
    results[0] = _kl_rows(coarse_p, coarse_log_p, coarse_log_q)
    results[1] = results[0] + _kl_gap_bound(p_tail, log_q_tail, min_log_q_tail)
    results[2] = _js_rows(coarse_p, coarse_q, coarse_log_p, coarse_log_q)
    results[3] = np.minimum(results[2] + _js_gap_bound(p_tail, q_tail), LN2)

    row_max = top_logp.max(axis=1, keepdims=True)
    primary_top1 = np.where(top_logp == row_max, ids, twin.shape[1]).min(axis=1)
    results[4] = primary_top1 == np.argmax(twin, axis=1)
    results[5] = p_tail
    results[6] = q_tail

    results[:, broken] = math.nan
    return results


def _row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Split the rows of a (rows, columns) array into blocks of about `_BLOCK_ELEMENTS` elements."""
    rows, columns = shape
    step = max(1, _BLOCK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _as_real_array(values: npt.ArrayLike, name: str) -> npt.NDArray[Any]:
    array = np.asarray(values)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must contain real numbers (float or integer), got dtype {array.dtype}")
    return array


def _as_matrix(values: npt.ArrayLike, name: str) -> npt.NDArray[Any]:
    matrix = _as_real_array(values, name)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array of shape (positions, vocabulary), got shape {matrix.shape}"
        )
    return matrix


def _check_top_k(top_k: int, vocabulary: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not 1 <= top_k <= vocabulary:
        raise ValueError(f"top_k must be an integer in [1, {vocabulary}] (the vocabulary size), got {top_k!r}")


def _check_topk_inputs(ids: npt.NDArray[np.int64], top_logp: npt.NDArray[Any], twin: npt.NDArray[Any]) -> None:
    if ids.shape != top_logp.shape:
        raise ValueError(
            f"primary_ids has shape {ids.shape} but primary_logp has shape {top_logp.shape}; "
            "both must be (positions, k)"
        )
    if twin.shape[0] != ids.shape[0]:
        raise ValueError(f"twin_logp has {twin.shape[0]} positions but primary_ids has {ids.shape[0]}; they must match")

    vocabulary = twin.shape[1]
    outside = (ids < 0) | (ids >= vocabulary)
    if outside.any():
        bad_row, bad_column = (int(i) for i in np.argwhere(outside)[0])
        raise ValueError(
            f"primary_ids[{bad_row}, {bad_column}] is {ids[bad_row, bad_column]}, "
            f"outside the vocabulary [0, {vocabulary})"
        )

    sorted_ids = np.sort(ids, axis=1)
    repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(axis=1)
    if repeated.any():
        row = int(np.argmax(repeated))
        raise ValueError(f"primary_ids row {row} repeats a token id; each row must list k distinct ids")


def _broken_rows(matrix: FloatArray) -> BoolArray:
    """Mark the rows that contain NaN or +inf (-inf is a valid log-probability)."""
    result: BoolArray = np.any(np.isnan(matrix) | np.isposinf(matrix), axis=1)
    return result


def _logsumexp_rows(matrix: FloatArray) -> FloatArray:
    """Compute log(sum(exp(row))) per row. A row of -inf only gives -inf."""
    row_max = matrix.max(axis=1)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore"):
        result: FloatArray = np.log(np.exp(matrix - safe_max[:, None]).sum(axis=1)) + safe_max
    return result


def _normalise_rows(matrix: FloatArray, broken: BoolArray, name: str, first_row: int) -> FloatArray:
    log_mass = _logsumexp_rows(matrix)
    off = (np.abs(log_mass) > LOG_MASS_TOLERANCE) & ~broken
    if off.any():
        row = int(np.argmax(off))
        raise ValueError(
            f"{name} row {first_row + row} sums to probability {math.exp(log_mass[row]):.6g} instead of 1; pass "
            "log-probabilities (for example log_softmax(logits)), not logits"
        )
    result: FloatArray = matrix - log_mass[:, None]
    return result


def _kl_rows(p: FloatArray, log_p: FloatArray, log_q: FloatArray) -> FloatArray:
    """Compute sum p * (log p - log q) per row, with 0 where p == 0 and +inf where p > 0 and q is 0."""
    with np.errstate(invalid="ignore"):
        log_ratio = log_p - log_q
    # Entries with p == 0 contribute 0, including those where both log-probabilities are -inf (NaN ratio).
    np.copyto(log_ratio, 0.0, where=p == 0.0)

    # KL of normalised rows is >= 0 (Gibbs' inequality), so a negative sum can only come from float64
    # rounding and is reported as 0.
    result: FloatArray = np.maximum(np.einsum("ij,ij->i", p, log_ratio), 0.0)
    return result


def _js_rows(p: FloatArray, q: FloatArray, log_p: FloatArray, log_q: FloatArray) -> FloatArray:
    """Compute the Jensen-Shannon divergence per row with the mixture m = (p + q) / 2."""
    with np.errstate(divide="ignore"):
        log_m = np.log(0.5 * (p + q))
    # In exact arithmetic m >= max(p, q) / 2, but (p + q) / 2 can round to 0 for subnormal p and q.
    # Restoring the bound keeps log p - log m <= ln 2, so every term with p > 0 stays finite.
    np.maximum(log_m, np.maximum(log_p, log_q) - LN2, out=log_m)

    js = np.zeros(p.shape[0], dtype=np.float64)
    for probabilities, log_probabilities in ((p, log_p), (q, log_q)):
        with np.errstate(invalid="ignore"):
            log_ratio = log_probabilities - log_m
        np.copyto(log_ratio, 0.0, where=probabilities == 0.0)
        js += np.einsum("ij,ij->i", probabilities, log_ratio)

    # JS lies in [0, ln 2] for normalised rows, so anything outside is rounding.
    result: FloatArray = np.clip(0.5 * js, 0.0, LN2)
    return result


def _top_k_mask(values: FloatArray, k: int) -> BoolArray:
    """Mark the k largest entries of each row, breaking ties in favour of the lowest index."""
    columns = values.shape[1]
    if k == columns:
        return np.ones(values.shape, dtype=bool)

    kth_largest = np.partition(values, columns - k, axis=1)[:, columns - k : columns - k + 1]
    above = values > kth_largest
    tied = values == kth_largest
    free_places = k - np.count_nonzero(above, axis=1).reshape(-1, 1)
    if np.array_equal(np.count_nonzero(tied, axis=1).reshape(-1, 1), free_places):
        # Usual case: the tied entries fill exactly the places left, so no tie needs breaking.
        result: BoolArray = above | tied
        return result

    # Fill the places that the strictly larger entries leave free with the first tied entries.
    result = above | (tied & (np.cumsum(tied, axis=1) <= free_places))
    return result


def _kl_gap_bound(p_tail: FloatArray, log_q_tail: FloatArray, min_log_q_tail: FloatArray) -> FloatArray:
    """Bound p_tail * KL(p | tail || q | tail) by p_tail * log(q_tail / min q over the tail)."""
    # With k == V the tail is empty (its minimum is +inf) and there is no gap to bound. If p_tail > 0
    # there anyway, q_tail is 0 and KL_k is already +inf.
    has_gap = (p_tail > 0.0) & (min_log_q_tail < np.inf)
    with np.errstate(invalid="ignore"):
        bound = p_tail * (log_q_tail - min_log_q_tail)
    result: FloatArray = np.where(has_gap, bound, 0.0)
    return result


def _js_gap_bound(p_tail: FloatArray, q_tail: FloatArray) -> FloatArray:
    """Bound the JS gap by m_tail * h(w), with h the binary entropy in nats."""
    m_tail = 0.5 * (p_tail + q_tail)
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.where(m_tail > 0.0, p_tail / (2.0 * m_tail), 0.0)
        entropy = -(_x_log_x(weight) + _x_log_x(1.0 - weight))
    result: FloatArray = m_tail * entropy
    return result


def _x_log_x(x: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        result: FloatArray = np.where(x > 0.0, x * np.log(x), 0.0)
    return result


def _finite_means(fields: list[FloatArray]) -> tuple[list[float], int, int]:
    """Return the mean of each field over the positions where all fields are finite, and both counts."""
    finite = np.isfinite(np.stack(fields)).all(axis=0)
    count = int(finite.sum())
    means = [float(field[finite].mean()) if count else math.nan for field in fields]
    return means, count, int(finite.size - count)
