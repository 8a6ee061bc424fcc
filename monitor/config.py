"""Service settings: one pydantic-settings model per service.

Every field can come from a command-line option (`--metrics-port`) or from the environment
(`LLM_TWIN_METRICS_PORT`); the option wins. The models validate everything, so a service never starts on a
value it would fail on later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from monitor.topics import check_id
from monitor.transport.broker_url import BrokerAddress, parse_broker_url

SyncPolicyName = Literal["mirror", "periodic", "ema", "frozen"]
ReplicaDtype = Literal["float32", "float16", "int8"]
DeltaCodecName = Literal["float32", "float16", "int8", "topk"]
TwinRole = Literal["mirror", "quantized", "ema", "canary", "frozen"]
DetectorName = Literal["page_hinkley", "adwin"]


class ServiceSettings(BaseSettings):
    """Options of every service: its /metrics endpoint, run time and logs."""

    model_config = SettingsConfigDict(env_prefix="LLM_TWIN_", extra="forbid", validate_default=True)

    metrics_port: int = Field(9400, ge=0, le=65535, description="port of /metrics; 0 picks a free port and logs it")
    metrics_host: str = Field("127.0.0.1", description="address /metrics listens on; 0.0.0.0 in containers")
    duration: float | None = Field(None, gt=0, description="run this many seconds, then stop cleanly")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="lowest level of log lines")
    log_format: Literal["text", "json"] = Field("text", description="log lines as key=value text or JSON objects")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class CommonSettings(ServiceSettings):
    """Options every service on the broker shares: the primary, the twins and the demo."""

    broker: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT")
    model_id: str = Field("bytelm", description="id of the model; names the topics and the model_id label")
    mqtt_username: str | None = Field(None, description="MQTT user name")
    mqtt_password: SecretStr | None = Field(None, description="MQTT password (environment only)")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=4096, le=268_435_000, description="largest MQTT payload sent or accepted, bytes"
    )

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @field_validator("model_id")
    @classmethod
    def _check_model_id(cls, value: str) -> str:
        return check_id(value, "model id")

    @model_validator(mode="after")
    def _check_credentials(self) -> Self:
        if self.mqtt_password is not None and not self.mqtt_username:
            raise ValueError("LLM_TWIN_MQTT_PASSWORD is set but --mqtt-username is not; set both, or neither")
        return self

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    @property
    def password(self) -> str | None:
        return self.mqtt_password.get_secret_value() if self.mqtt_password else None


class PrimarySettings(CommonSettings):
    """Options of `llm-twin primary`: the reference model, its training and what it publishes."""

    corpus: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="text file or folder, repeatable (environment: separated by os.pathsep); default: the Python standard library source",
    )
    seed: int = Field(0, ge=0, description="seed of weights init and corpus order")
    context: int = Field(16, ge=1, le=4096, description="context window of the byte model, bytes")
    embedding_dim: int = Field(32, ge=1, le=65536, description="embedding size per byte")
    hidden_dim: int = Field(256, ge=1, le=65536, description="hidden layer width")
    batch_size: int = Field(32, ge=1, le=65536, description="examples per training step")
    learning_rate: float = Field(3e-3, gt=0, le=10, description="Adam step size")
    steps_per_second: float = Field(20.0, ge=0, description="training rate cap, a live stream; 0 = as fast as possible")
    publish_every: int = Field(10, ge=1, description="publish a weight update every N training steps")
    snapshot_every: int = Field(50, ge=1, description="every Nth weight update is a full snapshot, the rest deltas")
    outputs_every: int = Field(1, ge=1, description="publish the outputs of every Nth training batch")
    codec: DeltaCodecName = Field("float32", description="encoding of weight deltas")
    max_steps: int = Field(
        0, ge=0, description="stop training after N steps but keep publishing outputs; 0 = train until stopped"
    )
    outputs_topk: int = Field(
        0,
        ge=0,
        le=256,
        description="publish only the top K log-probabilities per position, as LLM APIs do; 0 = all 256",
    )

    @field_validator("corpus", mode="before")
    @classmethod
    def _split_corpus(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part]
        return value

    @field_validator("corpus")
    @classmethod
    def _check_corpus(cls, paths: list[Path]) -> list[Path]:
        for path in paths:
            if not path.exists():
                raise ValueError(f"corpus path {str(path)!r} not found; give an existing text file or folder")
        return paths


class TwinSettings(CommonSettings):
    """Options of `llm-twin twin`: the sync policy, the replica and the comparison window."""

    twin_id: str = Field("mirror", description="id of this twin; names the twin_id label")
    sync_policy: SyncPolicyName = Field("mirror", description="how the replica follows the primary")
    sync_interval: float = Field(5.0, gt=0, le=86_400, description="seconds between sync steps (periodic, ema)")
    ema_alpha: float = Field(0.9, gt=0, le=1, description="ema: replica <- alpha*primary + (1-alpha)*replica")
    replica_dtype: ReplicaDtype = Field("float32", description="precision the replica is kept in")
    window: int = Field(20, ge=1, le=100_000, description="output batches averaged into the divergence gauges")
    max_parameters: int = Field(500_000_000, ge=1, description="largest model this twin accepts, parameters")
    role: TwinRole | None = Field(
        None, description="what the twin is for; default from the policy and dtype (mirror, quantized, ema, ...)"
    )
    divergence_budget: float | None = Field(
        None,
        ge=0,
        description="expected KL of this twin, nats; default: calibrated on the first --budget-warmup batches",
    )
    budget_warmup: int = Field(30, ge=1, le=100_000, description="output batches the budget is calibrated on")
    detector: DetectorName = Field("adwin", description="change-point detector on the divergence streams")
    detector_params: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description='detector parameters as JSON, e.g. {"delta": 0.01}; see docs/detectors.md'
    )
    weight_group_depth: int = Field(1, ge=1, le=16, description="dot-separated name parts that form a layer group")
    max_weight_groups: int = Field(
        16, ge=1, le=1000, description="most layer groups exported; the rest fold into 'other'"
    )
    grafana_url: str | None = Field(None, description="Grafana to annotate with resyncs and drift detections")
    grafana_token: SecretStr | None = Field(None, description="Grafana service account token (environment only)")
    checkpoint: Path | None = Field(None, description="file to keep the applied weights in and resume from")
    checkpoint_every: float = Field(60.0, gt=0, description="seconds between checkpoint writes (and one at stop)")

    @field_validator("twin_id")
    @classmethod
    def _check_twin_id(cls, value: str) -> str:
        return check_id(value, "twin id")

    @field_validator("detector_params", mode="before")
    @classmethod
    def _parse_detector_params(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f'not valid JSON ({exc.msg}); write an object such as {{"delta": 0.01}}') from exc
        return value

    @model_validator(mode="after")
    def _check_detector(self) -> Self:
        from monitor.analytics.detectors import make_detector

        try:
            make_detector(self.detector, **self.detector_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"--detector {self.detector} rejects --detector-params {self.detector_params}: {exc}"
            ) from exc
        return self

    @property
    def effective_role(self) -> TwinRole:
        """The declared role, or the one the sync policy and replica dtype imply."""
        if self.role is not None:
            return self.role
        if self.sync_policy == "mirror":
            return "mirror" if self.replica_dtype == "float32" else "quantized"
        if self.sync_policy == "periodic":
            return "canary"
        return self.sync_policy


class DemoSettings(PrimarySettings):
    """Options of `llm-twin demo`: a primary and three twins over an embedded broker."""

    broker: str | None = Field(None, description="use this broker instead of starting the embedded one")  # type: ignore[assignment]
    summary_every: float = Field(5.0, gt=0, description="seconds between live summary lines")
    sync_interval: float = Field(2.0, gt=0, description="ema twin: seconds between blend steps")
    ema_alpha: float = Field(0.5, gt=0, le=1, description="ema twin blend factor")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:  # type: ignore[override]
        if value is not None:
            parse_broker_url(value)
        return value
