"""Models the primary trains and the twins replicate."""

from monitor.model.base import LanguageModel, TensorSpec, Weights
from monitor.model.bytelm import ByteMLP, ByteMLPConfig
from monitor.model.optim import Adam

__all__ = ["Adam", "ByteMLP", "ByteMLPConfig", "LanguageModel", "TensorSpec", "Weights"]
