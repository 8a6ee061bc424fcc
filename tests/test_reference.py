"""ReferenceTracker: applying snapshots and deltas, and telling redeliveries, reorders, gaps and new sessions apart."""

from __future__ import annotations

import pytest

from monitor.primary.updates import PublishedState
from monitor.twin.reference import ReferenceTracker, ResyncNeeded, WeightSet
from monitor.wire.codec import Message, decode, encode
from monitor.wire.envelope import Envelope, Kind
from monitor.wire.errors import WireError
from tests.wire_helpers import MAX_BYTES, publish_delta, publish_snapshot, reseal, tiny_state

MAX_PARAMETERS = 10_000


def _tracker() -> ReferenceTracker:
    return ReferenceTracker(max_parameters=MAX_PARAMETERS)


def _assert_holds(weights: WeightSet, state: PublishedState) -> None:
    """Assert that `weights` is bitwise the state's published version."""
    assert weights.session_id == state.session_id
    assert weights.version == state.version
    assert weights.digest == state.digest
    for name, array in state.weights.items():
        assert weights.weights[name].tobytes() == array.tobytes(), name


def _snapshots_bytes(weights: WeightSet) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in weights.weights.items()}


# In order.


def test_tracker_applies_snapshot_then_deltas() -> None:
    state = tiny_state()
    tracker = _tracker()

    tracker.apply(publish_snapshot(state))
    for step in range(5):
        tracker.apply(publish_delta(state, seed=step))

    assert tracker.current is not None
    _assert_holds(tracker.current, state)
    assert tracker.last_seq == 6
    assert tracker.gaps == 0


def test_tracker_snapshot_sets_session_and_architecture() -> None:
    state = tiny_state()
    tracker = _tracker()

    applied = tracker.apply(publish_snapshot(state))

    _assert_holds(applied, state)
    assert tracker.session_id == state.session_id
    assert tracker.architecture == state.architecture


def test_tracker_accepts_resync_snapshot_at_held_version() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    tracker.apply(publish_delta(state, seed=0))

    applied = tracker.apply(publish_snapshot(state))

    _assert_holds(applied, state)
    assert tracker.last_seq == 3


def test_tracker_weight_arrays_are_read_only() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))

    applied = tracker.apply(publish_delta(state, seed=0))

    for name, array in applied.weights.items():
        assert array.flags.writeable is False, name
    with pytest.raises(ValueError, match="read-only"):
        applied.weights["hidden.bias"][0] = 1.0


def test_tracker_delta_leaves_previous_set_unchanged() -> None:
    state = tiny_state()
    tracker = _tracker()
    previous = tracker.apply(publish_snapshot(state))
    before = _snapshots_bytes(previous)

    tracker.apply(publish_delta(state, seed=0))

    assert _snapshots_bytes(previous) == before
    assert previous.version == 0


# Redeliveries and reorders.


def test_tracker_rejects_duplicate_seq() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    delta = publish_delta(state, seed=0)
    held = tracker.apply(delta)

    with pytest.raises(WireError, match="weights seq 2 already seen; a QoS 1 redelivery") as caught:
        tracker.apply(delta)

    assert caught.value.reason == "duplicate"
    assert tracker.current is held


def test_tracker_rejects_late_message_as_out_of_order() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    late = publish_snapshot(state)  # seq 2, overtaken by the delta below
    tracker.apply(publish_delta(state, seed=0))

    with pytest.raises(WireError, match="weights seq 2 arrived after seq 3") as caught:
        tracker.apply(late)

    assert caught.value.reason == "out_of_order"
    assert tracker.current is not None
    assert tracker.current.version == 1


def test_tracker_gap_with_applicable_base_continues() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    publish_snapshot(state)  # seq 2 is lost, but it changed no weights

    applied = tracker.apply(publish_delta(state, seed=0))

    _assert_holds(applied, state)
    assert tracker.gaps == 1
    assert tracker.last_seq == 3


def test_tracker_lost_delta_raises_gap() -> None:
    state = tiny_state()
    tracker = _tracker()
    held = tracker.apply(publish_snapshot(state))
    publish_delta(state, seed=0)  # seq 2, version 1: lost

    with pytest.raises(ResyncNeeded, match="delta 1->2 does not start at held version 0") as caught:
        tracker.apply(publish_delta(state, seed=1))

    assert caught.value.reason == "gap"
    assert tracker.gaps == 1
    assert tracker.current is held


