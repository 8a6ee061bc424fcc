"""Training data: the text corpus stream the primary learns from."""

from monitor.data.corpus import TextCorpus, default_corpus_paths

__all__ = ["TextCorpus", "default_corpus_paths"]
