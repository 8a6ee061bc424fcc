"""Distances between two sets of named weight tensors, such as the primary's and a twin's.

All sums run in float64 over blocks of `CHUNK_BYTES` of float64 per tensor. Comparing two float32 tensors
of 100 M values therefore allocates about 16 MiB at peak (measured with tracemalloc) instead of copies of
their full size. Non-finite weights propagate: a NaN or infinity in a tensor makes the distances that
include it NaN or infinite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

TensorMap = Mapping[str, npt.NDArray[Any]]
FloatArray = npt.NDArray[np.float64]

CHUNK_BYTES = 4 * 1024 * 1024
"""Size of one float64 block read from each tensor."""

OTHER_GROUP = "other"
"""Name of the group that collects the tensors beyond `max_groups` in `group_distances`."""

_CHUNK_ELEMENTS = CHUNK_BYTES // np.dtype(np.float64).itemsize


@dataclass(frozen=True)
class TensorDistance:
    """Distance between a reference tensor (or group of tensors) and another one.

    `relative_l2` is ||ref - other|| / ||ref||: 0.0 when both are all zero, +inf when only the reference
    is all zero. `cosine` is the cosine similarity in [-1, 1]: 1.0 when both are all zero, 0.0 when
    exactly one is. `max_abs` is the largest |ref - other| of any element (0.0 for empty tensors).
    """

    relative_l2: float
    cosine: float
    max_abs: float


@dataclass
class _Sums:
    """Running float64 sums over the elements of one tensor or group."""

    reference_squares: float = 0.0
    other_squares: float = 0.0
    dot: float = 0.0
    difference_squares: float = 0.0
    max_abs: float = 0.0

    def add(self, other: _Sums) -> None:
        self.reference_squares += other.reference_squares
        self.other_squares += other.other_squares
        self.dot += other.dot
        self.difference_squares += other.difference_squares
        self.max_abs = _nan_aware_max(self.max_abs, other.max_abs)

    def relative_l2(self) -> float:
        if math.isnan(self.reference_squares) or math.isnan(self.difference_squares):
            return math.nan
        if self.reference_squares == 0.0:
            return 0.0 if self.difference_squares == 0.0 else math.inf
        return math.sqrt(self.difference_squares) / math.sqrt(self.reference_squares)

    def cosine(self) -> float:
        if math.isnan(self.reference_squares) or math.isnan(self.other_squares) or math.isnan(self.dot):
            return math.nan
        if self.reference_squares == 0.0 and self.other_squares == 0.0:
            return 1.0
        if self.reference_squares == 0.0 or self.other_squares == 0.0:
            return 0.0
        # Two square roots instead of one of the product, which could overflow.
        similarity = self.dot / (math.sqrt(self.reference_squares) * math.sqrt(self.other_squares))
        return min(max(similarity, -1.0), 1.0)

    def distance(self) -> TensorDistance:
        return TensorDistance(relative_l2=self.relative_l2(), cosine=self.cosine(), max_abs=self.max_abs)


def relative_distance(reference: TensorMap, other: TensorMap) -> float:
    """Compute ||reference - other|| / ||reference|| with the L2 norm over all tensors together.

    Returns 0.0 when both are all zero and +inf when the reference is all zero but `other` is not, so a
    twin that diverges from an all-zero primary still shows as far from it.

    Raises:
        ValueError: the two maps differ in tensor names or shapes, a tensor is not of a real numeric
            dtype, or the maps are empty. The message names the tensor.
    """
    _check_same_tensors(reference, other)

    total = _Sums()
    for name, reference_tensor in reference.items():
        total.add(_accumulate(name, reference_tensor, other[name], with_similarity=False))
    return total.relative_l2()


def tensor_distances(reference: TensorMap, other: TensorMap) -> dict[str, TensorDistance]:
    """Compute the distance of every tensor, in the order of `reference`.

    Raises:
        ValueError: as `relative_distance`.
    """
    _check_same_tensors(reference, other)

    return {
        name: _accumulate(name, reference_tensor, other[name], with_similarity=True).distance()
        for name, reference_tensor in reference.items()
    }


def layer_group(name: str, depth: int = 1) -> str:
    """Return the first `depth` dot-separated parts of a tensor name.

    For example "blocks.3.attn.weight" gives "blocks" at depth 1 and "blocks.3" at depth 2. A name with
    fewer parts is returned whole.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    return ".".join(name.split(".")[:depth])


