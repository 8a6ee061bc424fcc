"""The reference primary: trains the byte model online on text and publishes weights and outputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque

import aiomqtt
import numpy as np
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitor.analytics.divergence import log_softmax
from monitor.analytics.weights import relative_distance
from monitor.config import PrimarySettings
from monitor.data.corpus import TextCorpus, default_corpus_paths
from monitor.metrics import PUBLISHED_KINDS, LazyGauge, families
from monitor.model.bytelm import ByteMLP, ByteMLPConfig
from monitor.model.optim import Adam
from monitor.primary.updates import PublishedState
from monitor.topics import MODEL_ID_PATTERN, Topics
from monitor.transport.mqtt import MqttLink
from monitor.wire.envelope import Architecture, Kind

logger = logging.getLogger(__name__)

LOSS_WINDOW_STEPS = 50
OUTPUTS_HEADER_BYTES = 1024  # safetensors header and envelope of an outputs message, an upper estimate
RESYNC_MIN_INTERVAL_SECONDS = 0.5  # many twins asking at once get one snapshot


class ControlRequest(BaseModel):
    """A twin's request on the control topic, JSON."""

    model_config = ConfigDict(extra="forbid")

    request: str = Field(pattern=r"^resync$")
    twin_id: str = Field(pattern=MODEL_ID_PATTERN)
    reason: str = Field(max_length=32)
    version: int | None = None


