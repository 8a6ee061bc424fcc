"""Twin checkpoints: written atomically, read back through the wire validation, ignored when damaged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from monitor.twin.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from monitor.twin.reference import ReferenceTracker, WeightSet
from monitor.wire.codec import encode
from monitor.wire.envelope import Kind
from tests.wire_helpers import (
    MAX_BYTES,
    MODEL_ID,
    TINY_ARCHITECTURE,
    publish_delta,
    publish_snapshot,
    tiny_state,
)

LOGGER = "monitor.twin.checkpoint"


def _followed(deltas: int = 3) -> tuple[ReferenceTracker, WeightSet]:
    """Return a tracker that applied a snapshot and `deltas` deltas, and the weight set it holds."""
    state = tiny_state()
    tracker = ReferenceTracker(max_parameters=10_000)
    tracker.apply(publish_snapshot(state))
    for step in range(deltas):
        tracker.apply(publish_delta(state, seed=step))
    assert tracker.current is not None
    return tracker, tracker.current


def _save(path: Path, tracker: ReferenceTracker, held: WeightSet) -> None:
    save_checkpoint(path, MODEL_ID, held, TINY_ARCHITECTURE, tracker.last_seq)


def test_checkpoint_round_trip_keeps_weights_bitwise(tmp_path: Path) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is not None
    assert sorted(message.tensors) == sorted(held.weights)
    for name, array in held.weights.items():
        assert message.tensors[name].tobytes() == array.tobytes(), name


def test_checkpoint_round_trip_keeps_envelope(tmp_path: Path) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is not None
    envelope = message.envelope
    assert envelope.kind is Kind.SNAPSHOT
    assert envelope.model_id == MODEL_ID
    assert envelope.session_id == held.session_id
    assert envelope.version == held.version == 3
    assert envelope.seq == tracker.last_seq == 4
    assert envelope.created_ns == held.created_ns
    assert envelope.state_digest == held.digest
    assert envelope.architecture == TINY_ARCHITECTURE


def test_checkpoint_restores_tracker(tmp_path: Path) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    message = load_checkpoint(path, MAX_BYTES)
    assert message is not None
    resumed = ReferenceTracker(max_parameters=10_000)

    restored = resumed.restore(message)

    assert restored.digest == held.digest
    assert restored.version == held.version
    assert resumed.session_id == tracker.session_id
    assert resumed.last_seq == tracker.last_seq


def test_checkpoint_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"

    _save(path, tracker, held)

    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["twin.ckpt"]


def test_checkpoint_save_replaces_older(tmp_path: Path) -> None:
    tracker, held = _followed(deltas=1)
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    newer_tracker, newer = _followed(deltas=2)

    _save(path, newer_tracker, newer)

    message = load_checkpoint(path, MAX_BYTES)
    assert message is not None
    assert message.envelope.version == 2
    assert message.envelope.state_digest == newer.digest


def test_checkpoint_save_over_leftover_temporary_file(tmp_path: Path) -> None:
    # A crash between writing the temporary file and the rename leaves it behind; the next save overwrites it.
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    (tmp_path / "twin.ckpt.tmp").write_bytes(b"half a checkpoint")

    _save(path, tracker, held)

    message = load_checkpoint(path, MAX_BYTES)
    assert message is not None
    assert message.envelope.state_digest == held.digest
    assert not (tmp_path / "twin.ckpt.tmp").exists()


def test_checkpoint_load_ignores_leftover_temporary_file(tmp_path: Path) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    (tmp_path / "twin.ckpt.tmp").write_bytes(b"half a checkpoint")

    message = load_checkpoint(path, MAX_BYTES)

    assert message is not None
    assert message.envelope.state_digest == held.digest


def test_checkpoint_load_missing_file_returns_none(tmp_path: Path) -> None:
    message = load_checkpoint(tmp_path / "absent.ckpt", MAX_BYTES)

    assert message is None


def test_checkpoint_load_ignores_truncated_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    path.write_bytes(path.read_bytes()[:-100])
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is None
    assert f"ignoring unreadable checkpoint path={path} error=" in caplog.text


def test_checkpoint_load_ignores_corrupted_byte(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0x40
    path.write_bytes(bytes(damaged))
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is None
    assert "tensor bytes do not match checksum" in caplog.text


def test_checkpoint_load_ignores_file_above_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker, held = _followed()
    path = tmp_path / "twin.ckpt"
    _save(path, tracker, held)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, max_bytes=1024)

    assert message is None
    assert "exceeds the limit of 1024 bytes" in caplog.text


def test_checkpoint_load_ignores_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "twin.ckpt"
    path.mkdir()
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is None
    assert f"ignoring unreadable checkpoint path={path}" in caplog.text


def test_checkpoint_load_ignores_delta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tiny_state()
    publish_snapshot(state)
    _, payloads = state.advance({name: array + 1 for name, array in state.weights.items()}, MAX_BYTES, snapshot=False)
    path = tmp_path / "twin.ckpt"
    path.write_bytes(payloads[0])
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is None
    assert f"ignoring checkpoint path={path}: not a snapshot with an architecture" in caplog.text


def test_checkpoint_load_ignores_snapshot_without_architecture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = publish_snapshot(tiny_state())
    bare = snapshot.envelope.model_copy(update={"architecture": None})
    path = tmp_path / "twin.ckpt"
    path.write_bytes(encode(bare, snapshot.tensors))
    caplog.set_level(logging.WARNING, logger=LOGGER)

    message = load_checkpoint(path, MAX_BYTES)

    assert message is None
    assert "not a snapshot with an architecture" in caplog.text


def test_check_rejects_other_models_file(tmp_path: Path) -> None:
    path = tmp_path / "twin.ckpt"
    _save(path, *_followed())

    check_checkpoint(path, MODEL_ID)
    with pytest.raises(ValueError, match=f"contains model '{MODEL_ID}', not --model-id 'othermodel'"):
        check_checkpoint(path, "othermodel")


def test_check_rejects_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint directory .* not found; create it"):
        check_checkpoint(tmp_path / "absent" / "twin.ckpt", MODEL_ID)
    assert not (tmp_path / "absent").exists()


def test_check_passes_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "twin.ckpt"
    path.write_bytes(b"\xff" * 64)

    check_checkpoint(path, MODEL_ID)
    assert load_checkpoint(path, MAX_BYTES) is None


def test_check_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        check_checkpoint(tmp_path, MODEL_ID)
