"""Downstream tasks of `dlscale transfer`, one file each, registered by name in `DOWNSTREAM`.

    classification  the label-efficiency study (probe, fine-tune, scratch, random init): macro AUC, accuracy
    regression      ridge on frozen features, fine-tune vs scratch: log10 axion mass and the lens parameters
    anomaly         no_sub-only density in the frozen feature space (kNN, Mahalanobis), and the reconstruction
                    error of encoders whose run has a decoder: AUROC against substructure
    superres        2x super-resolution with a light head on the frozen feature map: PSNR, SSIM against bicubic

A new task subclasses `base.DownstreamTask` and is decorated with `@DOWNSTREAM.register`; no dlscale edit needed.
"""
from __future__ import annotations

import logging

from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize
# registered in this order (the report and `--tasks all`, the default, follow it)
from dlscale.transfer.tasks import classification, regression, anomaly, superres  # noqa: F401,I001

log = logging.getLogger(__name__)
ALL_TASKS = "all"


def resolve_tasks(study) -> list[DownstreamTask]:
    """The study's task instances. `all` (the default) takes every registered task the data can serve and skips the
    others with one log line each, naming the task and what it lacks; a task named explicitly that the data cannot
    serve is refused here, before any training, naming the task and what it needs."""
    names = study.cfg.tasks
    if ALL_TASKS in names:
        tasks = []
        for name, cls in DOWNSTREAM.items():
            task = cls()
            why = task.unmet(study)
            if why:
                log.warning("skipping downstream task %s: %s (it needs %s)", name, why, task.needs)
            else:
                tasks.append(task)
        return tasks
    tasks = [DOWNSTREAM.get_class(name)() for name in dict.fromkeys(names)]
    for task in tasks:
        why = task.unmet(study)
        if why:
            raise task.refuse(why)
    return tasks


__all__ = ["ALL_TASKS", "Anchor", "DOWNSTREAM", "DownstreamTask", "cell", "resolve_tasks", "summarize"]
