"""Encodings of weight deltas: lossless float32, float16, int8 with a per-tensor scale, and top-k sparse.

The primary advances its published weights by the *decoded* delta, exactly as a twin will, so a lossy codec
never makes primary and twin disagree about what version v is. What the codec dropped stays in the
difference between the trained and the published weights and goes out with the next delta: error feedback,
with no extra state. A lossy codec therefore shows as a weight distance between trained and published
weights, never as a silent mismatch between twin and primary.

| codec   | bytes per element | error of one delta element                       |
|---------|-------------------|--------------------------------------------------|
| float32 | 4                 | 0                                                |
| float16 | 2                 | relative 2**-11 from 2**-14 up, absolute 2**-25  |
|         |                   | below; clipped to +-65504                        |
| int8    | 1                 | max abs(delta) / 254 for its tensor, plus float32|
|         |                   | rounding of the scale (a relative 1e-6)          |
| topk    | 8 per kept element| dropped elements carried to the next delta       |
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from monitor.model.base import Weights
from monitor.wire.envelope import Codec
from monitor.wire.errors import WireError

FLOAT16_MAX = 65504.0
INT8_LEVELS = 127
DEFAULT_TOPK_FRACTION = 0.01

Shapes = Mapping[str, tuple[int, ...]]


def encode_delta(
    codec: Codec, delta: Mapping[str, npt.NDArray[np.float32]], *, topk_fraction: float = DEFAULT_TOPK_FRACTION
) -> dict[str, npt.NDArray[Any]]:
    """Return the wire tensors of `delta` under `codec`."""
    if codec == "float32":
        return dict(delta)
    if codec == "float16":
        return {name: np.clip(array, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16) for name, array in delta.items()}
    if codec == "int8":
        tensors: dict[str, npt.NDArray[Any]] = {}
        for name, array in delta.items():
            peak = float(np.max(np.abs(array))) if array.size else 0.0
            scale = np.float32(peak / INT8_LEVELS) if peak > 0 else np.float32(1.0)
            tensors[f"q/{name}"] = np.clip(np.rint(array / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
            tensors[f"scale/{name}"] = np.array([scale], dtype=np.float32)
        return tensors
    if codec == "topk":
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk fraction {topk_fraction} must be in (0, 1]")
        tensors = {}
        for name, array in delta.items():
            flat = array.reshape(-1)
            keep = max(1, math.ceil(topk_fraction * flat.size)) if flat.size else 0
            indices = (
                np.sort(np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :])
                if keep
                else np.zeros(0, np.int64)
            )
            tensors[f"idx/{name}"] = indices.astype(np.int32)
            tensors[f"val/{name}"] = flat[indices].astype(np.float32)
        return tensors
    raise ValueError(f"unknown delta codec {codec!r}; choose float32, float16, int8 or topk")


def decode_delta(codec: Codec, tensors: Mapping[str, npt.NDArray[Any]], shapes: Shapes) -> Weights:
    """Return the float32 delta that `tensors` encode; raise WireError when they do not fit `shapes`."""
    expected = _wire_names(codec, shapes)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:5]
        unexpected = sorted(set(tensors) - set(expected))[:5]
        raise WireError(
            "bad_shape", f"{codec} delta tensors differ from the model: missing {missing}, unexpected {unexpected}"
        )

    if codec in ("float32", "float16"):
        wanted = np.float32 if codec == "float32" else np.float16
        result: Weights = {}
        for name, shape in shapes.items():
            array = tensors[name]
            _check(name, array, wanted, shape)
            result[name] = array.astype(np.float32)
        return result

    if codec == "int8":
        result = {}
        for name, shape in shapes.items():
            levels, scale = tensors[f"q/{name}"], tensors[f"scale/{name}"]
            _check(f"q/{name}", levels, np.int8, shape)
            _check(f"scale/{name}", scale, np.float32, (1,))
            if not scale[0] > 0:
                raise WireError("bad_shape", f"int8 scale of {name!r} is {scale[0]}, must be positive")
            result[name] = levels.astype(np.float32) * scale[0]
        return result

    result = {}
    for name, shape in shapes.items():
        indices, values = tensors[f"idx/{name}"], tensors[f"val/{name}"]
        size = math.prod(shape)
        _check(f"idx/{name}", indices, np.int32, (indices.shape[0],) if indices.ndim == 1 else (-1,))
        _check(f"val/{name}", values, np.float32, indices.shape)
        if indices.size and (indices[0] < 0 or indices[-1] >= size or np.any(np.diff(indices) <= 0)):
            raise WireError("bad_shape", f"top-k indices of {name!r} must be strictly increasing within [0, {size})")
        dense = np.zeros(size, dtype=np.float32)
        dense[indices] = values
        result[name] = dense.reshape(shape)
    return result


def _wire_names(codec: Codec, shapes: Shapes) -> list[str]:
    if codec in ("float32", "float16"):
        return list(shapes)
    prefixes = ("q/", "scale/") if codec == "int8" else ("idx/", "val/")
    return [prefix + name for name in shapes for prefix in prefixes]


def _check(name: str, array: npt.NDArray[Any], dtype: Any, shape: tuple[int, ...]) -> None:
    if array.dtype != np.dtype(dtype):
        raise WireError("bad_dtype", f"delta tensor {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.shape != tuple(shape):
        raise WireError("bad_shape", f"delta tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
