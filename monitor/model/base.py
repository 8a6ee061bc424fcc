"""The model interface shared by the primary and the twins.

A model is a stateless description: it names its tensors and computes with weights that are passed in.
Keeping the weights outside the model lets one twin hold several weight sets (the primary's latest,
its own replica, a candidate being assembled) and run any of them through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Weights = dict[str, npt.NDArray[np.float32]]
"""Named float32 tensors, keyed by the names in `LanguageModel.specs()`."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class LanguageModel(Protocol):
    """A next-token model over a fixed vocabulary, trained on fixed-length contexts."""

    vocab_size: int
    context_size: int

    def specs(self) -> dict[str, TensorSpec]:
        """Return the spec of every tensor, in a stable order."""
        ...

    def init_weights(self, seed: int) -> Weights:
        """Return freshly initialised weights; the same seed gives the same bytes."""
        ...

    def forward(
        self, weights: Mapping[str, npt.NDArray[np.float32]], contexts: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.float32]:
        """Return next-token logits of shape (batch, vocab_size) for contexts of shape (batch, context_size)."""
        ...

    def loss_and_grads(
        self,
        weights: Mapping[str, npt.NDArray[np.float32]],
        contexts: npt.NDArray[np.uint8],
        targets: npt.NDArray[np.uint8],
    ) -> tuple[float, Weights]:
        """Return the mean cross-entropy in nats per token and its gradient for every tensor."""
        ...
