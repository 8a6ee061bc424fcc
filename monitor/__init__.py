"""llm-twin-monitor: keep an LLM twin in step with its primary and measure how far apart they are."""

__version__ = "0.1.0"
