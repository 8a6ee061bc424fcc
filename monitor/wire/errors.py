"""Reasons for rejecting a message from the broker.

Every rejection carries one reason from `REJECT_REASONS`, a small fixed set, because the reason becomes the
`reason` label of `llm_twin_messages_rejected_total` and a label must never take unbounded values.
"""

from __future__ import annotations

from typing import Literal, get_args

RejectReason = Literal[
    "too_large",  # payload above the configured size limit
    "bad_header",  # not a safetensors file: header length, JSON or layout invalid (a pickle lands here)
    "bad_envelope",  # metadata missing or failing the envelope schema
    "bad_dtype",  # dtype outside the allow-list
    "bad_shape",  # shape inconsistent with the byte count or with the model
    "non_finite",  # NaN or Inf in a floating-point tensor
    "bad_values",  # values outside their domain: log-probabilities not summing to 1, token ids out of range
    "checksum",  # tensor bytes do not match the checksum or the state digest
    "unknown_model",  # envelope names another model, or an architecture the twin cannot run
    "stale_version",  # version older than the one the twin already has
    "duplicate",  # same sequence number seen before (QoS 1 redelivery)
    "out_of_order",  # older sequence number than one already applied, arriving late
    "bad_control",  # invalid control request on the primary side
    "processing_error",  # an unexpected error while handling the message: a bug, logged with its traceback
]

REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)


class WireError(ValueError):
    """A payload failed validation. `reason` is the metric label, and the message describes the problem."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
