"""The Adam optimizer over named float32 tensors, updating weights in place."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, MutableMapping

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)


class Adam:
    """Adam (Kingma and Ba, 2015, "Adam: A Method for Stochastic Optimization", Algorithm 1).

    For each tensor, with gradient g at step t:

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        w = w - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

    The moments m and v are float32 and kept per tensor name. With `clip_norm` set, every gradient is
    first scaled by clip_norm / norm when the global L2 norm over all tensors exceeds clip_norm.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        clip_norm: float | None = None,
    ) -> None:
        _check_range("lr", lr, "a finite number > 0", lambda value: value > 0)
        _check_range("beta1", beta1, "a number in [0, 1)", lambda value: 0 <= value < 1)
        _check_range("beta2", beta2, "a number in [0, 1)", lambda value: 0 <= value < 1)
        _check_range("eps", eps, "a finite number > 0", lambda value: value > 0)
        if clip_norm is not None:
            _check_range("clip_norm", clip_norm, "None or a finite number > 0", lambda value: value > 0)

        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.reset()

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr}, beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, clip_norm={self.clip_norm})"

    @property
    def step_count(self) -> int:
        """Number of steps taken since construction or the last `reset`."""
        return self._step_count

    def reset(self) -> None:
        """Forget the moments and the step count, as before the first step."""
        self._step_count = 0
        self._first_moments: dict[str, npt.NDArray[np.float32]] = {}
        self._second_moments: dict[str, npt.NDArray[np.float32]] = {}
        self._scratch = np.empty(0, dtype=np.float32)

    def step(
        self,
        weights: MutableMapping[str, npt.NDArray[np.float32]],
        grads: Mapping[str, npt.NDArray[np.float32]],
    ) -> float:
        """Update every tensor of `weights` in place and return the global gradient norm before clipping.

        Raises ValueError and leaves weights and state unchanged in three cases. The names, dtypes or
        shapes of `weights` and `grads` differ from each other or from earlier steps. A weight array is
        read-only. A gradient contains NaN or infinity.
        """
        self._validate(weights, grads)
        grad_norm = _global_norm(grads)
        if not math.isfinite(grad_norm):
            bad_names = [name for name, grad in grads.items() if not np.isfinite(grad).all()]
            raise ValueError(
                f"gradient norm is {grad_norm}: tensors {bad_names} contain NaN or infinite values; "
                f"lower the learning rate or check the loss for overflow"
            )

        scale = 1.0
        if self.clip_norm is not None and grad_norm > self.clip_norm:
            scale = self.clip_norm / grad_norm
            logger.debug("clipping gradient norm %.4g to %.4g", grad_norm, self.clip_norm)

        self._step_count += 1
        first_correction = 1.0 - self.beta1**self._step_count
        second_correction = 1.0 - self.beta2**self._step_count
        step_size = self.lr / first_correction
        for name, weight in weights.items():
            self._update_tensor(name, weight, grads[name], scale, step_size, second_correction)

        return grad_norm

    def _update_tensor(
        self,
        name: str,
        weight: npt.NDArray[np.float32],
        grad: npt.NDArray[np.float32],
        scale: float,
        step_size: float,
        second_correction: float,
    ) -> None:
        if name not in self._first_moments:
            self._first_moments[name] = np.zeros_like(weight)
            self._second_moments[name] = np.zeros_like(weight)
        first_moment = self._first_moments[name]
        second_moment = self._second_moments[name]
        scratch = self._scratch_like(weight)

        # Every intermediate goes through one reused scratch buffer, because a fresh temporary of a 200 MB
        # tensor would be page-faulted in on every step. Python float factors keep the arrays float32.
        np.multiply(grad, (1.0 - self.beta1) * scale, out=scratch)
        first_moment *= self.beta1
        first_moment += scratch

        np.multiply(grad, grad, out=scratch)
        scratch *= (1.0 - self.beta2) * scale * scale
        second_moment *= self.beta2
        second_moment += scratch

        np.sqrt(second_moment, out=scratch)
        scratch *= 1.0 / math.sqrt(second_correction)
        scratch += self.eps
        np.divide(first_moment, scratch, out=scratch)
        scratch *= step_size
        weight -= scratch

    def _scratch_like(self, weight: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self._scratch.size < weight.size:
            self._scratch = np.empty(weight.size, dtype=np.float32)
        return self._scratch[: weight.size].reshape(weight.shape)

    def _validate(
        self,
        weights: Mapping[str, npt.NDArray[np.float32]],
        grads: Mapping[str, npt.NDArray[np.float32]],
    ) -> None:
        weight_names = set(weights)
        grad_names = set(grads)
        if weight_names != grad_names:
            raise ValueError(
                f"weights and grads must name the same tensors: only in weights "
                f"{sorted(weight_names - grad_names)}, only in grads {sorted(grad_names - weight_names)}"
            )
        if self._first_moments and weight_names != set(self._first_moments):
            raise ValueError(
                f"weights name tensors {sorted(weight_names)} but earlier steps updated "
                f"{sorted(self._first_moments)}; call reset() before optimizing a different model"
            )

        for name, weight in weights.items():
            grad = grads[name]
            for kind, array in (("weight", weight), ("gradient", grad)):
                if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                    found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                    raise ValueError(f"{kind} {name!r} must be a float32 numpy array, got {found}")
            if not weight.flags.writeable:
                raise ValueError(
                    f"weight {name!r} is read-only; Adam updates weights in place, so pass a writable copy"
                )
            if grad.shape != weight.shape:
                raise ValueError(
                    f"gradient {name!r} has shape {grad.shape}, expected the weight's shape {weight.shape}"
                )
            if name in self._first_moments and self._first_moments[name].shape != weight.shape:
                raise ValueError(
                    f"weight {name!r} has shape {weight.shape} but earlier steps updated shape "
                    f"{self._first_moments[name].shape}; call reset() before optimizing a different model"
                )


def _check_range(name: str, value: object, accepted: str, in_range: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Adam {name} must be {accepted}, got {value!r}")
    if not math.isfinite(value) or not in_range(float(value)):
        raise ValueError(f"Adam {name} must be {accepted}, got {value!r}")


def _global_norm(grads: Mapping[str, npt.NDArray[np.float32]]) -> float:
    # einsum with dtype=float64 accumulates in float64 through a small buffer, so a 50 M element
    # gradient neither overflows float32 squares nor needs a float64 copy.
    total = 0.0
    for grad in grads.values():
        flat = grad.reshape(-1)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return math.sqrt(total)
