"""Weight distances checked against the direct float64 formulas."""

from __future__ import annotations

import functools
import math
import tracemalloc
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from monitor.analytics.weights import (
    CHUNK_BYTES,
    OTHER_GROUP,
    group_distances,
    layer_group,
    relative_distance,
    tensor_distances,
)

Tensors = dict[str, npt.NDArray[Any]]


def _model(rng: np.random.Generator) -> tuple[Tensors, Tensors]:
    """A reference and a perturbed copy, with one tensor larger than a chunk and several layouts."""
    reference: Tensors = {
        "embed.weight": rng.standard_normal((700, 1000)).astype(np.float32),  # 700,000 > one chunk
        "blocks.0.attn.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "blocks.0.attn.bias": rng.standard_normal(64).astype(np.float32),
        "blocks.1.mlp.weight": rng.standard_normal((64, 256)).astype(np.float32),
        "head.scale": np.array(1.5, dtype=np.float32),
    }
    other = {
        name: tensor + np.float32(0.01) * rng.standard_normal(tensor.shape).astype(np.float32)
        for name, tensor in reference.items()
    }
    return reference, other


def _direct_relative(reference: Tensors, other: Tensors, names: list[str] | None = None) -> float:
    selected = list(reference) if names is None else names
    x = np.concatenate([np.ravel(reference[name]).astype(np.float64) for name in selected])
    y = np.concatenate([np.ravel(other[name]).astype(np.float64) for name in selected])
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def test_relative_distance_matches_direct_formula() -> None:
    reference, other = _model(np.random.default_rng(0))

    distance = relative_distance(reference, other)

    assert distance == pytest.approx(_direct_relative(reference, other), rel=1e-12)


def test_relative_distance_mixed_layouts_and_dtypes() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1200, 900))
    # A transposed (Fortran-ordered) float64 view against a C-ordered float16 copy of the same values.
    reference = {"w": base.T}
    other = {"w": np.ascontiguousarray(base.T).astype(np.float16)}

    distance = relative_distance(reference, other)

    assert distance == pytest.approx(_direct_relative(reference, other), rel=1e-12)
    assert distance > 0.0


def test_relative_distance_rows_larger_than_chunk() -> None:
    # Each row has 700,000 values, more than one chunk, so the rows themselves are split.
    rng = np.random.default_rng(10)
    reference = {"w": rng.standard_normal((3, 700_000)).astype(np.float32)}
    other = {"w": np.asfortranarray(reference["w"] + np.float32(0.1) * rng.standard_normal((3, 700_000)))}

    distance = relative_distance(reference, other)

    assert distance == pytest.approx(_direct_relative(reference, other), rel=1e-12)


def test_relative_distance_identical_is_zero() -> None:
    reference, _ = _model(np.random.default_rng(2))

    assert relative_distance(reference, reference) == 0.0


def test_relative_distance_both_zero_is_zero() -> None:
    zeros = {"w": np.zeros((3, 4), dtype=np.float32)}

    assert relative_distance(zeros, zeros) == 0.0


def test_relative_distance_zero_reference_is_infinite() -> None:
    reference = {"w": np.zeros((3, 4), dtype=np.float32)}
    other = {"w": np.ones((3, 4), dtype=np.float32)}

    assert relative_distance(reference, other) == math.inf


def test_relative_distance_nan_weight_gives_nan() -> None:
    reference = {"w": np.zeros(4, dtype=np.float32)}
    other = {"w": np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32)}

    assert math.isnan(relative_distance(reference, other))


def test_relative_distance_no_full_size_copy() -> None:
    # 8 M float32 values: a float64 copy would take 64 MiB, a difference in float32 32 MiB. The chunked
    # loop keeps three float64 blocks, plus the next one while it is being converted.
    rng = np.random.default_rng(3)
    reference = {"w": rng.standard_normal(8 * 1024 * 1024, dtype=np.float32)}
    other = {"w": reference["w"] + np.float32(1.0)}

    tracemalloc.start()
    try:
        relative_distance(reference, other)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 6 * CHUNK_BYTES


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"a": np.zeros(3)}, "tensor 'b' is in reference but missing from other"),
        ({"a": np.zeros(3), "b": np.zeros(2), "c": np.zeros(1)}, "tensor 'c' is in other but missing"),
        ({"a": np.zeros(3), "b": np.zeros((2, 1))}, "tensor 'b' has shape \\(2,\\) in reference but \\(2, 1\\)"),
        ({"a": np.zeros(3), "b": np.array(["x", "y"])}, "tensor 'b' in other has dtype <U1"),
    ],
)
def test_relative_distance_rejects_mismatched_tensors(other: Tensors, message: str) -> None:
    reference = {"a": np.ones(3), "b": np.ones(2)}

    with pytest.raises(ValueError, match=message):
        relative_distance(reference, other)


def test_relative_distance_rejects_empty_model() -> None:
    with pytest.raises(ValueError, match="contains no tensors"):
        relative_distance({}, {})


