"""Build a model from the architecture a primary announces."""

from __future__ import annotations

from functools import lru_cache

from monitor.model.base import LanguageModel
from monitor.model.bytelm import ByteMLP, ByteMLPConfig
from monitor.wire.envelope import Architecture


@lru_cache(maxsize=8)
def build_model(architecture: Architecture) -> LanguageModel:
    """Return the model an architecture describes; raise ValueError for an unknown name."""
    if architecture.name == "byte-mlp":
        config = ByteMLPConfig(
            context_size=architecture.context_size,
            embedding_dim=architecture.embedding_dim,
            hidden_dim=architecture.hidden_dim,
        )
        return ByteMLP(config)
    raise ValueError(f"unknown architecture {architecture.name!r}; this version runs 'byte-mlp'")
