"""What a downstream task is: the data it needs, how it is fitted on N labelled examples, its metrics and figures.

A task is a class registered in `dlscale.transfer.tasks.DOWNSTREAM` (a `Registry`, as the training tasks are); a
task defined anywhere - a test file, a user's module imported before the study - is run by
`dlscale transfer --tasks NAME` and reported like the built-in ones. The study (`runner.Study`) gives every task
the same label subsets (`study.subsets[r][N]`, indices into the train split), the same frozen features (computed
once per encoder, `frozen_features`) and the same bootstrap (`bootstrap.summarize_draws`), so numbers of
different tasks are comparable: same splits, same N, same kind of interval.
"""
from __future__ import annotations

from dataclasses import dataclass


from dlscale.data.classes import CLASSES
from dlscale.transfer import features as feats
from dlscale.transfer.bootstrap import Draw, summarize_draws
from dlscale.transfer.subsets import ALL


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
    in_default: bool = True                  # run by `--tasks all`; False: costly, only when named

    def unmet(self, study) -> str | None:
        """Why `study`'s data cannot serve this task (None: it can). Called before any training."""
        return None

    def run(self, study) -> list[dict]:
        """The task's cells (see `cell`), every one scored on the whole eval split."""
        raise NotImplementedError

    def figures(self, study, cells: list[dict]) -> dict:
        """{file name: matplotlib Figure} beside report.md (optional)."""
        return {}

    def refuse(self, why: str) -> ValueError:
        return ValueError(f"--tasks {self.name}: {why}; the task needs {self.needs}")


def cell(task: str, method: str, model: str, n, n_train: int, summary: dict, runs: list | None = None) -> dict:
    """One record of results.json: (task, method, model, N), its per-repeat metrics, mean and CI."""
    return {"task": task, "method": method, "model": model, "n_per_class": n, "n_train": int(n_train),
            **summary, "runs": runs or []}


def summarize(draw: Draw, n_repeats: int, n_eval: int, study) -> dict:
    """The study's bootstrap (its draws and seed) of one cell."""
    return summarize_draws(draw, n_repeats, n_eval, study.cfg.n_bootstrap, study.cfg.seed)


def frozen_jobs(study, methods=("probe", "random")):
    """(method, model label, source, init seed or None) of every frozen-encoder fit the study's methods ask for:
    each trained encoder (`probe`) and each architecture at `repeats` random initialisations (`random`)."""
    cfg, jobs = study.cfg, []
    if "probe" in cfg.methods and "probe" in methods:
        jobs += [("probe", s.label, s, None) for s in study.sources]
    if "random" in cfg.methods and "random" in methods:
        jobs += [("random", label, s, r) for label, s in study.architectures.items() for r in range(cfg.repeats)]
    return jobs


def encoder_of(study, source: feats.EncoderSource, init_seed: int | None):
    """The trained encoder, or the architecture at the random initialisation of repeat `init_seed`."""
    if init_seed is None:
        return feats.load_weights(source)
    return feats.random_encoder(source, study.cfg.seed + init_seed)


def repeats_of(study, method: str, n, init_seed: int | None) -> list[int]:
    """The repeats a frozen fit covers: every subset for a trained encoder (one at N = all, where the fit is
    deterministic), the repeat of its own initialisation for a random one."""
    return list(study.repeats(method, n)) if init_seed is None else [init_seed]


def n_train(study, n) -> int:
    return len(study.train_labels) if n == ALL else n * len(CLASSES)