def test_tensor_distances_match_direct_formulas() -> None:
    reference, other = _model(np.random.default_rng(4))

    distances = tensor_distances(reference, other)

    assert list(distances) == list(reference)
    for name, distance in distances.items():
        x = np.ravel(reference[name]).astype(np.float64)
        y = np.ravel(other[name]).astype(np.float64)
        assert distance.relative_l2 == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(x), rel=1e-12)
        assert distance.cosine == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel=1e-12)
        assert distance.max_abs == np.max(np.abs(x - y))


def test_tensor_distances_cosine_edge_cases() -> None:
    reference = {"zero": np.zeros(3), "one_zero": np.zeros(3), "negated": np.array([1.0, -2.0, 3.0])}
    other = {"zero": np.zeros(3), "one_zero": np.ones(3), "negated": np.array([-1.0, 2.0, -3.0])}

    distances = tensor_distances(reference, other)

    assert distances["zero"].cosine == 1.0
    assert distances["zero"].relative_l2 == 0.0
    assert distances["one_zero"].cosine == 0.0
    assert distances["one_zero"].relative_l2 == math.inf
    assert distances["negated"].cosine == -1.0
    assert distances["negated"].relative_l2 == pytest.approx(2.0)


def test_tensor_distances_nan_propagates_to_max_abs() -> None:
    reference = {"w": np.zeros(5)}
    other = {"w": np.array([0.0, 3.0, np.nan, 0.0, 0.0])}

    distance = tensor_distances(reference, other)["w"]

    assert math.isnan(distance.max_abs)
    assert math.isnan(distance.relative_l2)
    assert math.isnan(distance.cosine)


@pytest.mark.parametrize(
    ("name", "depth", "expected"),
    [
        ("blocks.3.attn.weight", 1, "blocks"),
        ("blocks.3.attn.weight", 2, "blocks.3"),
        ("blocks.3.attn.weight", 9, "blocks.3.attn.weight"),
        ("bias", 1, "bias"),
    ],
)
def test_layer_group_keeps_leading_parts(name: str, depth: int, expected: str) -> None:
    assert layer_group(name, depth) == expected


@pytest.mark.parametrize("depth", [0, -1, True, 1.5])
def test_layer_group_rejects_invalid_depth(depth: Any) -> None:
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        layer_group("a.b", depth)


def test_group_distances_aggregate_sums_of_squares() -> None:
    reference, other = _model(np.random.default_rng(5))

    groups = group_distances(reference, other, functools.partial(layer_group, depth=2))

    assert list(groups) == ["embed.weight", "blocks.0", "blocks.1", "head.scale"]
    expected = _direct_relative(reference, other, ["blocks.0.attn.weight", "blocks.0.attn.bias"])
    assert groups["blocks.0"].relative_l2 == pytest.approx(expected, rel=1e-12)


def test_group_distances_single_group_equals_global_distance() -> None:
    reference, other = _model(np.random.default_rng(6))

    groups = group_distances(reference, other, lambda name: "all")

    assert groups["all"].relative_l2 == pytest.approx(relative_distance(reference, other), rel=1e-12)


def test_group_distances_caps_large_model() -> None:
    # 5,000 tensors in 1,000 layers: the export must stay at max_groups series.
    rng = np.random.default_rng(7)
    reference = {f"layers.{i // 5}.t{i % 5}": rng.standard_normal(8) for i in range(5000)}
    other = {name: tensor * 1.01 for name, tensor in reference.items()}

    groups = group_distances(reference, other, functools.partial(layer_group, depth=2), max_groups=16)

    assert len(groups) == 16
    assert list(groups)[:15] == [f"layers.{i}" for i in range(15)]
    assert list(groups)[-1] == OTHER_GROUP
    folded = [name for name in reference if int(name.split(".")[1]) >= 15]
    assert groups[OTHER_GROUP].relative_l2 == pytest.approx(_direct_relative(reference, other, folded), rel=1e-12)


def test_group_distances_merges_existing_other_group() -> None:
    reference = {"a.w": np.ones(2), "other.w": np.ones(2), "b.w": np.ones(2), "c.w": np.ones(2)}
    other = {name: tensor * 2.0 for name, tensor in reference.items()}

    groups = group_distances(reference, other, layer_group, max_groups=2)

    assert list(groups) == ["a", OTHER_GROUP]
    assert groups[OTHER_GROUP].relative_l2 == pytest.approx(1.0)


def test_group_distances_under_cap_keeps_every_group() -> None:
    reference, other = _model(np.random.default_rng(8))

    groups = group_distances(reference, other, layer_group, max_groups=3)

    assert list(groups) == ["embed", "blocks", "head"]


@pytest.mark.parametrize("max_groups", [0, True, 2.0])
def test_group_distances_rejects_invalid_cap(max_groups: Any) -> None:
    reference = {"a": np.ones(2)}

    with pytest.raises(ValueError, match="max_groups must be an integer >= 1"):
        group_distances(reference, reference, layer_group, max_groups=max_groups)


def test_group_distances_rejects_mismatched_tensors() -> None:
    reference = {"a.w": np.ones(2)}
    other = {"a.v": np.ones(2)}

    with pytest.raises(ValueError, match=r"tensor 'a\.w' is in reference but missing from other"):
        group_distances(reference, other, layer_group)
