"""A twin: follow the primary over MQTT, run the same inputs, and export how far apart the two are."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections import deque
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitor.analytics.divergence import log_softmax
from monitor.analytics.weights import group_distances, layer_group, relative_distance
from monitor.config import TwinSettings
from monitor.grafana.client import Annotator
from monitor.metrics import RESYNC_REASONS, UPDATE_KINDS, LazyGauge, families
from monitor.model.base import Weights
from monitor.model.registry import build_model
from monitor.topics import Topics
from monitor.transport.mqtt import MqttLink
from monitor.twin.batches import parse_outputs
from monitor.twin.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from monitor.twin.outputs import OutputMonitor
from monitor.twin.policies import make_policy
from monitor.twin.reference import ReferenceTracker, ResyncNeeded, WeightSet
from monitor.twin.replica import Replica
from monitor.wire.chunking import Reassembler, decode_chunk_data
from monitor.wire.codec import Message, decode
from monitor.wire.envelope import Kind
from monitor.wire.errors import REJECT_REASONS, WireError

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.25
RESYNC_RETRY_SECONDS = 2.0  # a lost resync request or reply is asked for again after this long


class Twin:
    """One twin process: reference tracking, replica sync, output comparison and metrics."""

    def __init__(self, settings: TwinSettings, registry: CollectorRegistry) -> None:
        if settings.checkpoint is not None:
            check_checkpoint(settings.checkpoint, settings.model_id)
        self.settings = settings
        self.topics = Topics(settings.model_id)
        self.tracker = ReferenceTracker(max_parameters=settings.max_parameters, twin_id=settings.twin_id)
        self.replica = Replica(settings.replica_dtype)
        self.policy = make_policy(settings.sync_policy, interval=settings.sync_interval, alpha=settings.ema_alpha)
        self.reassembler = Reassembler(max_total_bytes=settings.max_parameters * 4 + (1 << 20))
        self.announced_version = 0
        self.primary_session: str | None = None
        self._resync_pending_since: float | None = None
        self._distance_dirty = False
        self._dropped_seen = 0
        self._saved_version = -1
        self.weight_distance = float("nan")
        """Latest ||W_primary - W_twin|| / ||W_primary||, also exported as a gauge."""
        self.applied: deque[tuple[int, str]] = deque(maxlen=10_000)
        """(version, state digest) of every update applied, newest last."""

        metric = families(registry)
        labels = (settings.model_id, settings.twin_id)
        self.annotator = (
            Annotator(settings.grafana_url, settings.grafana_token.get_secret_value())
            if settings.grafana_url and settings.grafana_token
            else None
        )
        if settings.grafana_url and self.annotator is None:
            logger.warning(
                "grafana annotations off twin_id=%s: --grafana-url is set but LLM_TWIN_GRAFANA_TOKEN is not",
                settings.twin_id,
            )
        self.outputs = OutputMonitor(
            metric,
            *labels,
            window=settings.window,
            detector=settings.detector,
            detector_params=settings.detector_params,
            budget=settings.divergence_budget,
            budget_warmup=settings.budget_warmup,
            on_drift=self._annotate_drift,
        )
        metric.twin_info.labels(*labels, settings.effective_role, settings.sync_policy, settings.replica_dtype).set(1)
        self._group_gauges = (
            metric.weight_group_relative_distance,
            metric.weight_group_cosine,
            metric.weight_group_max_abs,
        )
        self._rejected = {reason: metric.messages_rejected.labels(*labels, reason) for reason in REJECT_REASONS}
        self._resyncs = {reason: metric.resyncs.labels(*labels, reason) for reason in RESYNC_REASONS}
        self._applied = {kind: metric.updates_applied.labels(*labels, kind) for kind in UPDATE_KINDS}
        for counter in (*self._rejected.values(), *self._resyncs.values(), *self._applied.values()):
            counter.inc(0)
        self._latency = metric.sync_latency.labels(*labels)
        self._lag = LazyGauge(metric.version_lag, *labels)
        self._applied_version = LazyGauge(metric.applied_version, *labels)
        self._staleness = LazyGauge(metric.staleness, *labels)
        self._distance = LazyGauge(metric.weight_relative_distance, *labels)
        self._online = metric.primary_online.labels(*labels)
        self._connected = metric.broker_connected.labels(*labels)
        self._chunks_expired = metric.chunks_expired.labels(*labels)
        self._dropped = metric.incoming_dropped.labels(*labels)
        self._connected.set(0)
        self._online.set(0)

        self.link = MqttLink(
            settings.broker_address,
            client_id=f"llm-twin-twin-{settings.model_id}-{settings.twin_id}",
            subscriptions=[(self.topics.status, 1), (self.topics.weights, 1), (self.topics.outputs, 0)],
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_state=lambda up: self._connected.set(1 if up else 0),
            username=settings.mqtt_username,
            password=settings.password,
        )

    @property
    def reference(self) -> WeightSet | None:
        return self.tracker.current

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        logger.info(
            "twin starting model_id=%s twin_id=%s policy=%s replica_dtype=%s broker=%s",
            self.settings.model_id,
            self.settings.twin_id,
            self.policy.name,
            self.replica.dtype,
            self.link.address,
        )
        if self.settings.checkpoint is not None:
            await asyncio.to_thread(self._resume, self.settings.checkpoint)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.link.run(stop), name=f"twin-{self.settings.twin_id}-mqtt")
            tasks.create_task(self._tick(stop), name=f"twin-{self.settings.twin_id}-tick")
        await self._save_checkpoint()
        if self.annotator is not None:
            await asyncio.to_thread(self.annotator.close)
        logger.info(
            "twin stopped twin_id=%s replica_version=%s primary_weights_version=%s",
            self.settings.twin_id,
            self.replica.version if self.replica.loaded else "none",
            self.reference.version if self.reference is not None else "none",
        )

    def _resume(self, path: Path) -> None:
        message = load_checkpoint(path, self.reassembler.max_total_bytes)
        if message is None:
            return
        try:
            restored = self.tracker.restore(message)
        except (WireError, ResyncNeeded) as exc:
            logger.warning("ignoring checkpoint twin_id=%s path=%s error=%s", self.settings.twin_id, path, exc)
            return
        self.primary_session = restored.session_id
        self.announced_version = restored.version
        self._saved_version = restored.version
        self.policy.on_update(self.replica, restored, time.monotonic())
        self._replica_changed()
        logger.info(
            "resumed from checkpoint twin_id=%s path=%s version=%d", self.settings.twin_id, path, restored.version
        )

    async def _save_checkpoint(self) -> None:
        reference, architecture, path = self.reference, self.tracker.architecture, self.settings.checkpoint
        if path is None or reference is None or architecture is None or reference.version == self._saved_version:
            return
        try:
            await asyncio.to_thread(
                save_checkpoint, path, self.settings.model_id, reference, architecture, self.tracker.last_seq
            )
            self._saved_version = reference.version
        except OSError as exc:
            logger.error("checkpoint write failed twin_id=%s path=%s error=%s", self.settings.twin_id, path, exc)

    # Incoming messages, one at a time in arrival order.

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self.topics.weights:
                await self._on_weights(payload)
            elif topic == self.topics.outputs:
                await self._on_outputs(payload)
            elif topic == self.topics.status:
                self._on_status(payload)
        except WireError as exc:
            self._rejected[exc.reason].inc()
            logger.warning(
                "rejected message twin_id=%s topic=%s bytes=%d reason=%s error=%s",
                self.settings.twin_id,
                topic,
                len(payload),
                exc.reason,
                exc,
            )
        except ResyncNeeded as exc:
            # A delta before the first snapshot is the normal start of a twin; anything else is worth a warning.
            level = logging.INFO if exc.reason == "startup" else logging.WARNING
            logger.log(
                level, "cannot apply update twin_id=%s reason=%s error=%s", self.settings.twin_id, exc.reason, exc
            )
            await self._request_resync(exc.reason)
        except Exception:
            # One bad message must not stop the twin: the held weights are untouched, the message is counted.
            self._rejected["processing_error"].inc()
            logger.exception(
                "failed to process message twin_id=%s topic=%s bytes=%d", self.settings.twin_id, topic, len(payload)
            )

    def _decode(self, payload: bytes, kinds: tuple[Kind, ...], max_bytes: int | None = None) -> Message:
        message = decode(payload, max_bytes=max_bytes or self.settings.max_message_bytes)
        envelope = message.envelope
        if envelope.model_id != self.settings.model_id:
            raise WireError(
                "unknown_model",
                f"message for model {envelope.model_id!r}, this twin follows {self.settings.model_id!r}",
            )
        if envelope.kind not in kinds:
            raise WireError("bad_envelope", f"kind {envelope.kind} is not accepted on this topic")
        return message

    def _on_status(self, payload: bytes) -> None:
        envelope = self._decode(payload, (Kind.STATUS,)).envelope
        online = envelope.status == "online"
        self._online.set(1 if online else 0)
        logger.info(
            # A retained status keeps the version of the moment it was published, often the session's start.
            "primary status twin_id=%s session=%s status=%s version_when_published=%d",
            self.settings.twin_id,
            envelope.session_id,
            envelope.status,
            envelope.version,
        )
        if not online:
            return
        self.announced_version = (
            max(self.announced_version, envelope.version)
            if envelope.session_id == self.primary_session
            else envelope.version
        )
        if (
            self.primary_session is not None
            and envelope.session_id != self.primary_session
            and self.reference is not None
        ):
            # A restarted primary starts a new history; deltas of the old one no longer apply.
            self._resync_soon("new_session")
        self.primary_session = envelope.session_id
        if self.tracker.architecture is None and envelope.architecture is not None:
            self.tracker.architecture = envelope.architecture

    async def _on_weights(self, payload: bytes) -> None:
        message = self._decode(payload, (Kind.SNAPSHOT, Kind.DELTA, Kind.CHUNK))
        if message.envelope.kind is Kind.CHUNK:
            whole = self.reassembler.add(message.envelope, decode_chunk_data(message.tensors))
            if whole is None:
                return
            message = self._decode(whole, (Kind.SNAPSHOT, Kind.DELTA), max_bytes=self.reassembler.max_total_bytes)

        envelope = message.envelope
        if envelope.session_id == self.primary_session or self.primary_session is None:
            self.announced_version = max(self.announced_version, envelope.version)
        updated = await asyncio.to_thread(self.tracker.apply, message)

        self._resync_pending_since = None
        self.applied.append((updated.version, updated.digest))
        self._applied[envelope.kind.value].inc()
        self._latency.observe(max(0.0, (time.time_ns() - envelope.created_ns) / 1e9))
        if self.policy.on_update(self.replica, updated, time.monotonic()):
            self._replica_changed()
        self._distance_dirty = True
        logger.debug("applied %s twin_id=%s version=%d", envelope.kind, self.settings.twin_id, envelope.version)

    async def _on_outputs(self, payload: bytes) -> None:
        message = self._decode(payload, (Kind.OUTPUTS,))
        envelope = message.envelope
        architecture = self.tracker.architecture
        if architecture is None:
            return  # no birth message or snapshot yet: nothing to check the shapes against
        batch = parse_outputs(message, architecture)
        if envelope.session_id == self.primary_session:
            self.announced_version = max(self.announced_version, envelope.version)

        weights = self.replica.weights
        if weights is None:
            return
        model = build_model(architecture)
        produced_by = (self.replica.session_id, self.replica.version)
        contexts = batch.contexts
        twin_logprobs = await asyncio.to_thread(lambda: log_softmax(model.forward(weights, contexts)))
        signals = batch.compare(twin_logprobs)
        cause = "same_version" if produced_by == (envelope.session_id, envelope.version) else "version_lag"
        self.outputs.record(signals, cause)

    # Resync requests.

    async def _on_connect(self) -> None:
        if self.reference is None:
            self._resync_soon("startup")

    def _resync_soon(self, reason: str) -> None:
        asyncio.get_running_loop().create_task(self._request_resync(reason))

    async def _request_resync(self, reason: str) -> None:
        now = time.monotonic()
        if self._resync_pending_since is not None and now - self._resync_pending_since < RESYNC_RETRY_SECONDS:
            return
        self._resync_pending_since = now
        self._resyncs[reason].inc()
        version = self.reference.version if self.reference else None
        request = json.dumps(
            {"request": "resync", "twin_id": self.settings.twin_id, "reason": reason, "version": version}
        )
        sent = await self.link.publish(self.topics.control, request.encode(), qos=1)
        self._annotate(f"{self.settings.twin_id}: resync requested ({reason})", ["resync", reason])
        logger.info(
            "resync requested twin_id=%s reason=%s held_version=%s sent=%s",
            self.settings.twin_id,
            reason,
            version,
            sent,
        )

    # Time-driven work.

    async def _tick(self, stop: asyncio.Event) -> None:
        last_distance = 0.0
        last_checkpoint = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=TICK_SECONDS)
            now = time.monotonic()
            reference = self.reference
            if reference is not None and self.policy.on_tick(self.replica, reference, now):
                self._replica_changed()
                self._distance_dirty = True

            expired = self.reassembler.expire()
            if expired:
                self._chunks_expired.inc(expired)
                await self._request_resync("chunk_expired")

            dropped = self.link.dropped_incoming - self._dropped_seen
            if dropped:
                self._dropped_seen += dropped
                self._dropped.inc(dropped)
                await self._request_resync("queue_overflow")

            if self._resync_pending_since is not None and now - self._resync_pending_since >= RESYNC_RETRY_SECONDS:
                self._resync_pending_since = None
                await self._request_resync("gap" if reference is not None else "startup")

            self._update_gauges()
            if now - last_checkpoint >= self.settings.checkpoint_every:
                last_checkpoint = now
                await self._save_checkpoint()
            if (
                self._distance_dirty
                and now - last_distance >= 1.0
                and reference is not None
                and self.replica.weights is not None
            ):
                self._distance_dirty = False
                last_distance = now
                await asyncio.to_thread(self._measure_weights, reference, self.replica.weights)

    def _annotate_drift(self, signal: str, value: float) -> None:
        self._annotate(f"{self.settings.twin_id}: change point on {signal} (value {value:.4g})", ["drift", signal])

    def _annotate(self, text: str, tags: list[str]) -> None:
        # The annotator queues and posts from its own thread, and never raises when Grafana is down.
        if self.annotator is not None:
            self.annotator.annotate(
                text, ["llm-twin", self.settings.model_id, self.settings.twin_id, *tags], time.time_ns()
            )

    def _measure_weights(self, reference: WeightSet, replica: Weights) -> None:
        """Export the global and per-group distances between the primary's weights and the replica's."""
        self.weight_distance = relative_distance(reference.weights, replica)
        self._distance.set(self.weight_distance)

        group_of = functools.partial(layer_group, depth=self.settings.weight_group_depth)
        groups = group_distances(reference.weights, replica, group_of, max_groups=self.settings.max_weight_groups)
        labels = (self.settings.model_id, self.settings.twin_id)
        relative, cosine, max_abs = self._group_gauges
        for group, distance in groups.items():
            for family, value in (
                (relative, distance.relative_l2),
                (cosine, distance.cosine),
                (max_abs, distance.max_abs),
            ):
                if math.isfinite(value):  # a NaN sample would disable every alert on the series
                    family.labels(*labels, group).set(value)

    def _replica_changed(self) -> None:
        self._applied_version.set(self.replica.version)
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.replica.loaded:
            if self.replica.session_id == self.primary_session:
                self._lag.set(max(0, self.announced_version - self.replica.version))
            else:
                # A replica from an earlier primary session has no version of the current one, not even 0.
                self._lag.set(self.announced_version + 1)
            self._staleness.set(max(0.0, (time.time_ns() - self.replica.created_ns) / 1e9))
