"""The envelope: the header of every weights, outputs and status message.

The envelope travels as JSON under the `llm_twin` key of the safetensors metadata, so one payload carries
both the tensors and their description, and a receiver validates the envelope before it trusts any tensor.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitor.topics import MODEL_ID_PATTERN

SCHEMA_VERSION: Literal[1] = 1
METADATA_KEY = "llm_twin"

Codec = Literal["float32", "float16", "int8", "topk"]
"""Encoding of the tensors of a weights message; `float32` is lossless."""


class Kind(StrEnum):
    SNAPSHOT = "snapshot"  # full weights at `version`
    DELTA = "delta"  # weights[version] - weights[base_version]
    CHUNK = "chunk"  # one slice of a larger weights message, see monitor.wire.chunking
    OUTPUTS = "outputs"  # contexts and the primary's next-token log-probabilities
    STATUS = "status"  # retained birth (online) or death (offline) of a primary session


class Architecture(BaseModel):
    """Enough of the model's shape for a twin to build the same model and check tensor shapes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["byte-mlp"] = "byte-mlp"
    context_size: int = Field(ge=1, le=4096)
    embedding_dim: int = Field(ge=1, le=65536)
    hidden_dim: int = Field(ge=1, le=65536)


class TensorEntry(BaseModel):
    """One row of the birth manifest: a tensor the primary will publish."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"
    digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    """blake2b-128 of this tensor at the birth version (`tensor_checksum` of it alone)."""


class Envelope(BaseModel):
    """Header of one message; every field is checked before a tensor is used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    session_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    kind: Kind
    version: int = Field(ge=0, lt=2**62)
    base_version: int | None = Field(default=None, ge=0, lt=2**62)
    seq: int = Field(default=0, ge=0, lt=2**62)
    created_ns: int = Field(ge=0, lt=2**63)
    codec: Codec = "float32"
    chunk_index: int = Field(default=0, ge=0, lt=1_000_000)
    chunk_count: int = Field(default=1, ge=1, le=1_000_000)
    checksum: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    """blake2b-128 of the tensors of this message (see `monitor.wire.codec.tensor_checksum`)."""
    state_digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    """blake2b-128 of the full weights at `version`; lets a twin prove it has exactly those bytes."""
    chunk_of: Kind | None = None
    total_bytes: int | None = Field(default=None, ge=0)
    status: Literal["online", "offline"] | None = None
    architecture: Architecture | None = None
    manifest: tuple[TensorEntry, ...] | None = Field(default=None, max_length=100_000)

    @model_validator(mode="after")
    def _check_kind_fields(self) -> Self:
        if self.kind is Kind.DELTA and self.base_version is None:
            raise ValueError("a delta needs base_version")
        if self.base_version is not None and self.base_version >= self.version:
            raise ValueError(f"base_version {self.base_version} must be lower than version {self.version}")
        if self.chunk_index >= self.chunk_count:
            raise ValueError(f"chunk_index {self.chunk_index} must be lower than chunk_count {self.chunk_count}")
        if self.kind is Kind.CHUNK and (self.chunk_of is None or self.total_bytes is None):
            raise ValueError("a chunk needs chunk_of and total_bytes")
        if self.kind is Kind.STATUS and self.status is None:
            raise ValueError("a status message needs status")
        return self
