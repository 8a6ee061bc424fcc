"""A tiny published model and message helpers for the wire, tracker, replica and checkpoint tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.model.base import Weights
from monitor.model.registry import build_model
from monitor.primary.updates import PublishedState
from monitor.wire.codec import Message, decode, encode
from monitor.wire.envelope import Architecture

# 1,812 parameters in five tensors: every test that builds, encodes and applies weights stays in milliseconds.
TINY_ARCHITECTURE = Architecture(context_size=2, embedding_dim=2, hidden_dim=4)
MODEL_ID = "testlm"
MAX_BYTES = 1 << 20  # above any unchunked message of the tiny model, so nothing here is chunked


def tiny_state(seed: int = 0) -> PublishedState:
    """Return a fresh published state of the tiny model, with its own random session id."""
    model = build_model(TINY_ARCHITECTURE)
    return PublishedState(MODEL_ID, TINY_ARCHITECTURE, model.specs(), model.init_weights(seed))


def trained_weights(state: PublishedState, seed: int, scale: float = 0.1) -> Weights:
    """Return weights near `state.weights`, as a training step would produce them."""
    rng = np.random.default_rng(seed)
    return {
        name: (array + np.float32(scale) * rng.standard_normal(array.shape).astype(np.float32)).astype(np.float32)
        for name, array in state.weights.items()
    }


def decode_single(payloads: list[bytes]) -> Message:
    """Decode the one message that an unchunked publish produced."""
    assert len(payloads) == 1, f"expected one unchunked message, got {len(payloads)}"
    return decode(payloads[0], max_bytes=MAX_BYTES)


def publish_snapshot(state: PublishedState) -> Message:
    return decode_single(state.snapshot(MAX_BYTES))


def publish_delta(state: PublishedState, seed: int, codec: Any = "float32") -> Message:
    """Advance `state` toward freshly trained weights and return the delta message it publishes."""
    _, payloads = state.advance(trained_weights(state, seed), MAX_BYTES, snapshot=False, codec=codec)
    return decode_single(payloads)


def reseal(message: Message, **updates: Any) -> Message:
    """Return `message` with envelope fields replaced and a valid checksum, as a buggy primary would send it."""
    envelope = message.envelope.model_copy(update=updates)
    return decode(encode(envelope, message.tensors), max_bytes=MAX_BYTES)
