"""Training data sources, registered by `data.source` name (`base` documents the protocol): `shards` and
`simulate` ship with dlscale; `@register_source` adds others without editing it. A run that adapts to a target
domain pairs its source with the target's (`two_stream`)."""
from dlscale.train.sources.base import (SOURCES, InMemorySource, TrainingSource, register_source, source_class,
                                        source_of, training_source)
from dlscale.train.sources import shards as _shards, simulate as _simulate  # noqa: F401  (register the built-ins)
from dlscale.train.sources.two_stream import TARGET_DOMAIN, TwoStreamSource

__all__ = ["SOURCES", "TARGET_DOMAIN", "InMemorySource", "TrainingSource", "TwoStreamSource", "register_source",
           "source_class", "source_of", "training_source"]
