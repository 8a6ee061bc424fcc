"""The wire format: safetensors payloads whose metadata carries a validated envelope."""

from monitor.wire.codec import Message, check_shapes, decode, encode, tensor_checksum
from monitor.wire.envelope import Architecture, Envelope, Kind, TensorEntry
from monitor.wire.errors import REJECT_REASONS, RejectReason, WireError

__all__ = [
    "REJECT_REASONS",
    "Architecture",
    "Envelope",
    "Kind",
    "Message",
    "RejectReason",
    "TensorEntry",
    "WireError",
    "check_shapes",
    "decode",
    "encode",
    "tensor_checksum",
]
