"""What a finished sweep leaves for a person: results.md / results.csv (all trials, best first, the ranking
metric, the Pareto metrics and the effective loss weights), pareto.png, best_config.yaml, and TensorBoard hparams
for the trials stopped early. The ranking metric and the two Pareto axes come from the sweep file."""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlscale import io
from dlscale.configtree import dump_yaml
from dlscale.sweep.spec import SweepSettings, SweepSpec, trial_config, weight_task
from dlscale.train.config import Config, run_tasks
from dlscale.train.evaluation import write_hparams


# ---- results ------------------------------------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    trial: str
    status: str                  # completed | stopped early | failed
    params: dict
    metrics: dict                # the last reported evaluation
    error: str = ""

    @property
    def epoch(self) -> int:
        return int(self.metrics.get("epoch", 0))

    def value(self, key: str) -> float:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def trials_left(spec: SweepSpec, out_dir: Path) -> int:
    """Trials of the sweep that had not ended when `fit` returned (0 unless Ctrl-C stopped it), as Tune saved the
    sweep on disk: the state `--resume` continues. (The ResultGrid of an interrupted `fit` cannot tell: it shows the
    trials it stopped as terminated and leaves out those it never started.)"""
    from ray.tune import ExperimentAnalysis
    grid = math.prod(len(values) for kind, values in spec.space.values() if kind == "grid")
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(out_dir)).trials)
    return spec.settings.trials * grid - ended


def outcomes(results, epochs: int) -> list[TrialOutcome]:
    """One `TrialOutcome` per trial of the ResultGrid of a sweep whose trials have all ended."""
    out = []
    for result in results:
        metrics = dict(result.metrics or {})
        if result.error is not None:
            status = "failed"
        else:   # ended without error: all its epochs, or the scheduler stopped it
            status = "completed" if int(metrics.get("epoch", 0)) >= epochs else "stopped early"
        out.append(TrialOutcome(Path(result.path).name, status, dict(result.config or {}), metrics,
                                _error_text(result.error)))
    return out


