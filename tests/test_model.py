"""The byte-level MLP: sizes, initialisation, bitwise-reproducible forward pass, gradients, training."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from monitor.data import TextCorpus
from monitor.model import Adam, ByteMLP, ByteMLPConfig, Weights

REPO_ROOT = Path(__file__).resolve().parent.parent
LARGE_CONFIG = ByteMLPConfig(context_size=64, embedding_dim=256, hidden_dim=3072)
TINY_CONFIG = ByteMLPConfig(context_size=3, embedding_dim=4, hidden_dim=5)


def random_contexts(model: ByteMLP, batch_size: int, seed: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch_size, model.context_size), dtype=np.uint8)


def random_targets(batch_size: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=batch_size, dtype=np.uint8)


def reference_logits(weights: Weights, contexts: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Compute the logits in float64 with plain matmuls, the formula in the module docstring."""
    as64 = {name: tensor.astype(np.float64) for name, tensor in weights.items()}
    x = as64["embedding"][contexts].reshape(len(contexts), -1)
    hidden = np.tanh(x @ as64["hidden.weight"] + as64["hidden.bias"])
    logits: npt.NDArray[np.float64] = hidden @ as64["output.weight"] + as64["output.bias"]
    return logits


def test_config_default_parameter_count() -> None:
    config = ByteMLPConfig()

    count = config.parameter_count()

    # 256*32 + 16*32*256 + 256 + 256*256 + 256
    assert count == 205_312


def test_config_large_parameter_count() -> None:
    model = ByteMLP(LARGE_CONFIG)

    count = model.parameter_count()

    # 256*256 + 64*256*3072 + 3072 + 3072*256 + 256, counted without allocating the tensors.
    assert count == 51_186_944
    assert count >= 50_000_000
    assert sum(spec.size for spec in model.specs().values()) == count


@pytest.mark.parametrize(
    ("field", "value", "maximum"),
    [
        ("context_size", 0, 1024),
        ("context_size", 1025, 1024),
        ("embedding_dim", -1, 4096),
        ("embedding_dim", 2.5, 4096),
        ("hidden_dim", 65537, 65536),
        ("hidden_dim", True, 65536),
    ],
)
def test_config_invalid_field_raises(field: str, value: object, maximum: int) -> None:
    expected = rf"ByteMLPConfig\.{field} must be an integer in \[1, {maximum}\], got {value!r}"

    with pytest.raises(ValueError, match=expected):
        ByteMLPConfig(**{field: value})  # type: ignore[arg-type]


def test_config_too_many_parameters_raises() -> None:
    message = r"has 4,296,279,296 parameters, more than the maximum 1,000,000,000"

    with pytest.raises(ValueError, match=message):
        ByteMLPConfig(context_size=1024, embedding_dim=4096, hidden_dim=1024)


def test_specs_names_and_shapes_in_order() -> None:
    model = ByteMLP()

    specs = model.specs()

    assert [(name, spec.shape, spec.dtype) for name, spec in specs.items()] == [
        ("embedding", (256, 32), "float32"),
        ("hidden.weight", (512, 256), "float32"),
        ("hidden.bias", (256,), "float32"),
        ("output.weight", (256, 256), "float32"),
        ("output.bias", (256,), "float32"),
    ]


def test_init_weights_same_seed_same_bytes() -> None:
    model = ByteMLP()

    first = model.init_weights(7)
    second = model.init_weights(7)

    for name in model.specs():
        assert first[name].tobytes() == second[name].tobytes(), name


def test_init_weights_different_seed_differs() -> None:
    model = ByteMLP()

    first = model.init_weights(7)
    second = model.init_weights(8)

    assert not np.array_equal(first["embedding"], second["embedding"])
    assert not np.array_equal(first["hidden.weight"], second["hidden.weight"])


def test_init_weights_scaled_by_fan_in() -> None:
    model = ByteMLP()

    weights = model.init_weights(0)

    for name, spec in model.specs().items():
        assert weights[name].dtype == np.float32, name
        assert weights[name].shape == spec.shape, name
    hidden_bound = 1 / math.sqrt(512)
    output_bound = 1 / math.sqrt(256)
    assert np.abs(weights["hidden.weight"]).max() <= hidden_bound
    assert np.abs(weights["hidden.weight"]).max() > 0.9 * hidden_bound
    assert np.abs(weights["output.weight"]).max() <= output_bound
    assert abs(float(weights["embedding"].std()) - 1.0) < 0.05
    assert not weights["hidden.bias"].any()
    assert not weights["output.bias"].any()


def test_init_weights_negative_seed_raises() -> None:
    model = ByteMLP()

    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        model.init_weights(-1)


def test_forward_shape_and_values_match_reference() -> None:
    model = ByteMLP()
    weights = model.init_weights(1)
    contexts = random_contexts(model, 64, seed=2)

    logits = model.forward(weights, contexts)

    assert logits.dtype == np.float32
    assert logits.shape == (64, 256)
    np.testing.assert_allclose(logits, reference_logits(weights, contexts), rtol=1e-5, atol=1e-5)


