"""Training data sources, registered by `data.source` name (`base` documents the protocol): `shards` and
`simulate` ship with dlscale; `@register_source` adds others without editing it. A run that adapts to a target
domain pairs its source with the target's (`two_stream`)."""
from dlscale.train.sources.base import SOURCES, InMemorySource, TrainingSource, register_source, source_class
from dlscale.train.sources import shards as _shards, simulate as _simulate  # noqa: F401  (register the built-ins)
from dlscale.train.sources.two_stream import TARGET_DOMAIN, TwoStreamSource, needs_target
from dlscale.train.stages import stage_tasks

__all__ = ["SOURCES", "TARGET_DOMAIN", "InMemorySource", "TrainingSource", "TwoStreamSource", "register_source",
           "source_class", "source_of", "training_source"]


def training_source(cfg) -> "TrainingSource":
    """The run's source (`data.source` of `cfg`), bound to the config; paired with the target domain's
    (`two_stream.TwoStreamSource`) when a task of the run adapts to one."""
    if getattr(getattr(cfg.data, "target", None), "source", ""):
        if needs_target(stage_tasks(cfg.stage, cfg.model.tasks, len(cfg.data.targets))):
            return TwoStreamSource(cfg)
    return source_class(cfg.data.source)(cfg)


def source_of(stream, cfg=None) -> "TrainingSource":
    """The source that built `stream` (`TrainingSource.open` records it on the stream), else the config's."""
    source = getattr(stream, "data_source", None)
    if source is None:
        if cfg is None:
            raise ValueError(f"{type(stream).__name__}: not built by a training source and no config to name one")
        source = training_source(cfg)
    return source
