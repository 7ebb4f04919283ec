"""What a downstream task is: the data it needs, how it is fitted on N labelled examples, its metrics and figures.

A task is a class registered in `dlscale.transfer.tasks.DOWNSTREAM` (a `Registry`, as the training tasks are); a
task defined anywhere - a test file, a user's module imported before the study - is run by
`dlscale transfer --tasks NAME` and reported like the built-in ones. The study (`study.Study`) gives every task
the same label subsets (`study.subsets[r][N]`, indices into the train split), the same frozen features (computed
once per encoder, `frozen_features`) and the same bootstrap (`bootstrap.summarize_draws`), so numbers of
different tasks are comparable: same splits, same N, same kind of interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlscale.registry import Registry
from dlscale.transfer.bootstrap import Draw, summarize_draws
from dlscale.transfer.report_text import task_table


@dataclass(frozen=True)
class Anchor:
    """A published number to read a cell against (the datasets differ: an order of magnitude, not a ranking)."""
    metric: str
    value: float
    model: str
    source: str


class DownstreamTask:
    """Base of every downstream task. Subclasses set `name`, `needs`, `metrics` and implement `run`."""
    name: str = ""
    needs: str = ""                          # what the data must hold: said when the task is refused
    metrics: tuple[str, ...] = ()            # the report's columns, the headline metric first
    anchors: tuple[Anchor, ...] = ()
    higher_is_better: bool = True            # of the headline metric (the label-efficiency panel says so)
    note: str = ""                           # how it is fitted and scored, for the report
    Config: Any = None                       # its options: a dataclass (`task_options.<name>`), or None
    efficiency_panel: bool = True            # its headline metric gets a panel in label_efficiency_tasks.png

    def unmet(self, study) -> str | None:
        """Why `study`'s data cannot serve this task (None: it can). Called before any training."""
        return None

    def run(self, study) -> list[dict]:
        """The task's cells (see `cell`), every one scored on the whole eval split."""
        raise NotImplementedError

    def figures(self, study, cells: list[dict]) -> dict:
        """{file name: matplotlib Figure} beside report.md (optional)."""
        return {}

    @classmethod
    def section(cls, record: dict, cells: list[dict], results: dict) -> list[str]:
        """The task's part of report.md (from results.json, so an old study's report can be rewritten): what it
        does, its table (every metric with its CI, the anchors), the anchors' sources."""
        lines = [f"## Task: {record['name']}", "", f"{record['note'] or record['name']}. Needs: {record['needs']}.",
                 "", *task_table(record, cells), ""]
        for source in dict.fromkeys(a["source"] for a in record["anchors"]):
            lines.append(f"- Anchor source: {source}. The datasets differ from this study's: read the anchors as "
                         "orders of magnitude, not as a ranking.")
        return lines

    def refuse(self, why: str) -> ValueError:
        return ValueError(f"--tasks {self.name}: {why}; the task needs {self.needs}")


DOWNSTREAM: Registry[DownstreamTask] = Registry("downstream task")
"""Every downstream task by name, in registration order (the report and `--tasks all` follow it)."""


def cell(task: str, method: str, model: str, n, n_train: int, summary: dict, runs: list | None = None) -> dict:
    """One record of results.json: (task, method, model, N), its per-repeat metrics, mean and CI."""
    return {"task": task, "method": method, "model": model, "n_per_class": n, "n_train": int(n_train),
            **summary, "runs": runs or []}


def summarize(draw: Draw, n_repeats: int, n_eval: int, study) -> dict:
    """The study's bootstrap (its draws and seed) of one cell."""
    return summarize_draws(draw, n_repeats, n_eval, study.cfg.n_bootstrap, study.cfg.seed)