def group_distances(
    reference: TensorMap,
    other: TensorMap,
    group_of: Callable[[str], str],
    *,
    max_groups: int = 32,
) -> dict[str, TensorDistance]:
    """Compute distances per group of tensors, with at most `max_groups` groups.

    `group_of` maps a tensor name to its group, for example `layer_group` or
    `functools.partial(layer_group, depth=2)`. A group's relative L2 is the square root of its summed
    squared differences over its summed squared reference values, so the groups combine exactly like
    `relative_distance`. Groups are kept in the order in which their first tensor appears in `reference`.
    When there are more than `max_groups`, the first `max_groups - 1` stay and the rest are folded into
    the group `OTHER_GROUP` ("other"), which also absorbs a group of that name. The result therefore has
    at most `max_groups` entries, which bounds the number of metric series a model exports.

    Raises:
        ValueError: as `relative_distance`, or `max_groups` is not an integer >= 1.
    """
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"max_groups must be an integer >= 1, got {max_groups!r}")
    _check_same_tensors(reference, other)

    group_sums: dict[str, _Sums] = {}
    for name, reference_tensor in reference.items():
        sums = _accumulate(name, reference_tensor, other[name], with_similarity=True)
        group_sums.setdefault(group_of(name), _Sums()).add(sums)

    if len(group_sums) > max_groups:
        capped: dict[str, _Sums] = {}
        for position, (group, sums) in enumerate(group_sums.items()):
            target = group if position < max_groups - 1 else OTHER_GROUP
            capped.setdefault(target, _Sums()).add(sums)
        # The overflow group goes last even when a kept group already had its name.
        capped[OTHER_GROUP] = capped.pop(OTHER_GROUP)
        group_sums = capped

    return {group: sums.distance() for group, sums in group_sums.items()}


def _check_same_tensors(reference: TensorMap, other: TensorMap) -> None:
    if not reference:
        raise ValueError("reference contains no tensors; pass at least one named tensor")

    for name in reference:
        if name not in other:
            raise ValueError(f"tensor {name!r} is in reference but missing from other; both must have the same names")
    for name in other:
        if name not in reference:
            raise ValueError(f"tensor {name!r} is in other but missing from reference; both must have the same names")

    for name, reference_tensor in reference.items():
        reference_shape = np.shape(reference_tensor)
        other_shape = np.shape(other[name])
        if reference_shape != other_shape:
            raise ValueError(
                f"tensor {name!r} has shape {reference_shape} in reference but {other_shape} in other; "
                "shapes must match"
            )


def _accumulate(name: str, reference: npt.NDArray[Any], other: npt.NDArray[Any], *, with_similarity: bool) -> _Sums:
    """Sum the squares, products and differences of one tensor pair block by block."""
    reference = np.asarray(reference)
    other = np.asarray(other)
    for label, tensor in (("reference", reference), ("other", other)):
        if not (np.issubdtype(tensor.dtype, np.floating) or np.issubdtype(tensor.dtype, np.integer)):
            raise ValueError(
                f"tensor {name!r} in {label} has dtype {tensor.dtype}; only real float or integer tensors "
                "can be compared"
            )

    sums = _Sums()
    for index in _block_indices(reference.shape):
        x = np.asarray(reference[index], dtype=np.float64, order="C").reshape(-1)
        y = np.asarray(other[index], dtype=np.float64, order="C").reshape(-1)
        if x.size == 0:
            continue
        difference = x - y
        sums.difference_squares += float(difference @ difference)
        sums.reference_squares += float(x @ x)
        if with_similarity:
            sums.other_squares += float(y @ y)
            sums.dot += float(x @ y)
            sums.max_abs = _nan_aware_max(sums.max_abs, float(np.max(np.abs(difference))))
    return sums


def _block_indices(shape: tuple[int, ...]) -> Iterator[tuple[int | slice, ...]]:
    """Yield indices that cover an array of `shape` in C order, each selecting at most `_CHUNK_ELEMENTS`.

    The blocks depend only on the shape, so two arrays of the same shape but different memory layouts
    are split at the same elements. Slicing along leading axes gives views, so only the float64 copies
    of one block are allocated at a time.
    """
    if not shape:
        yield ()
        return

    inner = math.prod(shape[1:])
    if inner <= _CHUNK_ELEMENTS:
        step = max(1, _CHUNK_ELEMENTS // max(inner, 1))
        for start in range(0, shape[0], step):
            yield (slice(start, start + step),)
        return

    # One slice along the first axis is still too large, so split each one along the next axes.
    for position in range(shape[0]):
        for rest in _block_indices(shape[1:]):
            yield (position, *rest)


def _nan_aware_max(current: float, candidate: float) -> float:
    """Return the larger value, or NaN if either is NaN (the built-in max can drop a NaN)."""
    if math.isnan(current) or math.isnan(candidate):
        return math.nan
    return max(current, candidate)
