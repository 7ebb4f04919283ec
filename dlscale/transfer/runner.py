"""A transfer study: how well do pretrained encoders do with few labels, against the same architecture from scratch.

Every registered downstream task the study asks for (`tasks`; default all the data can serve: classification,
regression, anomaly, superres or any registered one) is fitted on the same nested label subsets with the same
methods (probe, finetune, scratch, random) and scored on the whole eval split with the same bootstrap, every cell
of results.json naming its `task`. The study's config is typed and checked when it is loaded
(`config.load_transfer_config`); nothing here changes it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from dlscale.transfer.config import TransferConfig
from dlscale.transfer.report import write_outputs
from dlscale.transfer.study import prepare

log = logging.getLogger(__name__)
CI_TEXT = ("95% percentile interval of a two-level bootstrap: each of {b} draws resamples the repeats (subsets, or "
           "seeds at N = all) with replacement and the eval samples once for all of them, then averages the metric "
           "over the drawn repeats")


def run_transfer(cfg: TransferConfig) -> dict:
    """The whole study; writes report.md, results.json and each task's figures in `cfg.out` and returns the results
    record. Each task's time is logged and recorded."""
    study = prepare(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    cells, seconds = [], {}
    for i, task in enumerate(study.tasks, 1):
        log.info("downstream task %d/%d: %s", i, len(study.tasks), task.name)
        start = time.perf_counter()
        cells += task.run(study)
        seconds[task.name] = round(time.perf_counter() - start, 1)
        log.info("downstream task %s took %.1f s", task.name, seconds[task.name])
    return write_outputs(study, cells, CI_TEXT.format(b=cfg.n_bootstrap), seconds)
