"""The wire codec: round trips, compatibility with safetensors, and every rejection path of `decode`."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.wire.codec import MAX_TENSORS, Message, check_shapes, decode, encode, tensor_checksum
from monitor.wire.envelope import METADATA_KEY, Envelope, Kind
from monitor.wire.errors import WireError

MAX_BYTES = 1 << 20

Tensors = dict[str, npt.NDArray[Any]]


def _envelope(**fields: Any) -> Envelope:
    values: dict[str, Any] = {
        "model_id": "testlm",
        "session_id": "0123456789abcdef",
        "kind": Kind.OUTPUTS,
        "version": 7,
        "seq": 3,
        "created_ns": 1_700_000_000_000_000_000,
    }
    values.update(fields)
    return Envelope(**values)


def _tensors() -> Tensors:
    """One tensor of every wire dtype, plus an empty tensor."""
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(2, 2), dtype=np.int32),
        "i8": rng.integers(-128, 127, size=7, dtype=np.int8),
        "u8": rng.integers(0, 255, size=(2, 3, 2), dtype=np.uint8),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _raw_payload(entries: dict[str, Any], data: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """Build a safetensors payload by hand, with a valid envelope unless `metadata` replaces it."""
    header: dict[str, Any] = {
        "__metadata__": metadata if metadata is not None else {METADATA_KEY: _envelope().model_dump_json()}
    }
    header.update(entries)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


def _with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _envelope_json(**changes: Any) -> str:
    """Return a valid envelope as JSON with `changes` applied, bypassing the schema (None removes a field)."""
    fields = _envelope().model_dump(mode="json", exclude_none=True)
    for name, value in changes.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return json.dumps(fields)


def _decode_error(payload: bytes, **options: Any) -> WireError:
    with pytest.raises(WireError) as caught:
        decode(payload, max_bytes=options.pop("max_bytes", MAX_BYTES), **options)
    return caught.value


# Round trip and compatibility.


def test_codec_round_trip_keeps_envelope() -> None:
    envelope = _envelope(kind=Kind.DELTA, base_version=6, codec="int8", state_digest="ab" * 16)
    tensors = _tensors()

    message = decode(encode(envelope, tensors), max_bytes=MAX_BYTES)

    assert message.envelope == envelope.model_copy(update={"checksum": tensor_checksum(tensors)})


def test_codec_round_trip_keeps_tensors_bitwise() -> None:
    tensors = _tensors()

    message = decode(encode(_envelope(), tensors), max_bytes=MAX_BYTES)

    assert sorted(message.tensors) == sorted(tensors)
    for name, original in tensors.items():
        decoded = message.tensors[name]
        assert decoded.dtype == original.dtype, name
        assert decoded.shape == original.shape, name
        assert decoded.tobytes() == original.tobytes(), name


def test_codec_round_trip_keeps_scalar_shape() -> None:
    tensors = {"temperature": np.array(1.5, dtype=np.float32)}

    message = decode(encode(_envelope(), tensors), max_bytes=MAX_BYTES)

    assert message.tensors["temperature"].shape == ()


def test_codec_round_trip_reports_payload_size() -> None:
    payload = encode(_envelope(), _tensors())

    message = decode(payload, max_bytes=MAX_BYTES)

    assert message.nbytes == len(payload)


def test_codec_decoded_tensors_are_read_only() -> None:
    message = decode(encode(_envelope(), _tensors()), max_bytes=MAX_BYTES)

    with pytest.raises(ValueError, match="read-only"):
        message.tensors["f32"][0, 0] = 1.0


def test_codec_payload_loads_with_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    envelope = _envelope()
    payload = encode(envelope, tensors)
    path = tmp_path / "message.safetensors"
    path.write_bytes(payload)

    loaded = safetensors.numpy.load(payload)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()

    assert sorted(loaded) == sorted(tensors)
    for name, original in tensors.items():
        assert loaded[name].dtype == original.dtype, name
        assert loaded[name].tobytes() == original.tobytes(), name
    sealed = Envelope.model_validate_json(metadata[METADATA_KEY])
    assert sealed == envelope.model_copy(update={"checksum": tensor_checksum(tensors)})


def test_codec_decodes_payload_written_by_safetensors() -> None:
    tensors = _tensors()
    envelope = _envelope(checksum=tensor_checksum(tensors))
    payload = safetensors.numpy.save(tensors, metadata={METADATA_KEY: envelope.model_dump_json(exclude_none=True)})

    message = decode(bytes(payload), max_bytes=MAX_BYTES)

    assert message.envelope == envelope
    assert message.tensors["u8"].tobytes() == tensors["u8"].tobytes()


def test_encode_rejects_dtype_outside_allow_list() -> None:
    tensors = {"w": np.zeros(3, dtype=np.float64)}

    with pytest.raises(ValueError, match=r"tensor 'w' has dtype float64; the wire accepts \['F16', 'F32'"):
        encode(_envelope(), tensors)


def test_tensor_checksum_covers_names_shapes_and_bytes() -> None:
    base = {"a": np.arange(6, dtype=np.float32)}

    digest = tensor_checksum(base)

    assert digest == tensor_checksum({"a": np.arange(6, dtype=np.float32)})
    assert digest != tensor_checksum({"b": base["a"]})
    assert digest != tensor_checksum({"a": base["a"].reshape(2, 3)})
    assert digest != tensor_checksum({"a": base["a"].view(np.int32)})
    assert digest != tensor_checksum({"a": base["a"] + np.float32(1)})


# Rejections, in the order `decode` checks them.


def test_decode_rejects_payload_above_limit() -> None:
    payload = encode(_envelope(), _tensors())

    error = _decode_error(payload, max_bytes=len(payload) - 1)

    assert error.reason == "too_large"
    assert str(error) == f"payload of {len(payload)} bytes exceeds the limit of {len(payload) - 1} bytes"


def test_decode_rejects_payload_shorter_than_length_prefix() -> None:
    error = _decode_error(b"\x05\x00\x00")

    assert error.reason == "bad_header"
    assert str(error) == "payload of 3 bytes is shorter than the 8-byte header length"


def test_decode_rejects_header_length_beyond_payload() -> None:
    payload = (100).to_bytes(8, "little") + b"{}" + b"\0" * 10

    error = _decode_error(payload)

    assert error.reason == "bad_header"
    assert str(error) == "header claims 100 bytes but the payload has 20"


def test_decode_rejects_header_length_beyond_limit() -> None:
    payload = _with_header(b"{" + b" " * 98 + b"}")

    error = _decode_error(payload, max_header_bytes=64)

    assert error.reason == "bad_header"
    assert str(error) == "header claims 100 bytes, above the limit of 64"


@pytest.mark.parametrize("header", [b"not json", b"\xff\xfe{}", b'{"a": 1'], ids=["text", "not_utf8", "truncated"])
def test_decode_rejects_non_json_header(header: bytes) -> None:
    error = _decode_error(_with_header(header))

    assert error.reason == "bad_header"
    assert str(error).startswith("header is not valid JSON: ")


@pytest.mark.parametrize(("header", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"NaN", "float")])
def test_decode_rejects_header_not_an_object(header: bytes, kind: str) -> None:
    error = _decode_error(_with_header(header))

    assert error.reason == "bad_header"
    assert str(error) == f"header is a JSON {kind}, expected an object"


@pytest.mark.parametrize(
    "metadata",
    [None, {"format": "pt"}, {METADATA_KEY: {"nested": "object"}}],
    ids=["no_metadata", "other_key", "not_a_string"],
)
def test_decode_rejects_missing_envelope(metadata: dict[str, Any] | None) -> None:
    header: dict[str, Any] = {"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    payload = _with_header(json.dumps(header).encode()) + b"ab"

    error = _decode_error(payload)

    assert error.reason == "bad_envelope"
    assert str(error) == "metadata has no 'llm_twin' entry; not a llm-twin message"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "delta"}, "envelope field envelope: Value error, a delta needs base_version"),
        ({"base_version": 7}, "base_version 7 must be lower than version 7"),
        ({"chunk_index": 3, "chunk_count": 3}, "chunk_index 3 must be lower than chunk_count 3"),
        ({"kind": "chunk"}, "a chunk needs chunk_of and total_bytes"),
        ({"kind": "status"}, "a status message needs status"),
        ({"model_id": "bad/model"}, "envelope field model_id: String should match pattern"),
        ({"session_id": "XYZ"}, "envelope field session_id: String should match pattern"),
        ({"version": -1}, "envelope field version: Input should be greater than or equal to 0"),
        ({"kind": "weights"}, "envelope field kind: Input should be 'snapshot', 'delta'"),
        ({"codec": "bfloat16"}, "envelope field codec: Input should be 'float32', 'float16', 'int8' or 'topk'"),
        ({"schema_version": 2}, "envelope field schema_version: Input should be 1"),
        ({"checksum": "xyz"}, "envelope field checksum: String should match pattern"),
        ({"model_id": None}, "envelope field model_id: Field required"),
        ({"priority": 1}, "envelope field priority: Extra inputs are not permitted"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_decode_rejects_envelope_schema_error(changes: dict[str, Any], message: str) -> None:
    payload = _raw_payload({}, b"", metadata={METADATA_KEY: _envelope_json(**changes)})

    error = _decode_error(payload)

    assert error.reason == "bad_envelope"
    assert message in str(error)


def test_decode_rejects_envelope_that_is_not_json() -> None:
    payload = _raw_payload({}, b"", metadata={METADATA_KEY: "{not json"})

    error = _decode_error(payload)

    assert error.reason == "bad_envelope"
    assert str(error).startswith("envelope field envelope: Invalid JSON")


def test_decode_rejects_too_many_tensors() -> None:
    entries = {f"t{index}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for index in range(MAX_TENSORS + 1)}

    error = _decode_error(_raw_payload(entries, b""), max_bytes=16 * MAX_BYTES)

    assert error.reason == "bad_header"
    assert str(error) == f"header lists {MAX_TENSORS + 1} tensors, above the limit of {MAX_TENSORS}"


def test_decode_rejects_entry_that_is_not_an_object() -> None:
    error = _decode_error(_raw_payload({"w": [0, 4]}, b"\0" * 4))

    assert error.reason == "bad_header"
    assert str(error) == "tensor 'w': header entry is not an object"


@pytest.mark.parametrize("code", ["F64", "BF16", "BOOL", "f32", None])
def test_decode_rejects_dtype_outside_allow_list(code: str | None) -> None:
    entries = {"w": {"dtype": code, "shape": [1], "data_offsets": [0, 8]}}

    error = _decode_error(_raw_payload(entries, b"\0" * 8))

    assert error.reason == "bad_dtype"
    assert str(error) == f"tensor 'w' has dtype {code!r}; accepted: F32, F16, I32, I8, U8"


def test_decode_rejects_float64_payload_written_by_safetensors() -> None:
    payload = safetensors.numpy.save(
        {"w": np.zeros(4, dtype=np.float64)}, metadata={METADATA_KEY: _envelope().model_dump_json()}
    )

    error = _decode_error(bytes(payload))

    assert error.reason == "bad_dtype"
    assert "'F64'" in str(error)


@pytest.mark.parametrize(
    "shape",
    [[-1], [1.0], ["2"], [True], [2**40], [1] * 9, "4", None],
    ids=["negative", "float", "string", "bool", "huge", "nine_dims", "not_a_list", "missing"],
)
def test_decode_rejects_invalid_shape(shape: Any) -> None:
    entries = {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}

    error = _decode_error(_raw_payload(entries, b"\0" * 4))

    assert error.reason == "bad_shape"
    assert str(error) == f"tensor 'w' has invalid shape {shape!r}"


def test_decode_rejects_shape_that_disagrees_with_byte_count() -> None:
    entries = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}

    error = _decode_error(_raw_payload(entries, b"\0" * 8))

    assert error.reason == "bad_shape"
    assert str(error) == "tensor 'w': shape (3,) of float32 needs 12 bytes, range has 8"


@pytest.mark.parametrize(
    "offsets", [[8, 0], [0], [0, 4, 8], [-4, 0], [0.0, 4.0], "0:4", None], ids=lambda value: repr(value)
)
def test_decode_rejects_invalid_data_offsets(offsets: Any) -> None:
    entries = {"w": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}

    error = _decode_error(_raw_payload(entries, b"\0" * 4))

    assert error.reason == "bad_header"
    assert str(error) == f"tensor 'w' has invalid data_offsets {offsets!r}"


def test_decode_rejects_range_past_data_area() -> None:
    entries = {"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}

    error = _decode_error(_raw_payload(entries, b"\0" * 4))

    assert error.reason == "bad_header"
    assert str(error) == "tensor 'w' ends at byte 8, past the data area of 4"


def test_decode_rejects_overlapping_ranges() -> None:
    entries = {
        "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
    }

    error = _decode_error(_raw_payload(entries, b"\0" * 12))

    assert error.reason == "bad_header"
    assert str(error) == "tensor 'b' starts at byte 4, expected 8"


def test_decode_rejects_two_names_on_one_range() -> None:
    entries = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    }

    error = _decode_error(_raw_payload(entries, b"\0" * 4))

    assert error.reason == "bad_header"
    assert str(error) == "tensor 'b' starts at byte 0, expected 4"


def test_decode_rejects_gap_between_ranges() -> None:
    entries = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
    }

    error = _decode_error(_raw_payload(entries, b"\0" * 12))

    assert error.reason == "bad_header"
    assert str(error) == "tensor 'b' starts at byte 8, expected 4"


def test_decode_rejects_trailing_bytes() -> None:
    entries = {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}

    error = _decode_error(_raw_payload(entries, b"\0" * 12))

    assert error.reason == "bad_header"
    assert str(error) == "data area has 4 bytes not covered by any tensor"


def test_decode_rejects_checksum_mismatch() -> None:
    tensors = {"w": np.arange(16, dtype=np.float32)}
    payload = bytearray(encode(_envelope(), tensors))
    payload[-1] ^= 0x01
    checksum = tensor_checksum(tensors)

    error = _decode_error(bytes(payload))

    assert error.reason == "checksum"
    assert str(error) == f"tensor bytes do not match checksum {checksum}"


def test_decode_rejects_checksum_of_other_tensors() -> None:
    envelope = _envelope(checksum=tensor_checksum({"w": np.ones(4, np.float32)}))
    payload = safetensors.numpy.save(
        {"w": np.zeros(4, np.float32)}, metadata={METADATA_KEY: envelope.model_dump_json()}
    )

    error = _decode_error(bytes(payload))

    assert error.reason == "checksum"
    assert envelope.checksum in str(error)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_rejects_non_finite(value: float, dtype: type[np.floating[Any]]) -> None:
    tensors = {"ok": np.zeros(2, dtype=np.float32), "bad": np.array([0.0, value, 1.0], dtype=dtype)}

    error = _decode_error(encode(_envelope(), tensors))

    assert error.reason == "non_finite"
    assert str(error) == "tensor 'bad' contains NaN or Inf"


def test_decode_accepts_non_finite_when_not_checked() -> None:
    tensors = {"bad": np.array([np.nan, np.inf], dtype=np.float32)}

    message = decode(encode(_envelope(), tensors), max_bytes=MAX_BYTES, check_finite=False)

    assert message.tensors["bad"].tobytes() == tensors["bad"].tobytes()


def test_decode_rejects_pickle_without_unpickling() -> None:
    # Unpickling this would raise RuntimeError from the reduce hook, so a WireError proves nothing ran.
    payload = pickle.dumps({"embedding": np.zeros((4, 4), np.float32), "hook": _PickleTripwire()})

    error = _decode_error(payload)

    assert error.reason == "bad_header"
    assert str(error).startswith("header claims ")


class _PickleTripwire:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_fail_if_unpickled, ())


def _fail_if_unpickled() -> None:
    raise RuntimeError("the payload was unpickled")


# Inputs that the JSON parser itself cannot handle, and names that cannot be hashed.


def test_decode_rejects_deeply_nested_header() -> None:
    header = b"[" * 100_000 + b"]" * 100_000

    error = _decode_error(_with_header(header))

    assert error.reason == "bad_header"


def test_decode_rejects_integer_too_long_for_json() -> None:
    header = b'{"w": ' + b"1" * 5000 + b"}"

    error = _decode_error(_with_header(header))

    assert error.reason == "bad_header"


def test_decode_rejects_tensor_name_with_lone_surrogate() -> None:
    envelope = _envelope(checksum="0" * 32)
    header = {
        "__metadata__": {METADATA_KEY: envelope.model_dump_json()},
        "\ud800": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
    }
    payload = _with_header(json.dumps(header).encode()) + b"ab"

    error = _decode_error(payload)

    assert error.reason == "bad_header"


# check_shapes.

EXPECTED_SHAPES = {"a": ((2, 3), "float32"), "b": ((4,), "float32")}


def _model_tensors() -> Tensors:
    return {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def test_check_shapes_accepts_matching_tensors() -> None:
    tensors = _model_tensors()

    check_shapes(tensors, EXPECTED_SHAPES)


def test_check_shapes_rejects_missing_tensor() -> None:
    tensors = _model_tensors()
    del tensors["b"]

    with pytest.raises(WireError, match=re.escape("missing ['b'], unexpected []")) as caught:
        check_shapes(tensors, EXPECTED_SHAPES)

    assert caught.value.reason == "bad_shape"


def test_check_shapes_rejects_unexpected_tensor() -> None:
    tensors = {**_model_tensors(), "c": np.zeros(1, np.float32)}

    with pytest.raises(WireError, match=re.escape("missing [], unexpected ['c']")) as caught:
        check_shapes(tensors, EXPECTED_SHAPES)

    assert caught.value.reason == "bad_shape"


def test_check_shapes_rejects_wrong_dtype() -> None:
    tensors = {**_model_tensors(), "b": np.zeros(4, np.float16)}

    with pytest.raises(WireError, match="tensor 'b' has dtype float16, the model expects float32") as caught:
        check_shapes(tensors, EXPECTED_SHAPES)

    assert caught.value.reason == "bad_dtype"


def test_check_shapes_rejects_wrong_shape() -> None:
    tensors = {**_model_tensors(), "a": np.zeros((3, 2), np.float32)}

    with pytest.raises(WireError, match=re.escape("tensor 'a' has shape (3, 2), the model expects (2, 3)")) as caught:
        check_shapes(tensors, EXPECTED_SHAPES)

    assert caught.value.reason == "bad_shape"


# Property tests: whatever arrives, decode returns a Message or raises WireError, nothing else.


def _decode_or_wire_error(payload: bytes) -> Message | WireError:
    try:
        return decode(payload, max_bytes=MAX_BYTES)
    except WireError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=4096))
def test_decode_random_bytes_raise_only_wire_error(payload: bytes) -> None:
    outcome = _decode_or_wire_error(payload)

    assert isinstance(outcome, WireError)


@settings(max_examples=300, deadline=None)
@given(header=st.binary(max_size=2048), data=st.binary(max_size=256))
def test_decode_random_header_bytes_raise_only_wire_error(header: bytes, data: bytes) -> None:
    # A correct length prefix gets random bytes past the first check and into the JSON parser.
    outcome = _decode_or_wire_error(_with_header(header) + data)

    assert isinstance(outcome, WireError)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_TENSOR_ENTRIES = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I32", "I8", "U8", "F64", "X"]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | _JSON_VALUES,
        "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | _JSON_VALUES,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.dictionaries(st.text(min_size=1, max_size=6), _TENSOR_ENTRIES | _JSON_VALUES, max_size=4),
    data=st.binary(max_size=64),
    sealed=st.booleans(),
)
def test_decode_random_tensor_table_raises_only_wire_error(entries: dict[str, Any], data: bytes, sealed: bool) -> None:
    # A valid envelope gets the random tensor table past the header and envelope checks.
    envelope = _envelope(checksum="0" * 32) if sealed else _envelope()
    entries.pop("__metadata__", None)
    payload = _raw_payload(entries, data, metadata={METADATA_KEY: envelope.model_dump_json()})

    outcome = _decode_or_wire_error(payload)

    assert isinstance(outcome, Message | WireError)


_VALID_PAYLOAD = encode(_envelope(), _tensors())


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_VALID_PAYLOAD) - 1), st.integers(1, 255)), min_size=1, max_size=8),
    cut=st.integers(0, len(_VALID_PAYLOAD)),
)
def test_decode_damaged_payload_raises_only_wire_error(flips: list[tuple[int, int]], cut: int) -> None:
    payload = bytearray(_VALID_PAYLOAD)
    for position, mask in flips:
        payload[position] ^= mask

    outcome = _decode_or_wire_error(bytes(payload[:cut]) if cut < len(payload) else bytes(payload))

    assert isinstance(outcome, Message | WireError)