class Primary:
    """Train on text, publish weights and outputs, serve resync requests, and stop with an offline status."""

    def __init__(self, settings: PrimarySettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.topics = Topics(settings.model_id)
        self.model = ByteMLP(
            ByteMLPConfig(
                context_size=settings.context, embedding_dim=settings.embedding_dim, hidden_dim=settings.hidden_dim
            )
        )
        architecture = Architecture(
            context_size=settings.context, embedding_dim=settings.embedding_dim, hidden_dim=settings.hidden_dim
        )
        self.weights = self.model.init_weights(settings.seed)
        self.optimizer = Adam(lr=settings.learning_rate)
        self.corpus = TextCorpus(
            settings.corpus or default_corpus_paths(), context_size=settings.context, seed=settings.seed
        )
        self._check_outputs_fit(settings)
        self.state = PublishedState(settings.model_id, architecture, self.model.specs(), self.weights)
        self.steps = 0
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW_STEPS)

        self._publish_lock = asyncio.Lock()
        self._resync_requested = asyncio.Event()
        self._snapshot_on_connect = False
        # Set once --max-steps is reached and the update for that step was handed to the link. Only a snapshot
        # sent after a later reconnection or resync still moves the published version.
        self.training_done = asyncio.Event()

        metric = families(registry)
        model_id = settings.model_id
        self._loss = metric.training_loss.labels(model_id)
        self._version = metric.model_version.labels(model_id)
        self._steps = metric.training_steps.labels(model_id)
        self._unpublished = LazyGauge(metric.unpublished_distance, model_id)
        self._resync_requests = metric.resync_requests.labels(model_id)
        self._connected = metric.broker_connected.labels(model_id, "")
        self._bytes = {kind: metric.published_bytes.labels(model_id, kind) for kind in PUBLISHED_KINDS}
        self._messages = {kind: metric.published_messages.labels(model_id, kind) for kind in PUBLISHED_KINDS}
        # Control requests are the only messages the primary receives, so bad_control is its only reason.
        self._rejected = {"bad_control": metric.messages_rejected.labels(model_id, "", "bad_control")}
        self._connected.set(0)

        self.link = MqttLink(
            settings.broker_address,
            client_id=f"llm-twin-primary-{model_id}",
            subscriptions=[(self.topics.control, 1)],
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_state=lambda up: self._connected.set(1 if up else 0),
            will=aiomqtt.Will(self.topics.status, self.state.status_message(online=False), qos=1, retain=True),
            username=settings.mqtt_username,
            password=settings.password,
        )

    @staticmethod
    def _check_outputs_fit(settings: PrimarySettings) -> None:
        # Weights are chunked to fit any limit; an outputs batch is not, so refuse a limit it cannot meet.
        needed = settings.batch_size * (settings.context + 256 * 4) + OUTPUTS_HEADER_BYTES
        if needed > settings.max_message_bytes:
            raise ValueError(
                f"outputs of --batch-size {settings.batch_size} need about {needed} bytes per message, above "
                f"--max-message-bytes {settings.max_message_bytes}; lower --batch-size or raise --max-message-bytes "
                "(and the broker's max_packet_size)"
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then publish the offline status and disconnect."""
        logger.info(
            "primary starting model_id=%s session=%s parameters=%d broker=%s",
            self.settings.model_id,
            self.state.session_id,
            sum(s.size for s in self.model.specs().values()),
            self.link.address,
        )
        link_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.link.run(link_stop), name="primary-mqtt")
            tasks.create_task(self._serve_resyncs(stop), name="primary-resync")
            try:
                await self._train(stop)
            finally:
                await self.link.disconnect_cleanly(
                    [(self.topics.status, self.state.status_message(online=False), 1, True)]
                )
                link_stop.set()
                stop.set()
        logger.info(
            "primary stopped model_id=%s steps=%d version=%d", self.settings.model_id, self.steps, self.state.version
        )

    async def _train(self, stop: asyncio.Event) -> None:
        settings = self.settings
        period = 1.0 / settings.steps_per_second if settings.steps_per_second > 0 else 0.0
        next_step = time.monotonic()
        updates = 0
        batches = 0
        while not stop.is_set():
            contexts, targets = self.corpus.next_batch(settings.batch_size)
            batches += 1
            # Past --max-steps the weights hold still, but the primary keeps serving: a model that stopped learning.
            if not settings.max_steps or self.steps < settings.max_steps:
                loss = await asyncio.to_thread(self._step, contexts, targets)
                self.steps += 1
                self.losses.append(loss)
                self._steps.inc()
                self._loss.set(float(np.mean(self.losses)))

                if self.steps % settings.publish_every == 0 or self.steps == settings.max_steps:
                    updates += 1
                    await self._publish_update(snapshot=updates % settings.snapshot_every == 0)
                    if self.steps == settings.max_steps:
                        self.training_done.set()
                        logger.info(
                            "training stopped at --max-steps %d; serving version %d", self.steps, self.state.version
                        )
            if batches % settings.outputs_every == 0:
                await self._publish_outputs(contexts)

            next_step += period
            delay = next_step - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            else:
                next_step = time.monotonic()
                await asyncio.sleep(0)  # let the MQTT link run between unthrottled steps

    def _step(self, contexts: np.ndarray, targets: np.ndarray) -> float:
        loss, grads = self.model.loss_and_grads(self.weights, contexts, targets)
        self.optimizer.step(self.weights, grads)
        return loss

    async def _publish_update(self, *, snapshot: bool) -> None:
        if not self.link.connected.is_set():
            # Twins cannot receive it; when the link is back a snapshot brings them to the current weights.
            self._snapshot_on_connect = True
            return
        async with self._publish_lock:
            kind, messages = await asyncio.to_thread(
                self.state.advance,
                self.weights,
                self.settings.max_message_bytes,
                snapshot=snapshot,
                codec=self.settings.codec,
            )
            # A lossy codec leaves part of the update for later: visible here, never silent.
            self._unpublished.set(await asyncio.to_thread(relative_distance, self.weights, self.state.weights))
            self._version.set(self.state.version)
            await self._publish_weights(kind, messages)

    async def _publish_weights(self, kind: Kind, messages: list[bytes]) -> None:
        label = "chunk" if len(messages) > 1 else kind.value
        for payload in messages:
            if await self.link.publish(self.topics.weights, payload, qos=1):
                self._count(label, payload)
            else:
                self._snapshot_on_connect = True
                logger.warning(
                    "weights publish failed model_id=%s version=%d kind=%s",
                    self.settings.model_id,
                    self.state.version,
                    kind,
                )
                return
        logger.debug("published %s version=%d messages=%d", kind, self.state.version, len(messages))

    async def _publish_outputs(self, contexts: np.ndarray) -> None:
        logits = await asyncio.to_thread(self.model.forward, self.state.weights, contexts)
        payload = self.state.outputs_message(contexts, log_softmax(logits), top_k=self.settings.outputs_topk)
        if len(payload) > self.settings.max_message_bytes:
            raise ValueError(
                f"outputs message of {len(payload)} bytes exceeds --max-message-bytes {self.settings.max_message_bytes}; "
                "lower --batch-size or raise the limit (and the broker's max_packet_size)"
            )
        if await self.link.publish(self.topics.outputs, payload, qos=0):
            self._count("outputs", payload)

    async def _on_connect(self) -> None:
        birth = self.state.status_message(online=True)
        if await self.link.publish(self.topics.status, birth, qos=1, retain=True):
            self._count("status", birth)
        if self._snapshot_on_connect or self.link.connections == 1:
            self._snapshot_on_connect = False
            self._resync_requested.set()

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.topics.control:
            # The primary subscribes to its control topic alone, so a message on another topic was misdelivered.
            logger.debug("ignored message on unsubscribed topic=%s bytes=%d", topic, len(payload))
            return
        try:
            request = ControlRequest.model_validate(json.loads(payload))
        except (ValueError, ValidationError) as exc:
            self._rejected["bad_control"].inc()
            logger.warning("rejected control message topic=%s bytes=%d error=%s", topic, len(payload), _describe(exc))
            return
        self._resync_requests.inc()
        logger.info(
            "resync requested model_id=%s twin_id=%s reason=%s twin_version=%s",
            self.settings.model_id,
            request.twin_id,
            request.reason,
            request.version,
        )
        self._resync_requested.set()

    async def _serve_resyncs(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._resync_requested.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            self._resync_requested.clear()
            async with self._publish_lock:
                messages = await asyncio.to_thread(self.state.snapshot, self.settings.max_message_bytes)
                self._version.set(self.state.version)
                await self._publish_weights(Kind.SNAPSHOT, messages)
            await asyncio.sleep(RESYNC_MIN_INTERVAL_SECONDS)

    def _count(self, kind: str, payload: bytes) -> None:
        self._messages[kind].inc()
        self._bytes[kind].inc(len(payload))


def _describe(exc: ValueError) -> str:
    """Return one line naming what is wrong with a control request: the first invalid field, or the JSON error."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "request"
        return f"field {where}: {error['msg']}"
    return str(exc).splitlines()[0]