def test_tracker_base_mismatch_raises_resync() -> None:
    state = tiny_state()
    tracker = _tracker()
    held = tracker.apply(publish_snapshot(state))
    publish_delta(state, seed=0)
    # The next seq, but built on a version the twin never received.
    skipping = reseal(publish_delta(state, seed=1), seq=2)

    with pytest.raises(ResyncNeeded, match="delta 1->2 does not start at held version 0") as caught:
        tracker.apply(skipping)

    assert caught.value.reason == "base_mismatch"
    assert tracker.current is held


def test_tracker_resyncs_on_snapshot_after_gap() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    publish_delta(state, seed=0)
    with pytest.raises(ResyncNeeded):
        tracker.apply(publish_delta(state, seed=1))

    tracker.apply(publish_snapshot(state))
    applied = tracker.apply(publish_delta(state, seed=2))

    _assert_holds(applied, state)


def test_tracker_delta_before_snapshot_raises_startup() -> None:
    state = tiny_state()
    publish_snapshot(state)
    tracker = _tracker()

    with pytest.raises(ResyncNeeded, match="delta version 1 arrived before any snapshot") as caught:
        tracker.apply(publish_delta(state, seed=0))

    assert caught.value.reason == "startup"
    assert tracker.current is None


def test_tracker_rejects_older_snapshot_as_stale() -> None:
    state = tiny_state()
    tracker = _tracker()
    old = publish_snapshot(state)
    tracker.apply(old)
    tracker.apply(publish_delta(state, seed=0))
    stale = reseal(old, seq=10)

    with pytest.raises(WireError, match="snapshot version 0 is older than held version 1") as caught:
        tracker.apply(stale)

    assert caught.value.reason == "stale_version"


def test_tracker_rejects_delta_not_newer_than_held() -> None:
    state = tiny_state()
    tracker = _tracker()
    tracker.apply(publish_snapshot(state))
    delta = publish_delta(state, seed=0)
    tracker.apply(delta)
    replayed = reseal(delta, seq=3)

    with pytest.raises(WireError, match="delta version 1 is not newer than held version 1") as caught:
        tracker.apply(replayed)

    assert caught.value.reason == "stale_version"


# Sessions.


def test_tracker_accepts_new_session_snapshot() -> None:
    old, new = tiny_state(seed=0), tiny_state(seed=1)
    tracker = _tracker()
    tracker.apply(publish_snapshot(old))
    for step in range(3):
        tracker.apply(publish_delta(old, seed=step))

    applied = tracker.apply(publish_snapshot(new))

    _assert_holds(applied, new)
    assert tracker.session_id == new.session_id
    assert tracker.last_seq == 1


def test_tracker_new_session_delta_raises_resync() -> None:
    old, new = tiny_state(seed=0), tiny_state(seed=1)
    tracker = _tracker()
    held = tracker.apply(publish_snapshot(old))
    publish_snapshot(new)

    with pytest.raises(
        ResyncNeeded, match=f"delta from session {new.session_id}, holding session {old.session_id}"
    ) as caught:
        tracker.apply(publish_delta(new, seed=0))

    assert caught.value.reason == "new_session"
    assert tracker.current is held
    assert tracker.session_id == old.session_id


def test_tracker_new_session_seq_is_not_duplicate() -> None:
    old, new = tiny_state(seed=0), tiny_state(seed=1)
    tracker = _tracker()
    tracker.apply(publish_snapshot(old))
    tracker.apply(publish_delta(old, seed=0))
    tracker.apply(publish_snapshot(new))

    applied = tracker.apply(publish_delta(new, seed=0))

    _assert_holds(applied, new)


# Integrity.


def test_tracker_delta_digest_mismatch_raises_checksum() -> None:
    state = tiny_state()
    tracker = _tracker()
    held = tracker.apply(publish_snapshot(state))
    before = _snapshots_bytes(held)
    corrupt = reseal(publish_delta(state, seed=0), state_digest="0" * 32)

    with pytest.raises(
        ResyncNeeded, match=r"weights after version 1 do not match the primary's state digest 0{32}"
    ) as caught:
        tracker.apply(corrupt)

    assert caught.value.reason == "checksum"
    assert tracker.current is held
    assert _snapshots_bytes(held) == before


