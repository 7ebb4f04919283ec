"""Training data sources, registered by `data.source` name (`base` documents the protocol): `shards` and
`simulate` ship with dlscale; `@register_source` adds others without editing it."""
from dlscale.train.sources.base import (SOURCES, InMemorySource, TrainingSource, register_source, source_class,
                                        source_of, training_source)
from dlscale.train.sources import shards as _shards, simulate as _simulate  # noqa: F401  (register the built-ins)

__all__ = ["SOURCES", "InMemorySource", "TrainingSource", "register_source", "source_class", "source_of",
           "training_source"]
