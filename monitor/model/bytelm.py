"""A byte-level MLP language model: the reference model the primary trains and the twins replicate.

The model predicts the next byte from the previous `context_size` bytes (Bengio et al., 2003, "A Neural
Probabilistic Language Model"). Each context byte is looked up in an embedding table, the embeddings are
concatenated, and one tanh hidden layer maps them to logits over the 256 byte values:

    x      = concat(E[c_1], ..., E[c_C])      shape (B, C*d)
    h      = tanh(x @ W1 + b1)                shape (B, h)
    logits = h @ W2 + b2                      shape (B, 256)

All tensors are float32. The weights live outside the model (see `monitor.model.base`), so one instance
can run any weight set that matches its specs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from monitor.model.base import TensorSpec, Weights

logger = logging.getLogger(__name__)

VOCAB_SIZE = 256
"""Number of byte values, the model's vocabulary."""

MAX_CONTEXT_SIZE = 1024
MAX_EMBEDDING_DIM = 4096
MAX_HIDDEN_DIM = 65536
MAX_PARAMETERS = 1_000_000_000
"""Upper bounds that catch typos such as an extra zero. They are not hardware limits, but one billion
float32 parameters already take 4 GB per weight set."""

_FORWARD_BLOCK_ROWS = 256
"""Rows of a weight matrix per partial product in `forward`. It fixes the summation order, so changing
it changes the logits in their last bits and breaks bitwise equality with processes that run the old value."""

_Float = TypeVar("_Float", np.float32, np.float64)


@dataclass(frozen=True)
class ByteMLPConfig:
    """Sizes of a `ByteMLP`.

    Attributes:
        context_size: number of previous bytes the model reads, C.
        embedding_dim: length of each byte's embedding vector, d.
        hidden_dim: number of tanh units, h.
    """

    context_size: int = 16
    embedding_dim: int = 32
    hidden_dim: int = 256

    def __post_init__(self) -> None:
        _check_int_field("context_size", self.context_size, MAX_CONTEXT_SIZE)
        _check_int_field("embedding_dim", self.embedding_dim, MAX_EMBEDDING_DIM)
        _check_int_field("hidden_dim", self.hidden_dim, MAX_HIDDEN_DIM)

        count = self.parameter_count()
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"ByteMLPConfig(context_size={self.context_size}, embedding_dim={self.embedding_dim}, "
                f"hidden_dim={self.hidden_dim}) has {count:,} parameters, more than the maximum "
                f"{MAX_PARAMETERS:,}; reduce context_size * embedding_dim * hidden_dim"
            )

    def parameter_count(self) -> int:
        """Return the number of float32 parameters over all tensors."""
        return sum(spec.size for spec in _tensor_specs(self).values())


def _check_int_field(name: str, value: object, maximum: int) -> None:
    # bool is a subclass of int, but True as a layer size is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ValueError(f"ByteMLPConfig.{name} must be an integer in [1, {maximum}], got {value!r}")


def _tensor_specs(config: ByteMLPConfig) -> dict[str, TensorSpec]:
    concat_dim = config.context_size * config.embedding_dim
    specs = [
        TensorSpec("embedding", (VOCAB_SIZE, config.embedding_dim)),
        TensorSpec("hidden.weight", (concat_dim, config.hidden_dim)),
        TensorSpec("hidden.bias", (config.hidden_dim,)),
        TensorSpec("output.weight", (config.hidden_dim, VOCAB_SIZE)),
        TensorSpec("output.bias", (VOCAB_SIZE,)),
    ]
    return {spec.name: spec for spec in specs}


