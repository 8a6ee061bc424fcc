"""The primary's published state: the weights twins have, and the messages that move them forward.

The primary trains weights W, but twins only ever see the published weights P. A delta is `W - P` in float32
and P advances by the same float32 addition a twin performs, so a mirror twin's replica stays bitwise equal to
P. Whatever rounding the subtraction loses is still in `W - P` and travels with the next delta.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from monitor.model.base import TensorSpec, Weights
from monitor.wire.chunking import split
from monitor.wire.codec import encode, tensor_checksum
from monitor.wire.delta_codecs import decode_delta, encode_delta
from monitor.wire.envelope import Architecture, Codec, Envelope, Kind, TensorEntry

HISTORY_VERSIONS = 10_000


class PublishedState:
    """The published weights P, their version, and the session's sequence numbers."""

    def __init__(
        self, model_id: str, architecture: Architecture, specs: Mapping[str, TensorSpec], initial: Weights
    ) -> None:
        self.model_id = model_id
        self.architecture = architecture
        self.specs = dict(specs)
        self.session_id = secrets.token_hex(8)
        self.weights: Weights = {name: array.copy() for name, array in initial.items()}
        self.version = 0
        self.version_created_ns = time.time_ns()
        self.digest = tensor_checksum(self.weights)
        self.history: deque[tuple[int, str]] = deque([(0, self.digest)], maxlen=HISTORY_VERSIONS)
        """(version, state digest) of the latest versions, to check what twins applied."""
        self._seq = 0

    def manifest(self) -> tuple[TensorEntry, ...]:
        """Return name, shape, dtype and digest of every tensor at the current version."""
        return tuple(
            TensorEntry(name=spec.name, shape=spec.shape, digest=tensor_checksum({spec.name: self.weights[spec.name]}))
            for spec in self.specs.values()
        )

    def status_message(self, online: bool) -> bytes:
        """Return the retained birth (online, with the manifest) or death (offline) message."""
        envelope = Envelope(
            model_id=self.model_id,
            session_id=self.session_id,
            kind=Kind.STATUS,
            version=self.version,
            created_ns=time.time_ns(),
            status="online" if online else "offline",
            architecture=self.architecture if online else None,
            manifest=self.manifest() if online else None,
            state_digest=self.digest,
        )
        return encode(envelope, {})

    def snapshot(self, max_message_bytes: int) -> list[bytes]:
        """Return the current P as a snapshot, split into chunks when it exceeds `max_message_bytes`."""
        envelope = self._weights_envelope(Kind.SNAPSHOT, base_version=None, created_ns=self.version_created_ns)
        return split(encode(envelope, self.weights), envelope, max_message_bytes)

    def advance(
        self,
        trained: Mapping[str, npt.NDArray[np.float32]],
        max_message_bytes: int,
        *,
        snapshot: bool,
        codec: Codec = "float32",
    ) -> tuple[Kind, list[bytes]]:
        """Move P toward the trained weights as a new version; return the kind and the messages to publish.

        P moves by the decoded delta, the same float32 addition a twin performs. With a lossy codec, the part
        the codec dropped remains in `trained - P` and is sent with the next delta.
        """
        delta = {name: np.subtract(trained[name], self.weights[name], dtype=np.float32) for name in self.specs}
        wire = encode_delta(codec, delta) if not snapshot else {}
        applied = (
            decode_delta(codec, wire, {name: spec.shape for name, spec in self.specs.items()})
            if not snapshot
            else delta
        )
        for name, change in applied.items():
            np.add(self.weights[name], change, out=self.weights[name])

        base_version = self.version
        self.version += 1
        self.version_created_ns = time.time_ns()
        self.digest = tensor_checksum(self.weights)
        self.history.append((self.version, self.digest))

        if snapshot:
            return Kind.SNAPSHOT, self.snapshot(max_message_bytes)
        envelope = self._weights_envelope(
            Kind.DELTA, base_version=base_version, created_ns=self.version_created_ns, codec=codec
        )
        return Kind.DELTA, split(encode(envelope, wire), envelope, max_message_bytes)

    def outputs_message(
        self, contexts: npt.NDArray[np.uint8], logprobs: npt.NDArray[np.float32], *, top_k: int = 0
    ) -> bytes:
        """Return an outputs message: the contexts and the log-probabilities P computed on them.

        With `top_k` > 0 only the k most likely tokens of each position travel, highest first, as
        `topk_ids` and `topk_logprobs`; the twin then estimates the divergences with the tail carried as one bucket.
        """
        tensors: dict[str, npt.NDArray[np.generic]] = {"contexts": contexts}
        if top_k:
            order = np.argsort(-logprobs, axis=1, kind="stable")[:, :top_k]
            tensors["topk_ids"] = order.astype(np.int32)
            tensors["topk_logprobs"] = np.take_along_axis(logprobs, order, axis=1)
        else:
            tensors["logprobs"] = logprobs
        envelope = Envelope(
            model_id=self.model_id,
            session_id=self.session_id,
            kind=Kind.OUTPUTS,
            version=self.version,
            created_ns=time.time_ns(),
        )
        return encode(envelope, tensors)

    def _weights_envelope(
        self, kind: Kind, *, base_version: int | None, created_ns: int, codec: Codec = "float32"
    ) -> Envelope:
        self._seq += 1
        return Envelope(
            model_id=self.model_id,
            session_id=self.session_id,
            kind=kind,
            version=self.version,
            base_version=base_version,
            seq=self._seq,
            created_ns=created_ns,
            codec=codec,
            state_digest=self.digest,
            architecture=self.architecture if kind is Kind.SNAPSHOT else None,
        )
