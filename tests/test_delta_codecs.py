"""Delta codecs: error bounds, rejection of malformed wire tensors, and error feedback through PublishedState."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from monitor.analytics.weights import relative_distance
from monitor.model.base import Weights
from monitor.twin.reference import ReferenceTracker
from monitor.wire.codec import decode, encode
from monitor.wire.delta_codecs import (
    DEFAULT_TOPK_FRACTION,
    FLOAT16_MAX,
    INT8_LEVELS,
    decode_delta,
    encode_delta,
)
from monitor.wire.envelope import Codec, Envelope, Kind
from monitor.wire.errors import WireError
from tests.wire_helpers import MAX_BYTES, decode_single, tiny_state, trained_weights

CODECS: tuple[Codec, ...] = ("float32", "float16", "int8", "topk")
SHAPES = {"a": (2, 3), "b": (4,)}
FLOAT32_EPS = float(np.finfo(np.float32).eps)
FLOAT16_UNIT_ROUNDOFF = 2.0**-11  # half the spacing of float16's 11-bit significand, relative
FLOAT16_MIN_NORMAL = 2.0**-14
FLOAT16_SUBNORMAL_HALF_STEP = 2.0**-25  # below FLOAT16_MIN_NORMAL the spacing is a fixed 2**-24

Tensors = dict[str, npt.NDArray[Any]]


def _delta(seed: int, shapes: dict[str, tuple[int, ...]] | None = None, scale: float = 1e-2) -> Weights:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in (shapes or SHAPES).items()}


def _over_the_wire(tensors: Tensors, codec: Codec) -> Tensors:
    """Send codec output through encode and decode, as a twin receives it."""
    envelope = Envelope(
        model_id="testlm",
        session_id="0123456789abcdef",
        kind=Kind.DELTA,
        version=2,
        base_version=1,
        created_ns=1,
        codec=codec,
    )
    return dict(decode(encode(envelope, tensors), max_bytes=MAX_BYTES).tensors)


def _round_trip(codec: Codec, delta: Weights, **options: Any) -> Weights:
    shapes = {name: array.shape for name, array in delta.items()}
    return decode_delta(codec, _over_the_wire(encode_delta(codec, delta, **options), codec), shapes)


# Error bounds.


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_keeps_names_shapes_dtype(codec: Codec) -> None:
    delta = _delta(0)

    decoded = _round_trip(codec, delta)

    assert sorted(decoded) == sorted(delta)
    for name, array in delta.items():
        assert decoded[name].shape == array.shape, name
        assert decoded[name].dtype == np.float32, name


def test_float32_codec_is_exact() -> None:
    delta = _delta(1, scale=1e3)

    decoded = _round_trip("float32", delta)

    for name, array in delta.items():
        assert decoded[name].tobytes() == array.tobytes(), name


def test_float16_codec_relative_error_bound() -> None:
    # Magnitudes across float16's whole normal range, [2**-14, 65504].
    rng = np.random.default_rng(2)
    magnitudes = np.exp2(rng.uniform(-14, 15.9, size=10_000))
    values = (magnitudes * rng.choice([-1.0, 1.0], size=magnitudes.size)).astype(np.float32)

    decoded = _round_trip("float16", {"a": values})["a"]

    relative = np.abs(decoded.astype(np.float64) - values) / np.abs(values)
    assert float(relative.max()) <= FLOAT16_UNIT_ROUNDOFF


def test_float16_codec_small_values_absolute_error_bound() -> None:
    # Below 2**-14 float16 is subnormal: the error is bounded in absolute terms, not relative ones.
    values = np.linspace(-FLOAT16_MIN_NORMAL, FLOAT16_MIN_NORMAL, 10_001, dtype=np.float32)

    decoded = _round_trip("float16", {"a": values})["a"]

    error = np.abs(decoded.astype(np.float64) - values)
    assert float(error.max()) <= FLOAT16_SUBNORMAL_HALF_STEP


def test_float16_codec_clips_to_finite_range() -> None:
    values = np.array([1e6, -1e6, 65520.0, FLOAT16_MAX, 1.0], dtype=np.float32)

    decoded = _round_trip("float16", {"a": values})["a"]

    assert decoded.tolist() == [FLOAT16_MAX, -FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX, 1.0]


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1e3])
def test_int8_codec_error_bound_per_tensor(scale: float) -> None:
    # Tensor "b" is 1000 times smaller than "a": its error follows its own peak, not the larger one.
    delta = _delta(3, {"a": (64, 33), "b": (100,)}, scale=scale)
    delta["b"] = (delta["b"] * np.float32(1e-3)).astype(np.float32)

    decoded = _round_trip("int8", delta)

    for name, array in delta.items():
        peak = float(np.max(np.abs(array)))
        error = float(np.max(np.abs(decoded[name].astype(np.float64) - array)))
        # Half a quantization step, plus the float32 rounding of array / scale and levels * scale.
        assert error <= peak / (2 * INT8_LEVELS) + 4 * FLOAT32_EPS * peak, name


def test_int8_codec_wire_tensors() -> None:
    delta = _delta(4)

    wire = encode_delta("int8", delta)

    assert sorted(wire) == ["q/a", "q/b", "scale/a", "scale/b"]
    for name, array in delta.items():
        levels, scale = wire[f"q/{name}"], wire[f"scale/{name}"]
        assert levels.dtype == np.int8, name
        assert int(np.max(np.abs(levels))) == INT8_LEVELS, name
        assert scale.dtype == np.float32, name
        assert scale.shape == (1,), name
        assert scale[0] == np.float32(np.max(np.abs(array)) / INT8_LEVELS), name


def test_int8_codec_zero_tensor_stays_zero() -> None:
    delta = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}

    decoded = _round_trip("int8", delta)

    for name in delta:
        assert not decoded[name].any(), name


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_codec_keeps_exactly_largest_values(fraction: float) -> None:
    rng = np.random.default_rng(5)
    # A permutation of distinct magnitudes, so the k largest are unambiguous.
    magnitudes = rng.permutation(np.arange(1, 1001, dtype=np.float32))
    values = (magnitudes * rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=1000)).reshape(20, 50)
    keep = math.ceil(fraction * values.size)

    decoded = _round_trip("topk", {"a": values}, topk_fraction=fraction)["a"]

    sent_indices = np.flatnonzero(decoded)
    expected = np.flatnonzero(np.abs(values) > values.size - keep)
    assert sent_indices.tolist() == expected.tolist()
    assert decoded.reshape(-1)[sent_indices].tobytes() == values.reshape(-1)[sent_indices].tobytes()


def test_topk_codec_keeps_at_least_one_value() -> None:
    values = np.array([0.5, -3.0, 1.0], dtype=np.float32)

    decoded = _round_trip("topk", {"a": values}, topk_fraction=DEFAULT_TOPK_FRACTION)["a"]

    assert decoded.tolist() == [0.0, -3.0, 0.0]


def test_topk_codec_wire_tensors_sorted_int32() -> None:
    delta = _delta(6, {"a": (40, 25)})

    wire = encode_delta("topk", delta, topk_fraction=0.05)

    indices = wire["idx/a"]
    assert indices.dtype == np.int32
    assert indices.shape == (50,)
    assert bool(np.all(np.diff(indices) > 0))
    assert wire["val/a"].dtype == np.float32


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_topk_codec_rejects_invalid_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"topk fraction {fraction} must be in (0, 1]")):
        encode_delta("topk", _delta(7), topk_fraction=fraction)


def test_codec_rejects_unknown_name() -> None:
    codec: Any = "bfloat16"

    with pytest.raises(ValueError, match="unknown delta codec 'bfloat16'; choose float32, float16, int8 or topk"):
        encode_delta(codec, _delta(8))


# Malformed wire tensors. SHAPES has "a" (2, 3) and "b" (4,).


def _valid_wire(codec: Codec) -> Tensors:
    return encode_delta(codec, _delta(9), topk_fraction=0.5)


def _without(tensors: Tensors, name: str) -> Tensors:
    return {key: value for key, value in tensors.items() if key != name}


def _replace(tensors: Tensors, name: str, value: npt.NDArray[Any]) -> Tensors:
    return {**tensors, name: value}


MALFORMED: list[tuple[str, Codec, Any, str, str]] = [
    # (case id, codec, change to the valid wire tensors, reason, message)
    (
        "missing",
        "float32",
        lambda wire: _without(wire, "b"),
        "bad_shape",
        "float32 delta tensors differ from the model: missing ['b'], unexpected []",
    ),
    (
        "extra",
        "float16",
        lambda wire: _replace(wire, "c", np.zeros(1, np.float16)),
        "bad_shape",
        "float16 delta tensors differ from the model: missing [], unexpected ['c']",
    ),
    (
        "int8_missing_scale",
        "int8",
        lambda wire: _without(wire, "scale/a"),
        "bad_shape",
        "int8 delta tensors differ from the model: missing ['scale/a'], unexpected []",
    ),
    (
        "topk_plain_name",
        "topk",
        lambda wire: _replace(_without(wire, "idx/a"), "a", np.zeros((2, 3), np.float32)),
        "bad_shape",
        "missing ['idx/a'], unexpected ['a']",
    ),
    (
        "float32_dtype",
        "float32",
        lambda wire: _replace(wire, "a", wire["a"].astype(np.float16)),
        "bad_dtype",
        "delta tensor 'a' has dtype float16, expected float32",
    ),
    (
        "float16_dtype",
        "float16",
        lambda wire: _replace(wire, "b", wire["b"].astype(np.float32)),
        "bad_dtype",
        "delta tensor 'b' has dtype float32, expected float16",
    ),
    (
        "float32_shape",
        "float32",
        lambda wire: _replace(wire, "a", wire["a"].reshape(3, 2)),
        "bad_shape",
        "delta tensor 'a' has shape (3, 2), expected (2, 3)",
    ),
    (
        "int8_levels_dtype",
        "int8",
        lambda wire: _replace(wire, "q/a", wire["q/a"].astype(np.uint8)),
        "bad_dtype",
        "delta tensor 'q/a' has dtype uint8, expected int8",
    ),
    (
        "int8_levels_shape",
        "int8",
        lambda wire: _replace(wire, "q/b", np.zeros(5, np.int8)),
        "bad_shape",
        "delta tensor 'q/b' has shape (5,), expected (4,)",
    ),
    (
        "int8_scale_shape",
        "int8",
        lambda wire: _replace(wire, "scale/a", np.ones(2, np.float32)),
        "bad_shape",
        "delta tensor 'scale/a' has shape (2,), expected (1,)",
    ),
    (
        "int8_scale_zero",
        "int8",
        lambda wire: _replace(wire, "scale/a", np.zeros(1, np.float32)),
        "bad_shape",
        "int8 scale of 'a' is 0.0, must be positive",
    ),
    (
        "int8_scale_negative",
        "int8",
        lambda wire: _replace(wire, "scale/b", np.full(1, -0.5, np.float32)),
        "bad_shape",
        "int8 scale of 'b' is -0.5, must be positive",
    ),
    (
        "topk_index_dtype",
        "topk",
        lambda wire: _replace(wire, "idx/a", wire["idx/a"].astype(np.int64)),
        "bad_dtype",
        "delta tensor 'idx/a' has dtype int64, expected int32",
    ),
    (
        "topk_index_2d",
        "topk",
        lambda wire: _replace(wire, "idx/b", wire["idx/b"].reshape(1, -1)),
        "bad_shape",
        "delta tensor 'idx/b' has shape (1, 2), expected (-1,)",
    ),
    (
        "topk_values_length",
        "topk",
        lambda wire: _replace(wire, "val/a", np.zeros(2, np.float32)),
        "bad_shape",
        "delta tensor 'val/a' has shape (2,), expected (3,)",
    ),
    (
        "topk_index_too_large",
        "topk",
        lambda wire: _replace(wire, "idx/a", np.array([0, 2, 6], np.int32)),
        "bad_shape",
        "top-k indices of 'a' must be strictly increasing within [0, 6)",
    ),
    (
        "topk_index_negative",
        "topk",
        lambda wire: _replace(wire, "idx/a", np.array([-1, 2, 4], np.int32)),
        "bad_shape",
        "top-k indices of 'a' must be strictly increasing within [0, 6)",
    ),
    (
        "topk_index_unsorted",
        "topk",
        lambda wire: _replace(wire, "idx/a", np.array([0, 4, 2], np.int32)),
        "bad_shape",
        "top-k indices of 'a' must be strictly increasing within [0, 6)",
    ),
    (
        "topk_index_duplicated",
        "topk",
        lambda wire: _replace(wire, "idx/b", np.array([1, 1], np.int32)),
        "bad_shape",
        "top-k indices of 'b' must be strictly increasing within [0, 4)",
    ),
]


@pytest.mark.parametrize(
    ("codec", "change", "reason", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_decode_delta_rejects_malformed(codec: Codec, change: Any, reason: str, message: str) -> None:
    wire = change(_valid_wire(codec))

    with pytest.raises(WireError, match=re.escape(message)) as caught:
        decode_delta(codec, wire, SHAPES)

    assert caught.value.reason == reason


@pytest.mark.parametrize("codec", CODECS)
def test_decode_delta_accepts_valid_wire(codec: Codec) -> None:
    wire = _valid_wire(codec)

    decoded = decode_delta(codec, wire, SHAPES)

    assert sorted(decoded) == sorted(SHAPES)


# Error feedback: P moves by the decoded delta, so what a codec drops goes out with the next delta.


def _advance_toward_fixed_target(codec: Codec, rounds: int) -> list[float]:
    """Advance a published state `rounds` times toward one fixed target; return the distance after each round."""
    state = tiny_state(seed=0)
    target = trained_weights(state, seed=1)
    distances = []
    for _ in range(rounds):
        state.advance(target, MAX_BYTES, snapshot=False, codec=codec)
        distances.append(relative_distance(target, state.weights))
    return distances


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_error_feedback_converges_for_dense_codecs(codec: Codec) -> None:
    # One round leaves a relative error of about 2**-11 (float16) or 1/254 of each tensor's peak (int8).
    # Later rounds send that residual again, until only float32 or float16 subnormal rounding is left.
    distances = _advance_toward_fixed_target(codec, rounds=10)

    assert distances[-1] < 1e-6
    assert distances[1] < distances[0]


def test_error_feedback_converges_for_topk() -> None:
    # Each round sends exactly the largest 1% of each tensor's residual, ceil(0.01 * size) elements, so about
    # 1 / 0.01 = 100 rounds reach every element; 20 more leave room for elements sent twice.
    rounds = math.ceil(1 / DEFAULT_TOPK_FRACTION) + 20

    distances = _advance_toward_fixed_target("topk", rounds)

    assert distances[-1] < 1e-3
    for before, after in itertools.pairwise(distances):
        # Zeroing the largest residuals never makes the total larger, up to float32 rounding of what was sent.
        assert after <= before + 1e-7


@pytest.mark.parametrize("codec", CODECS)
def test_error_feedback_keeps_twin_bitwise_equal(codec: Codec) -> None:
    state = tiny_state(seed=0)
    tracker = ReferenceTracker(max_parameters=10_000)
    tracker.apply(decode_single(state.snapshot(MAX_BYTES)))

    for step in range(30):
        _, payloads = state.advance(trained_weights(state, seed=step), MAX_BYTES, snapshot=False, codec=codec)
        tracker.apply(decode_single(payloads))

    assert tracker.current is not None
    assert tracker.current.version == state.version
    assert tracker.current.digest == state.digest
    for name, array in state.weights.items():
        assert tracker.current.weights[name].tobytes() == array.tobytes(), name