class ByteMLP:
    """Next-byte MLP over the 256 byte values; implements `monitor.model.base.LanguageModel`."""

    def __init__(self, config: ByteMLPConfig | None = None) -> None:
        self.config = config if config is not None else ByteMLPConfig()
        self.vocab_size = VOCAB_SIZE
        self.context_size = self.config.context_size
        self._specs = _tensor_specs(self.config)

    def __repr__(self) -> str:
        return f"ByteMLP({self.config!r})"

    def specs(self) -> dict[str, TensorSpec]:
        """Return the spec of every tensor in the order embedding, hidden.*, output.*."""
        return dict(self._specs)

    def parameter_count(self) -> int:
        """Return the number of float32 parameters over all tensors."""
        return self.config.parameter_count()

    def init_weights(self, seed: int) -> Weights:
        """Draw fresh float32 weights from `numpy.random.default_rng(seed)`.

        The embedding is standard normal. Each weight matrix is uniform in +-1/sqrt(fan_in), so the hidden
        pre-activations start with a standard deviation near 1/sqrt(3) and tanh is not saturated. Biases
        start at zero. The same seed gives the same bytes on every run of the same numpy version.
        """
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

        rng = np.random.default_rng(seed)
        weights: Weights = {}
        for name, spec in self._specs.items():
            if name == "embedding":
                weights[name] = rng.standard_normal(spec.shape, dtype=np.float32)
            elif name.endswith(".weight"):
                weights[name] = _uniform_fan_in(rng, spec.shape)
            else:
                weights[name] = np.zeros(spec.shape, dtype=np.float32)

        logger.debug("initialised %s with seed %d: %d parameters", self, seed, self.parameter_count())
        return weights

    def validate_weights(self, weights: Mapping[str, npt.NDArray[Any]], dtype: npt.DTypeLike = np.float32) -> None:
        """Raise ValueError unless `weights` has exactly this model's tensors with their shapes and `dtype`.

        The message names the first tensor that is missing, unknown, not an array, or of the wrong
        dtype or shape, and gives the expected value.
        """
        expected_dtype = np.dtype(dtype)
        expected_names = ", ".join(self._specs)

        for name in self._specs:
            if name not in weights:
                raise ValueError(f"weights are missing tensor {name!r}; {self} expects {expected_names}")
        for name in weights:
            if name not in self._specs:
                raise ValueError(f"weights contain unknown tensor {name!r}; {self} expects {expected_names}")

        for name, spec in self._specs.items():
            tensor = weights[name]
            if not isinstance(tensor, np.ndarray):
                raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, expected a numpy array")
            if tensor.dtype != expected_dtype:
                raise ValueError(
                    f"tensor {name!r} has dtype {tensor.dtype}, expected {expected_dtype} in native byte order"
                )
            if tensor.shape != spec.shape:
                raise ValueError(f"tensor {name!r} has shape {tensor.shape}, expected {spec.shape}")

    def forward(
        self, weights: Mapping[str, npt.NDArray[np.float32]], contexts: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.float32]:
        """Return next-byte logits of shape (batch, 256) for uint8 contexts of shape (batch, context_size).

        The result depends only on the weight values and the contexts. The same inputs give bitwise
        equal logits in any process on the same CPU type with the same numpy build. Neither the memory
        layout of the inputs nor the BLAS thread count changes them. Twins rely on this to report zero
        divergence when their weights equal the primary's.
        """
        self.validate_weights(weights)
        self._validate_contexts(contexts)

        # OpenBLAS (0.3.31, bundled with numpy 2.4) sums in a different order with one thread than with
        # several, so a twin limited to one CPU would differ from its primary in the last bits. numpy's
        # einsum with optimize=False runs its own loops, whose results do not change with
        # OPENBLAS_NUM_THREADS, and its order depends on the shapes alone. It is slower: a batch of 64
        # through 51 M parameters took 0.28 s against 0.034 s with BLAS (2-core AMD EPYC, mean of 5 runs).
        x = self._embed(weights["embedding"], contexts)
        pre_activation = _matmul_fixed_order(x, np.ascontiguousarray(weights["hidden.weight"]))
        pre_activation += weights["hidden.bias"]
        hidden = np.tanh(pre_activation)
        logits = _matmul_fixed_order(hidden, np.ascontiguousarray(weights["output.weight"]))
        logits += weights["output.bias"]
        return logits

    def loss_and_grads(
        self,
        weights: Mapping[str, npt.NDArray[np.float32]],
        contexts: npt.NDArray[np.uint8],
        targets: npt.NDArray[np.uint8],
    ) -> tuple[float, Weights]:
        """Compute the mean cross-entropy in nats per byte and its gradient for every tensor.

        The pass uses BLAS for speed, so its logits may differ from `forward`'s in the last bits, and its
        results are reproducible only for the same BLAS thread count.
        """
        self.validate_weights(weights)
        self._validate_batch(contexts, targets)
        return self._loss_and_grads(weights, contexts, targets)

    def loss_and_grads_float64(
        self,
        weights: Mapping[str, npt.NDArray[np.float64]],
        contexts: npt.NDArray[np.uint8],
        targets: npt.NDArray[np.uint8],
    ) -> tuple[float, dict[str, npt.NDArray[np.float64]]]:
        """Run the same loss and backward pass as `loss_and_grads` on float64 weights.

        Gradient checks use it: central finite differences in float32 are too noisy to check a gradient.
        """
        self.validate_weights(weights, dtype=np.float64)
        self._validate_batch(contexts, targets)
        return self._loss_and_grads(weights, contexts, targets)

    def _loss_and_grads(
        self,
        weights: Mapping[str, npt.NDArray[_Float]],
        contexts: npt.NDArray[np.uint8],
        targets: npt.NDArray[np.uint8],
    ) -> tuple[float, dict[str, npt.NDArray[_Float]]]:
        embedding = weights["embedding"]
        hidden_weight = weights["hidden.weight"]
        output_weight = weights["output.weight"]
        batch_size = contexts.shape[0]
        rows = np.arange(batch_size)

        # Forward pass, keeping the activations the backward pass needs.
        x = self._embed(embedding, contexts)
        hidden = np.tanh(x @ hidden_weight + weights["hidden.bias"])
        logits = hidden @ output_weight + weights["output.bias"]

        # Cross-entropy from log-softmax. Subtracting the row maximum keeps exp() from overflowing.
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp_shifted = np.exp(shifted)
        sum_exp = exp_shifted.sum(axis=1, keepdims=True)
        target_losses = np.log(sum_exp[:, 0]) - shifted[rows, targets]
        loss = float(np.mean(target_losses, dtype=np.float64))

        # d(loss)/d(logits) = (softmax - one_hot(target)) / B, for the mean over the batch.
        grad_logits = exp_shifted / sum_exp
        grad_logits[rows, targets] -= 1
        grad_logits /= batch_size

        # Output layer, then back through tanh: d tanh(u)/du = 1 - tanh(u)^2.
        grad_output_weight = hidden.T @ grad_logits
        grad_output_bias = grad_logits.sum(axis=0)
        grad_pre_activation = (grad_logits @ output_weight.T) * (1 - hidden * hidden)

        # Hidden layer, then scatter the input gradient onto the embedding rows of the context bytes.
        # np.add.at accumulates repeated bytes, where plain fancy-index assignment would keep only one.
        grad_hidden_weight = x.T @ grad_pre_activation
        grad_hidden_bias = grad_pre_activation.sum(axis=0)
        grad_x = grad_pre_activation @ hidden_weight.T
        grad_embedding = np.zeros_like(embedding)
        np.add.at(grad_embedding, contexts.reshape(-1), grad_x.reshape(-1, embedding.shape[1]))

        grads = {
            "embedding": grad_embedding,
            "hidden.weight": grad_hidden_weight,
            "hidden.bias": grad_hidden_bias,
            "output.weight": grad_output_weight,
            "output.bias": grad_output_bias,
        }
        return loss, grads

    def _embed(self, embedding: npt.NDArray[_Float], contexts: npt.NDArray[np.uint8]) -> npt.NDArray[_Float]:
        # Fancy indexing returns a new C-contiguous (B, C, d) array, so the reshape never copies.
        return embedding[contexts].reshape(contexts.shape[0], -1)

    def _validate_contexts(self, contexts: npt.NDArray[np.uint8]) -> None:
        expected = f"a uint8 array of shape (batch, {self.context_size}) with batch >= 1"
        if not isinstance(contexts, np.ndarray):
            raise ValueError(f"contexts must be {expected}, got {type(contexts).__name__}")
        if contexts.dtype != np.uint8 or contexts.ndim != 2:
            raise ValueError(f"contexts must be {expected}, got {contexts.dtype} array of shape {contexts.shape}")
        if contexts.shape[0] < 1 or contexts.shape[1] != self.context_size:
            raise ValueError(f"contexts must be {expected}, got shape {contexts.shape}")

    def _validate_batch(self, contexts: npt.NDArray[np.uint8], targets: npt.NDArray[np.uint8]) -> None:
        self._validate_contexts(contexts)

        batch_size = contexts.shape[0]
        expected = f"a uint8 array of shape ({batch_size},), one next byte per context"
        if not isinstance(targets, np.ndarray):
            raise ValueError(f"targets must be {expected}, got {type(targets).__name__}")
        if targets.dtype != np.uint8 or targets.shape != (batch_size,):
            raise ValueError(f"targets must be {expected}, got {targets.dtype} array of shape {targets.shape}")


