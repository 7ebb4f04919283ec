"""The stage table: a stage is a name, the tasks it trains and the config defaults it brings.

Every place that needs stage names (`--stage` choices, config validation, the quickstart, the sweep) reads this
table; a user's launch script may `register_stage` its own before calling `dlscale.train.main`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dlscale.train.tasks import TASKS, task_class


@dataclass(frozen=True)
class Stage:
    """`tasks`: what the stage trains; None lets the run choose (`model.tasks`), defaulting to `default_tasks`
    plus every task of `when_available` the data supports (regression when `data.targets` is set)."""
    tasks: tuple[str, ...] | None
    description: str
    default_tasks: tuple[str, ...] = ()
    when_available: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    """Config values this stage starts from, under the user's YAML and overrides (nested, e.g. {"data": {...}})."""


STAGES: dict[str, Stage] = {}


def register_stage(name: str, stage: Stage) -> Stage:
    for task in (stage.tasks or ()) + stage.default_tasks + stage.when_available:
        task_class(task)   # raises naming the unknown task
    STAGES[name] = stage
    return stage


register_stage("autoencoder", Stage(("recon",), "encoder + decoder, reconstruction loss"))
register_stage("supervised", Stage(("classification",), "encoder + classifier, cross-entropy"))
register_stage("multitask", Stage(None, "shared encoder, several task heads under a loss weighting",
                                  default_tasks=("recon", "classification"), when_available=("regression",)))
register_stage("mae", Stage(("mae",), "masked autoencoder: rebuild hidden patches (ViT: visible patches only)"))
register_stage("adapt", Stage(None, "domain adaptation: classification of the labelled data + a task adapting it "
                                   "to the unlabelled target domain (data.target), then AdaBN",
                             default_tasks=("classification", "noisematch"),
                             defaults={"data": {"target": {"adabn": True}}}))
register_stage("contrastive", Stage(("contrastive",), "SimCLR (NT-Xent, negatives from every rank) or BYOL on two "
                                                      "random lensing views"))
register_stage("superres", Stage(("superres",), "super-resolution of the data's own images (no labels): a residual "
                                 "network on bicubic, guided by the encoder's feature map"))


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    return STAGES[name]


def stage_tasks(stage: str, tasks: Sequence[str] | None, n_targets: int) -> tuple[str, ...]:
    """The tasks a run of `stage` trains (registry order), validating those asked for with `model.tasks`."""
    spec = get_stage(stage)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: expected some of {', '.join(TASKS)}")
        if not tasks:
            raise ValueError("model.tasks is empty: name at least one task")
    if spec.tasks is not None:
        if tasks is not None and set(tasks) != set(spec.tasks):
            raise ValueError(f"stage {stage!r} trains tasks {list(spec.tasks)}, got tasks {list(tasks)}")
        chosen = set(spec.tasks)
    elif tasks is not None:
        chosen = set(tasks)
    else:
        chosen = set(spec.default_tasks) | {t for t in spec.when_available if task_class(t).available(n_targets)}
    for task in sorted(chosen):
        if not task_class(task).available(n_targets):
            raise ValueError(f"task {task!r} needs regression targets (n_reg_targets >= 1): set data.targets, "
                             "e.g. [theta_E]")
    return tuple(t for t in TASKS if t in chosen)
