"""Outputs batches from the primary: parse them from the wire and compare them with the twin's outputs.

A batch carries the contexts the primary saw and either its full next-byte log-probabilities
(`logprobs`, shape (B, 256)) or only the top k of them (`topk_ids` and `topk_logprobs`, shape (B, k)), as
an LLM API would return. Shapes and dtypes are checked here. Value domains (rows summing to 1, ids in range)
are checked by the divergence functions, whose ValueError becomes a `bad_values` rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from monitor.analytics.divergence import compare_distributions, compare_topk
from monitor.twin.outputs import FloatArray, full_signals, topk_signals
from monitor.wire.codec import Message
from monitor.wire.envelope import Architecture
from monitor.wire.errors import WireError

VOCABULARY = 256
MAX_POSITIONS = 65_536


@dataclass(frozen=True)
class OutputsBatch:
    version: int
    contexts: npt.NDArray[np.uint8]
    logprobs: npt.NDArray[np.float32] | None
    topk_ids: npt.NDArray[np.int32] | None
    topk_logprobs: npt.NDArray[np.float32] | None

    def compare(self, twin_logprobs: npt.NDArray[np.float32]) -> dict[str, FloatArray]:
        """Return the per-position signals of this batch against the twin's log-probabilities."""
        try:
            if self.logprobs is not None:
                return full_signals(compare_distributions(self.logprobs, twin_logprobs))
            assert self.topk_ids is not None and self.topk_logprobs is not None
            estimate = compare_topk(self.topk_ids, self.topk_logprobs, twin_logprobs)
            return topk_signals(estimate, _coarse_l2(self.topk_ids, self.topk_logprobs, twin_logprobs))
        except ValueError as exc:
            raise WireError("bad_values", f"outputs of version {self.version}: {exc}") from exc


def parse_outputs(message: Message, architecture: Architecture) -> OutputsBatch:
    """Return the batch in `message`, or raise WireError naming what is wrong with it."""
    tensors = message.tensors
    names = set(tensors)
    if names == {"contexts", "logprobs"}:
        logprobs = _typed(tensors, "logprobs", np.float32)
        topk_ids = topk_logprobs = None
    elif names == {"contexts", "topk_ids", "topk_logprobs"}:
        logprobs = None
        topk_ids = _typed(tensors, "topk_ids", np.int32)
        topk_logprobs = _typed(tensors, "topk_logprobs", np.float32)
    else:
        raise WireError(
            "bad_shape",
            f"outputs carry {sorted(names)}; expected contexts with logprobs, or contexts with topk_ids and topk_logprobs",
        )
    contexts = _typed(tensors, "contexts", np.uint8)

    batch = contexts.shape[0] if contexts.ndim == 2 else -1
    if contexts.shape != (batch, architecture.context_size) or not 0 < batch <= MAX_POSITIONS:
        raise WireError(
            "bad_shape",
            f"contexts of shape {contexts.shape}, expected (B, {architecture.context_size}) with 0 < B <= {MAX_POSITIONS}",
        )
    if logprobs is not None and logprobs.shape != (batch, VOCABULARY):
        raise WireError("bad_shape", f"logprobs of shape {logprobs.shape}, expected ({batch}, {VOCABULARY})")
    if topk_ids is not None and topk_logprobs is not None:
        k = topk_ids.shape[1] if topk_ids.ndim == 2 else -1
        if topk_ids.shape != (batch, k) or topk_logprobs.shape != (batch, k) or not 0 < k <= VOCABULARY:
            raise WireError(
                "bad_shape",
                f"topk_ids {topk_ids.shape} and topk_logprobs {topk_logprobs.shape}, expected ({batch}, k), 0 < k <= 256",
            )
    return OutputsBatch(message.envelope.version, contexts, logprobs, topk_ids, topk_logprobs)


def _typed(tensors: dict[str, npt.NDArray[Any]], name: str, dtype: type[np.generic]) -> npt.NDArray[Any]:
    array = tensors[name]
    if array.dtype != np.dtype(dtype):
        raise WireError("bad_dtype", f"outputs tensor {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    return array


def _coarse_l2(
    ids: npt.NDArray[np.int32], primary: npt.NDArray[np.float32], twin: npt.NDArray[np.float32]
) -> FloatArray:
    """L2 distance of the k + 1 bucket vectors: the k published tokens and the tail."""
    p = np.exp(primary.astype(np.float64))
    q = np.exp(np.take_along_axis(twin.astype(np.float64), ids.astype(np.int64), axis=1))
    tail = (1.0 - p.sum(axis=1)) - (1.0 - q.sum(axis=1))
    return np.asarray(np.sqrt(((p - q) ** 2).sum(axis=1) + tail**2), dtype=np.float64)
