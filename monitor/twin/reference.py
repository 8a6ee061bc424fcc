"""The twin's copy of the primary's weights, moved forward by snapshots and deltas.

Each accepted update produces a new `WeightSet` whose arrays are never written again, so a comparison that
uses the previous set keeps computing on one consistent version while the next one is being built. There is
no torn mix of two versions. Every update must reproduce the primary's state digest, or it is discarded.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from monitor.model.base import Weights
from monitor.wire.codec import Message, check_shapes, tensor_checksum
from monitor.wire.delta_codecs import decode_delta
from monitor.wire.envelope import Architecture, Kind
from monitor.wire.errors import WireError

logger = logging.getLogger(__name__)

RECENT_SEQS = 4096  # sequence numbers remembered to tell a redelivery from a late, reordered message


class ResyncNeeded(Exception):
    """The update cannot be applied; only a fresh snapshot helps. `reason` is a `RESYNC_REASONS` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WeightSet:
    """Read-only weights of one primary version."""

    session_id: str
    version: int
    created_ns: int
    weights: Weights
    digest: str


class ReferenceTracker:
    """Apply weights messages in order; detect duplicates, gaps, new sessions and corrupt updates."""

    def __init__(self, max_parameters: int, twin_id: str = "") -> None:
        self.max_parameters = max_parameters
        self.twin_id = twin_id
        self.current: WeightSet | None = None
        self.architecture: Architecture | None = None
        self.session_id: str | None = None
        self.last_seq = 0
        self.gaps = 0
        self._recent_seqs: deque[int] = deque(maxlen=RECENT_SEQS)

    def expected_shapes(self, architecture: Architecture) -> dict[str, tuple[tuple[int, ...], str]]:
        from monitor.model.registry import build_model

        model = build_model(architecture)
        return {name: (spec.shape, spec.dtype) for name, spec in model.specs().items()}

    def apply(self, message: Message) -> WeightSet:
        """Return the weight set after `message`; raise WireError to reject it or ResyncNeeded to resync."""
        envelope = message.envelope
        same_session = envelope.session_id == self.session_id
        if same_session and envelope.seq in self._recent_seqs:
            raise WireError("duplicate", f"weights seq {envelope.seq} already seen; a QoS 1 redelivery")
        if same_session and envelope.seq <= self.last_seq:
            raise WireError("out_of_order", f"weights seq {envelope.seq} arrived after seq {self.last_seq}")
        if same_session and envelope.seq > self.last_seq + 1:
            self.gaps += 1
            logger.warning(
                "weights sequence gap twin_id=%s session=%s expected=%d got=%d",
                self.twin_id,
                envelope.session_id,
                self.last_seq + 1,
                envelope.seq,
            )

        if envelope.kind is Kind.SNAPSHOT:
            updated = self._snapshot(message, same_session)
        elif envelope.kind is Kind.DELTA:
            updated = self._delta(message, same_session)
        else:
            raise WireError("bad_envelope", f"kind {envelope.kind} does not belong on the weights topic")

        if not same_session:
            self._recent_seqs.clear()
        self._recent_seqs.append(envelope.seq)
        self.session_id = envelope.session_id
        self.last_seq = envelope.seq
        self.current = updated
        return updated

    def restore(self, message: Message) -> WeightSet:
        """Start from a checkpointed snapshot as if it had just arrived, keeping its session and sequence number."""
        self.session_id = None
        updated = self._snapshot(message, same_session=False)
        self.session_id = message.envelope.session_id
        self.last_seq = message.envelope.seq
        self._recent_seqs.clear()
        self._recent_seqs.append(self.last_seq)
        self.current = updated
        return updated

    def _snapshot(self, message: Message, same_session: bool) -> WeightSet:
        envelope = message.envelope
        architecture = envelope.architecture or self.architecture
        if architecture is None:
            raise WireError("bad_envelope", "snapshot without architecture, and no birth message seen yet")
        if same_session and self.current is not None and envelope.version < self.current.version:
            raise WireError(
                "stale_version",
                f"snapshot version {envelope.version} is older than held version {self.current.version}",
            )

        expected = self.expected_shapes(architecture)
        parameters = sum(int(np.prod(shape)) for shape, _ in expected.values())
        if parameters > self.max_parameters:
            raise WireError(
                "unknown_model", f"model of {parameters} parameters exceeds --max-parameters {self.max_parameters}"
            )
        check_shapes(message.tensors, expected)

        weights = {name: np.array(array, dtype=np.float32) for name, array in message.tensors.items()}
        digest = self._verify(weights, envelope.state_digest, envelope.version)
        self.architecture = architecture
        return self._freeze(envelope.session_id, envelope.version, envelope.created_ns, weights, digest)

    def _delta(self, message: Message, same_session: bool) -> WeightSet:
        envelope = message.envelope
        current = self.current
        if current is None:
            raise ResyncNeeded("startup", f"delta version {envelope.version} arrived before any snapshot")
        if not same_session:
            raise ResyncNeeded(
                "new_session", f"delta from session {envelope.session_id}, holding session {self.session_id}"
            )
        if envelope.version <= current.version:
            raise WireError(
                "stale_version", f"delta version {envelope.version} is not newer than held version {current.version}"
            )
        if envelope.base_version != current.version:
            reason = "gap" if envelope.seq > self.last_seq + 1 else "base_mismatch"
            self.last_seq = envelope.seq
            self._recent_seqs.append(envelope.seq)
            raise ResyncNeeded(
                reason,
                f"delta {envelope.base_version}->{envelope.version} does not start at held version {current.version}",
            )
        assert self.architecture is not None
        shapes = {name: shape for name, (shape, _) in self.expected_shapes(self.architecture).items()}
        delta = decode_delta(envelope.codec, message.tensors, shapes)
        # The same float32 addition the primary performed on its published copy, so the result is bitwise equal.
        weights = {name: np.add(current.weights[name], delta[name], dtype=np.float32) for name in current.weights}
        digest = self._verify(weights, envelope.state_digest, envelope.version)
        return self._freeze(envelope.session_id, envelope.version, envelope.created_ns, weights, digest)

    def _verify(self, weights: Weights, digest: str | None, version: int) -> str:
        actual = tensor_checksum(weights)
        if digest is not None and actual != digest:
            raise ResyncNeeded(
                "checksum", f"weights after version {version} do not match the primary's state digest {digest}"
            )
        return actual

    @staticmethod
    def _freeze(session_id: str, version: int, created_ns: int, weights: Weights, digest: str) -> WeightSet:
        for array in weights.values():
            array.flags.writeable = False
        return WeightSet(session_id, version, created_ns, weights, digest)
