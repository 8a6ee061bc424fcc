"""Encode and decode wire messages: safetensors bytes with the envelope in their metadata.

Decoding treats the payload as hostile. Before any tensor is used, it checks the total size, the header
length, the header JSON and the envelope schema. It then checks the dtype allow-list, that each tensor's byte
range matches `prod(shape) * itemsize`, that the ranges tile the data area exactly, and the checksum.
Floating-point tensors must be finite. Nothing is ever unpickled: a pickle fails the header check like any other garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.numpy
from pydantic import ValidationError

from monitor.wire.envelope import METADATA_KEY, Envelope
from monitor.wire.errors import WireError

# safetensors dtype codes accepted on the wire, all little-endian as the format prescribes.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}

HEADER_LENGTH_BYTES = 8
DEFAULT_MAX_HEADER_BYTES = 8 * 1024 * 1024  # a 100 k-tensor manifest stays below this
MAX_TENSORS = 100_000
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class Message:
    """A validated message. The tensors are read-only views into the payload: copy before keeping them."""

    envelope: Envelope
    tensors: dict[str, npt.NDArray[Any]]
    nbytes: int


def tensor_checksum(tensors: Mapping[str, npt.NDArray[Any]]) -> str:
    """Return the blake2b-128 hex digest of names, dtypes, shapes and bytes, in name order.

    The same function gives the state digest of a full weight set, so a twin can prove its replica contains
    exactly the bytes the primary published.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        # ascontiguousarray turns a 0-d array into shape (1,); keep the original shape.
        array = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.data)
    return digest.hexdigest()


def encode(envelope: Envelope, tensors: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Serialize `tensors` as safetensors with `envelope` (its checksum filled in) as metadata."""
    contiguous = {name: np.ascontiguousarray(array).reshape(np.shape(array)) for name, array in tensors.items()}
    for name, array in contiguous.items():
        if array.dtype.newbyteorder("<") not in WIRE_DTYPES.values():
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; the wire accepts {sorted(WIRE_DTYPES)}")

    sealed = envelope.model_copy(update={"checksum": tensor_checksum(contiguous)})
    metadata = {METADATA_KEY: sealed.model_dump_json(exclude_none=True)}
    return bytes(safetensors.numpy.save(contiguous, metadata=metadata))


def decode(
    payload: bytes,
    *,
    max_bytes: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    check_finite: bool = True,
) -> Message:
    """Validate `payload` and return its envelope and tensors; raise WireError with a reason otherwise."""
    if len(payload) > max_bytes:
        raise WireError("too_large", f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")

    header, data_start = _read_header(payload, max_header_bytes)
    envelope = _read_envelope(header)
    tensors = _read_tensors(header, payload, data_start)

    if envelope.checksum and tensor_checksum(tensors) != envelope.checksum:
        raise WireError("checksum", f"tensor bytes do not match checksum {envelope.checksum}")

    if check_finite:
        for name, array in tensors.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise WireError("non_finite", f"tensor {name!r} contains NaN or Inf")

    return Message(envelope=envelope, tensors=tensors, nbytes=len(payload))


def peek_envelope(head: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Envelope:
    """Return the envelope from the start of a message (length and header), without reading its tensors."""
    header, _ = _read_header(head, max_header_bytes)
    return _read_envelope(header)


def check_shapes(tensors: Mapping[str, npt.NDArray[Any]], expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise WireError unless `tensors` has exactly the expected names, shapes and dtypes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WireError(
            "bad_shape", f"tensor names differ from the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )

    for name, (shape, dtype) in expected.items():
        array = tensors[name]
        if array.dtype != np.dtype(dtype):
            raise WireError("bad_dtype", f"tensor {name!r} has dtype {array.dtype}, the model expects {dtype}")
        if array.shape != tuple(shape):
            raise WireError("bad_shape", f"tensor {name!r} has shape {array.shape}, the model expects {tuple(shape)}")


def _read_header(payload: bytes, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    if len(payload) < HEADER_LENGTH_BYTES:
        raise WireError("bad_header", f"payload of {len(payload)} bytes is shorter than the 8-byte header length")

    header_length = int.from_bytes(payload[:HEADER_LENGTH_BYTES], "little")
    if header_length > max_header_bytes:
        raise WireError("bad_header", f"header claims {header_length} bytes, above the limit of {max_header_bytes}")
    data_start = HEADER_LENGTH_BYTES + header_length
    if data_start > len(payload):
        raise WireError("bad_header", f"header claims {header_length} bytes but the payload has {len(payload)}")

    try:
        header = json.loads(payload[HEADER_LENGTH_BYTES:data_start])
    except (ValueError, RecursionError) as exc:  # also nesting too deep, integers too long
        raise WireError("bad_header", f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WireError("bad_header", f"header is a JSON {type(header).__name__}, expected an object")
    return header, data_start


def _read_envelope(header: dict[str, Any]) -> Envelope:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise WireError("bad_envelope", f"metadata has no {METADATA_KEY!r} entry; not a llm-twin message")
    try:
        return Envelope.model_validate_json(metadata[METADATA_KEY])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise WireError("bad_envelope", f"envelope field {where}: {first['msg']}") from exc


def _read_tensors(header: dict[str, Any], payload: bytes, data_start: int) -> dict[str, npt.NDArray[Any]]:
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if len(entries) > MAX_TENSORS:
        raise WireError("bad_header", f"header lists {len(entries)} tensors, above the limit of {MAX_TENSORS}")

    data_length = len(payload) - data_start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, entry in entries.items():
        if len(name) > MAX_NAME_CHARS or not _is_utf8(name):
            raise WireError(
                "bad_header", f"tensor name {name[:80]!r} is not valid UTF-8 of at most {MAX_NAME_CHARS} characters"
            )
        dtype, shape, (start, end) = _read_entry(name, entry)
        count = math.prod(shape)
        if end - start != count * dtype.itemsize:
            raise WireError(
                "bad_shape",
                f"tensor {name!r}: shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, range has {end - start}",
            )
        if end > data_length:
            raise WireError("bad_header", f"tensor {name!r} ends at byte {end}, past the data area of {data_length}")
        spans.append((start, end, name))
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=data_start + start)
        tensors[name] = array.reshape(shape)

    # The ranges must tile the data area: no overlap (two names aliasing one buffer), no hidden bytes.
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise WireError("bad_header", f"tensor {name!r} starts at byte {start}, expected {position}")
        position = end
    if position != data_length:
        raise WireError("bad_header", f"data area has {data_length - position} bytes not covered by any tensor")
    return tensors


def _read_entry(name: str, entry: Any) -> tuple[np.dtype[Any], tuple[int, ...], tuple[int, int]]:
    if not isinstance(entry, dict):
        raise WireError("bad_header", f"tensor {name!r}: header entry is not an object")

    code = entry.get("dtype")
    if code not in WIRE_DTYPES:
        raise WireError("bad_dtype", f"tensor {name!r} has dtype {code!r}; accepted: {', '.join(WIRE_DTYPES)}")

    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(dim) is int and 0 <= dim < 2**40 for dim in shape):
        raise WireError("bad_shape", f"tensor {name!r} has invalid shape {shape!r}")

    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise WireError("bad_header", f"tensor {name!r} has invalid data_offsets {offsets!r}")
    return WIRE_DTYPES[code], tuple(shape), (offsets[0], offsets[1])


def _is_utf8(name: str) -> bool:
    # JSON escapes can produce lone surrogates, which no UTF-8 encoder (and so no checksum) accepts.
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True