def _uniform_fan_in(rng: np.random.Generator, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    # Drawing float32 directly and scaling in place keeps a 50 M parameter matrix at 200 MB, where
    # rng.uniform would first build a 400 MB float64 array.
    bound = np.float32(1.0 / math.sqrt(shape[0]))
    values = rng.random(shape, dtype=np.float32)
    values *= 2 * bound
    values -= bound
    return values


def _matmul_fixed_order(left: npt.NDArray[np.float32], right: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Multiply (B, K) by C-contiguous (K, N) with a summation order fixed by the shapes alone.

    Summing blocks of `_FORWARD_BLOCK_ROWS` rows of `right` keeps each block in cache, which makes the
    51 M parameter forward pass faster: 0.28 s against 0.42 s for one einsum over all of K, measured
    like the note in `ByteMLP.forward`.
    """
    inner = left.shape[1]
    result: npt.NDArray[np.float32] = np.einsum(
        "bk,kn->bn", left[:, :_FORWARD_BLOCK_ROWS], right[:_FORWARD_BLOCK_ROWS], optimize=False
    )
    for start in range(_FORWARD_BLOCK_ROWS, inner, _FORWARD_BLOCK_ROWS):
        stop = start + _FORWARD_BLOCK_ROWS
        result += np.einsum("bk,kn->bn", left[:, start:stop], right[start:stop], optimize=False)
    return result
