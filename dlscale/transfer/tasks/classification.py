"""The classification task: the label-efficiency study of substructure classification (no_sub / cdm / axion).

    probe     logistic regression (and ridge for `targets`) on the frozen encoder's features of the subset
    finetune  the encoder trained on the subset through the DeepSpeed engine (init_from; stage supervised, or
              multitask classification + regression with `targets`)
    scratch   the same architecture from random weights, same subset, config and budget
    random    the control: the same architecture at random initialisation, probed like `probe`
    lpft, layer_decay, partial, lora
              fine-tuning variants that keep more of the pretrained features (`dlscale.transfer.methods`)
    multitask, multitask_scratch
              semi-supervised multi-task: classification on the subset, reconstruction of every train image

Macro AUC and accuracy (MAE and R^2 of `targets`) on the whole eval split, with the study's bootstrap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from dlscale.data.classes import CLASSES
from dlscale.transfer import samples
from dlscale.transfer.methods import METHOD_TABLE, METHODS
from dlscale.transfer.report_text import fmt, with_ci
from dlscale.transfer.scoring import probe_classifier, probe_regressor, summarize_cell
from dlscale.transfer.subsets import ALL
from dlscale.transfer.tasks.base import DOWNSTREAM, DownstreamTask
from dlscale.transfer.training import PlannedRun, budget_of, read_scores, run_config, train_all

LINE_STYLES = {"probe": "-", "finetune": "--", "scratch": ":", "random": "-.", "lpft": (0, (5, 1)),
               "layer_decay": (0, (3, 1, 1, 1, 1, 1)), "partial": (0, (1, 2)),
               "lora": (0, (5, 2, 1, 2)), "multitask": (0, (8, 2)), "multitask_scratch": (0, (2, 1))}


@dataclass
class ClassificationOptions:
    targets: list[str] = field(default_factory=list)
    """regression targets from the sample metadata trained and probed beside the classes (e.g. theta_E): fine-tune
    and scratch runs become multitask classification + regression"""


@DOWNSTREAM.register
class Classification(DownstreamTask):
    name = "classification"
    needs = "a train split holding every class (no_sub, cdm, axion), N of each"
    metrics = ("auc_macro", "accuracy")
    note = ("3-class substructure classification: logistic-regression probe on frozen features, fine-tune and "
            "scratch runs through the DeepSpeed engine, random-init control")
    Config = ClassificationOptions
    efficiency_panel = False              # label_efficiency.png is its own figure

    def run(self, study) -> list[dict]:
        self.targets = list(study.cfg.options(self.name).targets)
        self.truth: dict | None = None
        self.preds: dict = {}             # (method, model, N) -> [per-repeat predictions]
        self.runs: dict = {}              # (method, model, N) -> [run dirs]
        self.run_probes(study)
        self.run_training(study)
        return self.summarize(study)

    def add(self, study, key: tuple, pred: dict, what: str) -> None:
        if self.truth is None:
            self.truth = {k: v for k, v in pred.items() if k in ("ids", "labels", "target")}
        if not np.array_equal(pred["ids"], self.truth["ids"]):
            raise RuntimeError(f"{what}: scored other {study.cfg.split} samples than the rest of the study")
        self.preds.setdefault(key, []).append({k: v for k, v in pred.items() if k in ("probs", "regression")})

    def target_columns(self, study, split: str, ids: np.ndarray) -> np.ndarray:
        """(N, targets) values of the regression targets of `split`'s samples `ids` (from their metadata, read
        once per split)."""
        key = ("classification_targets", split)
        if key not in study.cache:
            data = study.cfg.data_dir if split == "train" else study.cfg.eval_dir
            study.cache[key] = samples.metadata(data, split, self.targets)
        meta = study.cache[key]
        if not np.array_equal(meta["ids"], ids):
            raise RuntimeError(f"classification: the {split} metadata covers other samples than its features")
        return np.stack([meta[t] for t in self.targets], axis=1)

    def run_probes(self, study) -> None:
        """`probe` (trained encoders) and `random` (random initialisations) on every subset."""
        cfg = study.cfg
        for method, model, source, init_seed in tqdm(study.frozen_jobs(), desc="probes", unit="encoder"):
            what = f"{model} ({'trained' if init_seed is None else f'random init {init_seed}'})"
            train = study.frozen_features(source, init_seed, "train")
            evald = study.frozen_features(source, init_seed, cfg.split)
            for n in cfg.labels_per_class:
                for r in study.frozen_repeats(method, n, init_seed):
                    index = study.subsets[r][n]
                    pred = {"ids": evald["ids"], "labels": evald["labels"], "probs": probe_classifier(
                        train["features"][index], train["labels"][index], evald["features"], CLASSES, cfg.seed)}
                    if self.targets:
                        pred["target"] = self.target_columns(study, cfg.split, evald["ids"])
                        train_target = self.target_columns(study, "train", train["ids"])
                        pred["regression"] = probe_regressor(train["features"][index], train_target[index],
                                                             evald["features"])
                    self.add(study, (method, model, n), pred, what)

    def plan_runs(self, study) -> list[tuple[tuple, PlannedRun]]:
        """((method, model, N), run) for every fine-tune and scratch run, with the shared budget."""
        models = study.trained_models()
        if not models:
            return []
        cfg, out = study.cfg, Path(study.cfg.out) / "runs"
        dirs = study.subset_dirs()
        stage, tasks = ("multitask", ["classification", "regression"]) if self.targets else ("supervised", None)
        planned = []
        for n in cfg.labels_per_class:
            for r in range(cfg.repeats):
                for method, model, source in models:
                    run_dir = out / model / f"{method}-n{n}-r{r}"
                    config = run_config(study, source, method, study.n_train(n), run_dir, dirs[(n, r)],
                                        cfg.seed + r, stage, tasks, self.targets)
                    planned.append(((method, model, n), PlannedRun(str(run_dir), config)))
            study.budget.setdefault(n, budget_of(planned[-1][1], cfg.ranks))
        return planned

    def run_training(self, study) -> None:
        planned = self.plan_runs(study)
        if not planned:
            return
        train_all([run for _, run in planned], Path(study.cfg.out) / "plan.json", study.cfg.split, study.cfg.ranks)
        for key, run in planned:
            scores = read_scores(run, study.cfg.split)
            self.add(study, key, scores, run.run_dir)
            self.runs.setdefault(key, []).append(run.run_dir)

    def summarize(self, study) -> list[dict]:
        """One record per (method, model, N): per-repeat metrics, mean, CI, the runs behind it."""
        cfg, cells = study.cfg, []
        order = {m: i for i, m in enumerate(METHODS)}
        keys = sorted(self.preds, key=lambda k: (cfg.labels_per_class.index(k[2]), order[k[0]], k[1]))
        for method, model, n in tqdm(keys, desc="bootstrap", unit="cell", leave=False):
            summary = summarize_cell(self.preds[(method, model, n)], self.truth, CLASSES, self.targets,
                                     cfg.n_bootstrap, cfg.seed)
            unlabelled = {"n_unlabelled": len(study.train_ids)} if METHOD_TABLE[method].semi_supervised else {}
            cells.append({"task": self.name, "method": method, "model": model, "n_per_class": n,
                          "n_train": study.n_train(n), **unlabelled, **summary,
                          "runs": self.runs.get((method, model, n), [])})
        return cells

    def figures(self, study, cells: list[dict]) -> dict:
        figures = {"label_efficiency.png": label_efficiency_figure(cells, len(study.train_labels))}
        if self.targets and self.preds:
            figures["regression_scatter.png"] = self.scatter_figure(study)
        return figures

    def scatter_figure(self, study) -> Figure:
        """Predicted against true per target, every (method, model) at the largest N, first repeat."""
        targets, largest = self.targets, study.cfg.labels_per_class[-1]
        figure = Figure(figsize=(4.5 * len(targets), 4.2), layout="constrained")
        FigureCanvasAgg(figure)
        truth = self.truth["target"]
        for j, name in enumerate(targets):
            axes = figure.add_subplot(1, len(targets), j + 1)
            for k, ((method, model, n), preds) in enumerate(sorted(self.preds.items(), key=lambda kv: str(kv[0]))):
                if n != largest or "regression" not in preds[0]:
                    continue
                axes.scatter(truth[:, j], preds[0]["regression"][:, j], s=6, alpha=0.5, color=f"C{k % 10}",
                             label=f"{model} {method}")
            lo, hi = float(np.min(truth[:, j])), float(np.max(truth[:, j]))
            axes.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8)
            axes.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}, {largest} labels per class")
            axes.legend(fontsize="x-small")
        return figure

    @classmethod
    def section(cls, record: dict, cells: list[dict], results: dict) -> list[str]:
        targets = (record.get("options") or {}).get("targets", [])
        lines = ["## Task: classification", "", *table(cells, targets), "",
                 "- Figure: `label_efficiency.png` (macro AUC vs labels per class, log x, CI bands)"]
        if targets:
            lines.append("- Regression: `regression_scatter.png` (predicted vs true at the largest N)")
        return [*lines, ""]


def table(cells: list[dict], targets: list[str]) -> list[str]:
    """The classification cells: accuracy and macro AUC with CIs (MAE and R^2 of the regression targets)."""
    header = "| labels/class | method | encoder | repeats | accuracy (95% CI) | macro AUC (95% CI) |" + \
        "".join(f" MAE {t} (95% CI) | R2 {t} |" for t in targets)
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in cells:
        regression = "".join(f" {with_ci(c, f'mae/{t}')} | {fmt(c['mean'].get(f'r2/{t}'))} |" for t in targets)
        rows.append(f"| {c['n_per_class']} | {c['method']} | {c['model']} | {len(c['repeats'])} | "
                    f"{with_ci(c, 'accuracy')} | {with_ci(c, 'auc_macro')} |{regression}")
    return rows


def _x(n, train_samples: int) -> float:
    return train_samples / len(CLASSES) if n == ALL else float(n)


def label_efficiency_figure(cells: list[dict], train_samples: int) -> Figure:
    figure = Figure(figsize=(7.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lines = sorted({(c["method"], c["model"]) for c in cells if "auc_macro" in c["mean"]})
    models = sorted({m for _, m in lines})
    for method, model in lines:
        rows = sorted((c for c in cells if (c["method"], c["model"]) == (method, model)),
                      key=lambda c: _x(c["n_per_class"], train_samples))
        x = [_x(c["n_per_class"], train_samples) for c in rows]
        colour = f"C{models.index(model) % 10}"
        axes.plot(x, [c["mean"]["auc_macro"] for c in rows], color=colour, linestyle=LINE_STYLES[method],
                  marker="o", label=f"{model} {method}")
        low, high = [c["ci_low"]["auc_macro"] for c in rows], [c["ci_high"]["auc_macro"] for c in rows]
        axes.fill_between(x, low, high, color=colour, alpha=0.12, linewidth=0)
    axes.set_xscale("log")
    ticks = sorted({c["n_per_class"] for c in cells}, key=lambda n: _x(n, train_samples))
    axes.set_xticks([_x(n, train_samples) for n in ticks], [str(n) for n in ticks])
    axes.minorticks_off()
    axes.set(xlabel="labels per class (all: the whole train split, per class on average)",
             ylabel="macro AUC (eval split)", title="Label efficiency (bands: 95% CI)")
    axes.axhline(0.5, color="0.6", linewidth=0.8)
    axes.legend(fontsize="small", loc="best")
    return figure