def test_tracker_snapshot_digest_mismatch_raises_checksum() -> None:
    state = tiny_state()
    tracker = _tracker()
    corrupt = reseal(publish_snapshot(state), state_digest="f" * 32)

    with pytest.raises(ResyncNeeded) as caught:
        tracker.apply(corrupt)

    assert caught.value.reason == "checksum"
    assert tracker.current is None


def test_tracker_rejects_snapshot_of_wrong_shape() -> None:
    state = tiny_state()
    snapshot = publish_snapshot(state)
    tensors = {name: array[:1] if name == "hidden.bias" else array for name, array in snapshot.tensors.items()}
    wrong = decode(encode(snapshot.envelope, tensors), max_bytes=MAX_BYTES)
    tracker = _tracker()

    with pytest.raises(WireError, match=r"tensor 'hidden.bias' has shape \(1,\), the model expects \(4,\)") as caught:
        tracker.apply(wrong)

    assert caught.value.reason == "bad_shape"


def test_tracker_rejects_model_above_max_parameters() -> None:
    state = tiny_state()
    tracker = ReferenceTracker(max_parameters=1000)

    with pytest.raises(WireError, match="model of 1812 parameters exceeds --max-parameters 1000") as caught:
        tracker.apply(publish_snapshot(state))

    assert caught.value.reason == "unknown_model"


def test_tracker_rejects_snapshot_without_architecture() -> None:
    state = tiny_state()
    snapshot = publish_snapshot(state)
    bare = Message(snapshot.envelope.model_copy(update={"architecture": None}), snapshot.tensors, snapshot.nbytes)
    tracker = _tracker()

    with pytest.raises(WireError, match="snapshot without architecture, and no birth message seen yet") as caught:
        tracker.apply(bare)

    assert caught.value.reason == "bad_envelope"


def test_tracker_rejects_other_kind() -> None:
    state = tiny_state()
    envelope = Envelope(
        model_id="testlm", session_id=state.session_id, kind=Kind.OUTPUTS, version=0, seq=1, created_ns=1
    )
    message = Message(envelope, {}, 0)
    tracker = _tracker()

    with pytest.raises(WireError, match="kind outputs does not belong on the weights topic") as caught:
        tracker.apply(message)

    assert caught.value.reason == "bad_envelope"


# restore.


def test_tracker_restore_holds_checkpointed_version() -> None:
    state = tiny_state()
    publish_snapshot(state)
    publish_delta(state, seed=0)
    checkpoint = publish_snapshot(state)  # version 1, seq 3
    tracker = _tracker()

    restored = tracker.restore(checkpoint)

    _assert_holds(restored, state)
    assert tracker.current is restored
    assert tracker.session_id == state.session_id
    assert tracker.last_seq == 3
    assert tracker.architecture == state.architecture


def test_tracker_restore_then_follows_session() -> None:
    state = tiny_state()
    checkpoint = publish_snapshot(state)
    tracker = _tracker()
    tracker.restore(checkpoint)

    applied = tracker.apply(publish_delta(state, seed=0))

    _assert_holds(applied, state)
    assert tracker.gaps == 0


def test_tracker_restore_replaces_held_session() -> None:
    old, new = tiny_state(seed=0), tiny_state(seed=1)
    tracker = _tracker()
    tracker.apply(publish_snapshot(old))
    tracker.apply(publish_delta(old, seed=0))
    checkpoint = publish_snapshot(new)

    restored = tracker.restore(checkpoint)

    _assert_holds(restored, new)
    assert tracker.session_id == new.session_id


def test_tracker_restore_rejects_corrupt_checkpoint() -> None:
    state = tiny_state()
    tracker = _tracker()
    corrupt = reseal(publish_snapshot(state), state_digest="0" * 32)

    with pytest.raises(ResyncNeeded) as caught:
        tracker.restore(corrupt)

    assert caught.value.reason == "checksum"
    assert tracker.current is None