def test_forward_repeated_calls_bitwise_equal() -> None:
    model = ByteMLP()
    weights = model.init_weights(1)
    contexts = random_contexts(model, 64, seed=2)

    first = model.forward(weights, contexts)
    second = model.forward({name: tensor.copy() for name, tensor in weights.items()}, contexts.copy())

    assert first.tobytes() == second.tobytes()


def test_forward_memory_layout_bitwise_equal() -> None:
    model = ByteMLP()
    weights = model.init_weights(1)
    contexts = random_contexts(model, 64, seed=2)
    # Fortran order, and read-only arrays at an odd 4-byte offset inside a buffer, as a decoder may produce.
    fortran = {name: np.asfortranarray(tensor) for name, tensor in weights.items()}
    unaligned = {}
    for name, tensor in weights.items():
        buffer = bytes(4) + tensor.tobytes()
        unaligned[name] = np.frombuffer(buffer, dtype=np.float32, offset=4).reshape(tensor.shape)

    expected = model.forward(weights, contexts)
    from_fortran = model.forward(fortran, contexts)
    from_unaligned = model.forward(unaligned, np.asfortranarray(contexts))

    assert from_fortran.tobytes() == expected.tobytes()
    assert from_unaligned.tobytes() == expected.tobytes()


@pytest.mark.parametrize("blas_threads", ["1", "2"])
def test_forward_other_process_bitwise_equal(tmp_path: Path, blas_threads: str) -> None:
    """A fresh interpreter with a different BLAS thread count computes the same logits, bit for bit."""
    model = ByteMLP()
    weights = model.init_weights(3)
    contexts = random_contexts(model, 64, seed=4)
    output = tmp_path / "logits.bin"
    script = (
        "import sys, numpy as np\n"
        "from monitor.model import ByteMLP\n"
        "model = ByteMLP()\n"
        "contexts = np.random.default_rng(4).integers(0, 256, size=(64, 16), dtype=np.uint8)\n"
        "logits = model.forward(model.init_weights(3), contexts)\n"
        "open(sys.argv[1], 'wb').write(logits.tobytes())\n"
    )
    environment = dict(os.environ, OPENBLAS_NUM_THREADS=blas_threads, OMP_NUM_THREADS=blas_threads)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))

    subprocess.run([sys.executable, "-c", script, str(output)], env=environment, check=True, timeout=60)
    expected = model.forward(weights, contexts)

    assert output.read_bytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        (
            "hidden.weight",
            np.zeros((512, 128), np.float32),
            r"'hidden\.weight' has shape \(512, 128\), expected \(512, 256\)",
        ),
        (
            "output.bias",
            np.zeros((1, 256), np.float32),
            r"'output\.bias' has shape \(1, 256\), expected \(256,\)",
        ),
        ("embedding", np.zeros((256, 32), np.float64), r"'embedding' has dtype float64, expected float32"),
        ("embedding", np.zeros((256, 32), ">f4"), r"'embedding' has dtype >f4, expected float32"),
        ("hidden.bias", [0.0] * 256, r"'hidden\.bias' is a list, expected a numpy array"),
    ],
)
def test_forward_bad_weight_raises(name: str, tensor: object, message: str) -> None:
    model = ByteMLP()
    weights: dict[str, object] = dict(model.init_weights(0))
    weights[name] = tensor

    with pytest.raises(ValueError, match=message):
        model.forward(weights, random_contexts(model, 4, seed=0))  # type: ignore[arg-type]


def test_forward_missing_tensor_raises() -> None:
    model = ByteMLP()
    weights = model.init_weights(0)
    del weights["output.weight"]

    message = r"missing tensor 'output\.weight'; .* expects embedding, hidden\.weight"

    with pytest.raises(ValueError, match=message):
        model.forward(weights, random_contexts(model, 4, seed=0))


def test_forward_unknown_tensor_raises() -> None:
    model = ByteMLP()
    weights = model.init_weights(0)
    weights["extra.weight"] = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match=r"unknown tensor 'extra\.weight'"):
        model.forward(weights, random_contexts(model, 4, seed=0))


@pytest.mark.parametrize(
    ("contexts", "found"),
    [
        (np.zeros((4, 16), np.int64), r"got int64 array of shape \(4, 16\)"),
        (np.zeros((4, 15), np.uint8), r"got shape \(4, 15\)"),
        (np.zeros(16, np.uint8), r"got uint8 array of shape \(16,\)"),
        (np.zeros((0, 16), np.uint8), r"got shape \(0, 16\)"),
        ([[0] * 16], r"got list"),
    ],
)
def test_forward_bad_contexts_raise(contexts: object, found: str) -> None:
    model = ByteMLP()
    weights = model.init_weights(0)

    with pytest.raises(ValueError, match=r"contexts must be a uint8 array of shape \(batch, 16\).*" + found):
        model.forward(weights, contexts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("targets", "found"),
    [
        (np.zeros(3, np.uint8), r"got uint8 array of shape \(3,\)"),
        (np.zeros(4, np.int32), r"got int32 array of shape \(4,\)"),
    ],
)
def test_loss_and_grads_bad_targets_raise(targets: npt.NDArray[np.uint8], found: str) -> None:
    model = ByteMLP()
    weights = model.init_weights(0)

    with pytest.raises(ValueError, match=r"targets must be a uint8 array of shape \(4,\).*" + found):
        model.loss_and_grads(weights, random_contexts(model, 4, seed=0), targets)