def _error_text(error: BaseException | None) -> str:
    """One line naming what went wrong in the trial (Ray wraps it: RayTaskError.cause is the trial's own error)."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def ranked(trials: list[TrialOutcome], metric: str, mode: str, pareto: Mapping[str, str] | None = None
           ) -> list[TrialOutcome]:
    """Best first, ties broken by the first Pareto metric other than `metric`; trials without the metric last."""
    pareto = pareto or SweepSettings().pareto
    other, other_mode = next(((m, d) for m, d in pareto.items() if m != metric), (metric, mode))
    sign, other_sign = (-1.0 if mode == "max" else 1.0), (-1.0 if other_mode == "max" else 1.0)

    def key(t: TrialOutcome):
        v, w = t.value(metric), t.value(other)
        return (math.isnan(v), 0.0 if math.isnan(v) else sign * v, math.isnan(w), 0.0 if math.isnan(w) else
                other_sign * w)
    return sorted(trials, key=key)


def pareto_front(trials: list[TrialOutcome], pareto: Mapping[str, str]) -> list[TrialOutcome]:
    """Trials no other beats on both Pareto metrics, sorted along the first (x) axis."""
    (x, x_mode), (y, y_mode) = pareto.items()

    def better(a: float, b: float, mode: str) -> bool:   # a at least as good as b
        return a >= b if mode == "max" else a <= b
    points = [t for t in trials if not math.isnan(t.value(x)) and not math.isnan(t.value(y))]
    front = [t for t in points if not any(
        better(o.value(x), t.value(x), x_mode) and better(o.value(y), t.value(y), y_mode)
        and (o.value(x), o.value(y)) != (t.value(x), t.value(y)) for o in points)]
    return sorted(front, key=lambda t: t.value(x))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_rows(trials: list[TrialOutcome], spec: SweepSpec) -> tuple[list[str], list[list]]:
    """Columns and rows of the results table: swept values, both task metrics, the effective loss weights."""
    metrics = spec.metrics
    tasks = run_tasks(spec.base)
    columns = ["rank", "trial", "status", "epochs", *spec.space, *metrics, *(f"weight {t}" for t in tasks), "error"]
    rows = []
    for rank, t in enumerate(trials, 1):
        method = t.params.get("loss.method", spec.base.loss.method)
        params = [("-" if weight_task(k) is not None and method != "fixed" else t.params.get(k, "-"))
                  for k in spec.space]
        rows.append([rank, t.trial, t.status, t.epoch, *params, *(t.value(m) for m in metrics),
                     *(t.value(f"train/weight_{task}") for task in tasks), t.error])
    return columns, rows


def write_results(trials: list[TrialOutcome], spec: SweepSpec, out_dir: Path) -> str:
    """results.md, results.csv, pareto.png, best_config.yaml and TensorBoard hparams for trials stopped early;
    returns the summary that is printed."""
    settings = spec.settings
    trials = ranked(trials, settings.metric, settings.mode, settings.pareto)
    columns, rows = table_rows(trials, spec)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[("" if isinstance(v, float) and math.isnan(v) else v) for v in row] for row in rows])
    scored = [t for t in trials if not math.isnan(t.value(settings.metric)) and t.status != "failed"]
    lines = [f"# Sweep {out_dir.name}: {len(trials)} trials ranked by {settings.metric} ({settings.mode})", ""]
    if scored:
        best = scored[0]
        best_cfg = trial_config(spec.base, best.params, out_dir / "best_run")
        io.write_text(out_dir / "best_config.yaml", dump_yaml(best_cfg))
        lines += _headline(best, best_cfg, trials, spec, out_dir)
    else:
        lines += ["No trial reported the metric: see the errors below and the trials' error.txt.", ""]
    show = [c for c in columns if c != "error"]
    lines += ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(_text(v) for c, v in zip(columns, row) if c != "error") + " |" for row in rows]
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        lines += ["", f"## Failed trials (after {settings.max_failures} retries)", ""]
        lines += [f"- {t.trial}: {t.error} (see {out_dir / t.trial / 'error.txt'})" for t in failed]
    summary = "\n".join(lines) + "\n"
    io.write_text(out_dir / "results.md", summary)
    pareto_plot(trials, out_dir / "pareto.png", settings.pareto, best=scored[0] if scored else None)
    for t in trials:
        if t.status == "stopped early":
            write_stopped_hparams(t, spec, out_dir)
    return summary


def _headline(best: TrialOutcome, best_cfg: Config, trials: list[TrialOutcome], spec: SweepSpec, out_dir: Path
              ) -> list:
    metric = spec.settings.metric
    weights = ", ".join(f"{k.removeprefix('train/weight_')} {v:.3g}" for k, v in best.metrics.items()
                        if k.startswith("train/weight_"))
    shown = list(dict.fromkeys([metric, *spec.settings.pareto]))
    lines = [f"**Best: {best.trial}** ({best.status}, {best.epoch} epochs), {_describe(best_cfg, best.params)}",
             "- " + ", ".join(f"{m} {_text(best.value(m))}" for m in shown) +
             f"; effective loss weights: {weights or 'n/a'}"]
    for other, mode in spec.settings.pareto.items():   # what the winner gives up on the other axis
        if other == metric or math.isnan(best.value(other)):
            continue
        completed = [t for t in trials if t.status == "completed" and not math.isnan(t.value(other))]
        if not completed:
            continue
        top = (max if mode == "max" else min)(completed, key=lambda t: t.value(other))
        if top is best:
            lines.append(f"- {other}: none given up, it is also the best of the completed trials")
        else:
            lines.append(f"- {other}: {_text(best.value(other))} against the best completed trial's "
                         f"{_text(top.value(other))} ({top.trial}, loss.method="
                         f"{top.params.get('loss.method', best_cfg.loss.method)})")
    per_method: dict[str, TrialOutcome] = {}
    for t in trials:
        if t.status != "failed" and not math.isnan(t.value(metric)):
            per_method.setdefault(str(t.params.get("loss.method", best_cfg.loss.method)), t)
    lines += ["", "Best trial of each weighting method:", "", "| loss.method | trial | status | " + " | ".join(shown)
              + " |", "|---|---|---|" + "---|" * len(shown)]
    lines += [f"| {m} | {t.trial} | {t.status} | " + " | ".join(_text(t.value(k)) for k in shown) + " |"
              for m, t in per_method.items()]
    lines += ["", f"Retrain the winner: `dlscale train --config {out_dir / 'best_config.yaml'}` (into "
              f"{out_dir / 'best_run'}; --run-dir to choose another). Pareto front: {out_dir / 'pareto.png'}.", ""]
    return lines


def _describe(cfg: Config, params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if weight_task(k) is None}
    shown.setdefault("loss.method", cfg.loss.method)
    if cfg.loss.method == "fixed" and cfg.loss.fixed.weights:
        shown["loss.fixed.weights"] = {k: round(v, 4) for k, v in cfg.loss.fixed.weights.items()}
    return ", ".join(f"{k}={_text(v)}" for k, v in shown.items())


def pareto_plot(trials: list[TrialOutcome], path: Path, pareto: Mapping[str, str],
                best: TrialOutcome | None = None) -> None:
    """The two Pareto metrics against each other, one point per trial (hollow: stopped early), coloured by
    weighting method; the line joins the completed trials that no other completed trial beats on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (x, x_mode), (y, y_mode) = pareto.items()
    shown = [t for t in trials if t.status in ("completed", "stopped early")
             and not math.isnan(t.value(x)) and not math.isnan(t.value(y))]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    methods = sorted({str(t.params.get("loss.method", "")) for t in shown})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for method in methods:
        for status, fill in (("completed", True), ("stopped early", False)):
            group = [t for t in shown if str(t.params.get("loss.method", "")) == method and t.status == status]
            if group:
                ax.scatter([t.value(x) for t in group], [t.value(y) for t in group], s=40,
                           edgecolors=colours[method], facecolors=colours[method] if fill else "none",
                           label=f"{method or 'base'} ({status})")
    front = pareto_front([t for t in shown if t.status == "completed"], pareto)
    if front:
        ax.plot([t.value(x) for t in front], [t.value(y) for t in front], "k--", lw=1, drawstyle="steps-post",
                label="Pareto front (completed)")
    if best is not None and best in shown:
        ax.scatter([best.value(x)], [best.value(y)], marker="*", s=320, c="gold", edgecolors="k", zorder=0,
                   label=f"best: {best.trial}")
    words = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(f"{x} ({words[x_mode]})")
    ax.set_ylabel(f"{y} ({words[y_mode]})")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7)
    fig.tight_layout()
    io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_stopped_hparams(trial: TrialOutcome, spec: SweepSpec, out_dir: Path) -> None:
    """A trial stopped early never reaches the engine's own hparams record: write it, in the same form and place,
    from its last evaluation (once; `stopped.json` beside it records the stop)."""
    from torch.utils.tensorboard import SummaryWriter
    run_dir = out_dir / trial.trial / "run"
    if not run_dir.is_dir() or (run_dir / "stopped.json").is_file():
        return
    with SummaryWriter(str(run_dir / "tb")) as writer:
        write_hparams(writer, trial_config(spec.base, trial.params, run_dir), trial.metrics)
    io.write_json(run_dir / "stopped.json", {"stopped_after_epoch": trial.epoch, "by": spec.settings.scheduler,
                                          "metrics": trial.metrics})
