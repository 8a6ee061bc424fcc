"""The Adam optimizer: the update formula, gradient clipping and input validation."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from monitor.model import Adam

Arrays32 = dict[str, npt.NDArray[np.float32]]


def global_norm(grads: Arrays32) -> float:
    return math.sqrt(sum(float(np.sum(grad.astype(np.float64) ** 2)) for grad in grads.values()))


def make_tensors(seed: int, scale: float = 1.0) -> Arrays32:
    rng = np.random.default_rng(seed)
    return {
        "a": (rng.standard_normal((4, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(5) * scale).astype(np.float32),
    }


def reference_adam(
    weights: Arrays32, grad_steps: list[Arrays32], lr: float, beta1: float, beta2: float, eps: float
) -> dict[str, npt.NDArray[np.float64]]:
    """Apply Kingma and Ba's Algorithm 1 in float64, step by step."""
    result = {name: weight.astype(np.float64) for name, weight in weights.items()}
    first = {name: np.zeros_like(weight) for name, weight in result.items()}
    second = {name: np.zeros_like(weight) for name, weight in result.items()}
    for step, grads in enumerate(grad_steps, start=1):
        for name, grad32 in grads.items():
            grad = grad32.astype(np.float64)
            first[name] = beta1 * first[name] + (1 - beta1) * grad
            second[name] = beta2 * second[name] + (1 - beta2) * grad**2
            first_hat = first[name] / (1 - beta1**step)
            second_hat = second[name] / (1 - beta2**step)
            result[name] -= lr * first_hat / (np.sqrt(second_hat) + eps)
    return result