def test_loss_at_init_near_uniform() -> None:
    model = ByteMLP()
    weights = model.init_weights(0)

    loss, _ = model.loss_and_grads(weights, random_contexts(model, 256, seed=1), random_targets(256, seed=2))

    # Small initial logits give a near-uniform distribution: ln(256) = 5.545 nats.
    assert abs(loss - math.log(256)) < 0.3


def test_loss_and_grads_match_finite_differences() -> None:
    model = ByteMLP(TINY_CONFIG)
    rng = np.random.default_rng(5)
    weights = {name: tensor.astype(np.float64) for name, tensor in model.init_weights(5).items()}
    # Non-zero biases, so their gradients and the tanh derivative are exercised away from zero.
    weights["hidden.bias"] = rng.normal(0, 0.5, weights["hidden.bias"].shape)
    weights["output.bias"] = rng.normal(0, 0.5, weights["output.bias"].shape)
    # A repeated byte within and across contexts checks that embedding gradients accumulate.
    contexts = np.array([[1, 2, 3], [3, 3, 7], [200, 1, 2], [9, 8, 7], [255, 0, 3], [7, 7, 7]], np.uint8)
    targets = np.array([4, 5, 3, 0, 255, 7], np.uint8)
    step = 1e-6

    _, grads = model.loss_and_grads_float64(weights, contexts, targets)

    for name, tensor in weights.items():
        numeric = np.zeros_like(tensor)
        for index in np.ndindex(tensor.shape):
            original = tensor[index]
            tensor[index] = original + step
            loss_plus, _ = model.loss_and_grads_float64(weights, contexts, targets)
            tensor[index] = original - step
            loss_minus, _ = model.loss_and_grads_float64(weights, contexts, targets)
            tensor[index] = original
            numeric[index] = (loss_plus - loss_minus) / (2 * step)
        # The central difference has truncation error ~step^2 and rounding error ~1e-16 * loss / step,
        # about 1e-9 here. So atol 1e-8 is ten times the noise and far below the median gradients of
        # 7e-4 to 7e-2 in this model.
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_loss_and_grads_float32_matches_float64() -> None:
    model = ByteMLP()
    weights = model.init_weights(6)
    contexts = random_contexts(model, 32, seed=7)
    targets = random_targets(32, seed=8)

    loss32, grads32 = model.loss_and_grads(weights, contexts, targets)
    weights64 = {name: tensor.astype(np.float64) for name, tensor in weights.items()}
    loss64, grads64 = model.loss_and_grads_float64(weights64, contexts, targets)

    assert abs(loss32 - loss64) < 1e-5
    for name, grad in grads32.items():
        assert grad.dtype == np.float32, name
        scale = float(np.abs(grads64[name]).max())
        np.testing.assert_allclose(grad, grads64[name], rtol=1e-3, atol=1e-5 * scale, err_msg=name)


def test_loss_and_grads_float64_rejects_float32() -> None:
    model = ByteMLP()

    with pytest.raises(ValueError, match=r"'embedding' has dtype float32, expected float64"):
        model.loss_and_grads_float64(
            model.init_weights(0),  # type: ignore[arg-type]
            random_contexts(model, 2, seed=0),
            random_targets(2, seed=0),
        )


def test_training_on_default_corpus_lowers_loss() -> None:
    """300 Adam steps of batch 32 on the standard library source, the default corpus."""
    model = ByteMLP()
    weights = model.init_weights(0)
    optimizer = Adam()
    corpus = TextCorpus(None, context_size=model.context_size, seed=0)
    losses = []

    for _ in range(300):
        contexts, targets = corpus.next_batch(32)
        loss, grads = model.loss_and_grads(weights, contexts, targets)
        optimizer.step(weights, grads)
        losses.append(loss)

    first = float(np.mean(losses[:50]))
    last = float(np.mean(losses[-50:]))
    # Seeds 0-4 on the CPython 3.11.7 standard library gave first means of 3.1-3.5 nats and last means
    # of 2.2-2.5 nats.
    assert last < first - 0.5
    assert last < math.log(256) - 2.0


def test_forward_large_config_runs() -> None:
    """A 51 M parameter model initialises and runs a batch of 64 (200 MB of weights, about 1 s)."""
    model = ByteMLP(LARGE_CONFIG)
    weights = model.init_weights(0)
    contexts = random_contexts(model, 64, seed=1)

    logits = model.forward(weights, contexts)

    assert logits.shape == (64, 256)
    assert np.isfinite(logits).all()