def test_adam_matches_reference_formula() -> None:
    weights = make_tensors(0)
    grad_steps = [make_tensors(seed) for seed in (1, 2, 3, 4)]
    expected = reference_adam(weights, grad_steps, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer = Adam(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6)

    for grads in grad_steps:
        optimizer.step(weights, grads)

    assert optimizer.step_count == 4
    for name, weight in weights.items():
        assert weight.dtype == np.float32
        np.testing.assert_allclose(weight, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_adam_first_step_moves_by_learning_rate() -> None:
    weights = make_tensors(0)
    before = {name: weight.copy() for name, weight in weights.items()}
    grads = make_tensors(1)

    Adam(lr=0.05).step(weights, grads)

    # At step 1 the bias-corrected update is lr * g / |g|, the sign of the gradient scaled by lr.
    for name, weight in weights.items():
        expected = 0.05 * np.sign(grads[name])
        np.testing.assert_allclose(before[name] - weight, expected, rtol=1e-4, err_msg=name)


def test_adam_step_returns_norm_before_clipping() -> None:
    weights = make_tensors(0)
    grads = make_tensors(1, scale=10.0)
    expected = global_norm(grads)

    norm = Adam(clip_norm=1.0).step(weights, grads)

    assert norm == pytest.approx(expected, rel=1e-6)


def test_adam_clip_norm_scales_gradients() -> None:
    grad_steps = [make_tensors(1, scale=10.0), make_tensors(2, scale=0.01)]
    first_norm = global_norm(grad_steps[0])
    clipped_by_hand = [
        {name: (grad * (1.0 / first_norm)).astype(np.float32) for name, grad in grad_steps[0].items()},
        grad_steps[1],
    ]
    clipped = make_tensors(0)
    by_hand = make_tensors(0)
    unclipped = make_tensors(0)
    clipping_optimizer = Adam(clip_norm=1.0)
    plain_optimizer = Adam()
    unclipped_optimizer = Adam()

    for step in range(2):
        clipping_optimizer.step(clipped, grad_steps[step])
        plain_optimizer.step(by_hand, clipped_by_hand[step])
        unclipped_optimizer.step(unclipped, grad_steps[step])

    for name in clipped:
        np.testing.assert_allclose(clipped[name], by_hand[name], rtol=1e-5, err_msg=name)
        # The second, small gradient would barely move the weights after an unclipped first one.
        assert not np.allclose(clipped[name], unclipped[name], rtol=1e-4), name


def test_adam_does_not_modify_gradients() -> None:
    weights = make_tensors(0)
    grads = make_tensors(1, scale=10.0)
    grads_before = {name: grad.copy() for name, grad in grads.items()}

    Adam(clip_norm=1.0).step(weights, grads)

    for name, grad in grads.items():
        assert np.array_equal(grad, grads_before[name]), name


@pytest.mark.parametrize(
    ("argument", "value", "accepted"),
    [
        ("lr", 0.0, "a finite number > 0"),
        ("lr", math.inf, "a finite number > 0"),
        ("beta1", 1.0, r"a number in \[0, 1\)"),
        ("beta2", -0.1, r"a number in \[0, 1\)"),
        ("eps", 0.0, "a finite number > 0"),
        ("clip_norm", -1.0, "None or a finite number > 0"),
        ("clip_norm", math.nan, "None or a finite number > 0"),
        ("lr", "0.1", "a finite number > 0"),
    ],
)
def test_adam_invalid_hyperparameter_raises(argument: str, value: object, accepted: str) -> None:
    with pytest.raises(ValueError, match=rf"Adam {argument} must be {accepted}, got {value!r}"):
        Adam(**{argument: value})  # type: ignore[arg-type]


def test_adam_mismatched_names_raise() -> None:
    weights = make_tensors(0)
    grads = make_tensors(1)
    grads["c"] = grads.pop("b")

    with pytest.raises(ValueError, match=r"only in weights \['b'\], only in grads \['c'\]"):
        Adam().step(weights, grads)


def test_adam_mismatched_shape_raises() -> None:
    weights = make_tensors(0)
    grads = make_tensors(1)
    grads["a"] = np.zeros((3, 4), np.float32)

    message = r"gradient 'a' has shape \(3, 4\), expected the weight's shape \(4, 3\)"

    with pytest.raises(ValueError, match=message):
        Adam().step(weights, grads)


def test_adam_float64_weight_raises() -> None:
    weights: dict[str, npt.NDArray[np.float32]] = make_tensors(0)
    weights["b"] = weights["b"].astype(np.float64)

    with pytest.raises(ValueError, match=r"weight 'b' must be a float32 numpy array, got float64"):
        Adam().step(weights, make_tensors(1))


def test_adam_read_only_weight_raises() -> None:
    weights = make_tensors(0)
    weights["a"].flags.writeable = False

    with pytest.raises(ValueError, match=r"weight 'a' is read-only"):
        Adam().step(weights, make_tensors(1))


def test_adam_non_finite_gradient_leaves_state_unchanged() -> None:
    weights = make_tensors(0)
    before = {name: weight.copy() for name, weight in weights.items()}
    grads = make_tensors(1)
    grads["b"][2] = np.nan
    optimizer = Adam()
    message = r"gradient norm is nan: tensors \['b'\] contain NaN or infinite values"

    with pytest.raises(ValueError, match=message):
        optimizer.step(weights, grads)

    assert optimizer.step_count == 0
    for name, weight in weights.items():
        assert np.array_equal(weight, before[name]), name


def test_adam_other_model_raises() -> None:
    optimizer = Adam()
    optimizer.step(make_tensors(0), make_tensors(1))

    with pytest.raises(ValueError, match=r"earlier steps updated \['a', 'b'\]; call reset\(\)"):
        optimizer.step({"c": np.zeros(2, np.float32)}, {"c": np.ones(2, np.float32)})


def test_adam_reset_accepts_other_model() -> None:
    optimizer = Adam()
    optimizer.step(make_tensors(0), make_tensors(1))
    weights = {"c": np.zeros(2, np.float32)}

    optimizer.reset()
    optimizer.step(weights, {"c": np.ones(2, np.float32)})

    assert optimizer.step_count == 1
    assert weights["c"] == pytest.approx([-3e-3, -3e-3], rel=1e-4)
