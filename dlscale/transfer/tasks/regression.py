"""The regression task: physical parameters - the axion mass as log10(m / eV) (axion samples only: the simulator
writes `axion_mass` in eV on every axion sample, None on the others) and the lens parameters the data vary
(`theta_E`, `e1`, `e2`, `gamma1`, `gamma2`: simulator data with `lens.randomize`).

probe     ridge regression on standardised frozen features of the N-per-class subset's samples that carry the
          target (so N axion samples for the mass); the random-init control likewise
finetune  the encoder trained on those samples for the regression targets alone (`regression_runs`);
lpft      the same, its head starting as the ridge probe fitted on those samples' frozen features;
scratch   the same architecture from random weights, same samples, config and budget (and the other trained methods)
The trained methods' loss and test-time augmentation are `task_options.regression.loss` / `.tta` (`RegressionOptions`).
Metrics: MAE (in dex for the mass) and R^2 on the eval images that carry the target, with the study's bootstrap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlscale.train.tasks.supervised import REGRESSION_LOSSES
from dlscale.transfer import samples
from dlscale.transfer.bootstrap import weighted_mean, weighted_r2
from dlscale.transfer.scoring import probe_regressor
from dlscale.transfer.tasks.regression_runs import run_trained
from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize

MASS, LOG_MASS = "axion_mass", "log10_axion_mass"
CANDIDATES = (LOG_MASS, "theta_E", "e1", "e2", "gamma1", "gamma2")
ANCHOR_SOURCE = ("the Lens-FM-DeepLense repository (Lens-LeJEPA work): log10 axion-mass regression on DeepLense "
                 "Model II, MAE in dex; other data than this study")


def target_values(meta: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A target's values per sample (NaN where a sample has none): log10 of the axion mass, or a metadata key."""
    if name == LOG_MASS:
        mass = meta[MASS]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mass > 0, np.log10(np.where(mass > 0, mass, 1.0)), np.nan)
    return meta[name]


def split_metadata(study, split: str) -> dict[str, np.ndarray]:
    """The metadata columns of the candidate targets (read once per study), train from the training data."""
    key = ("metadata", split)
    if key not in study.cache:
        data = study.cfg.data_dir if split == "train" else study.cfg.eval_dir
        names = {MASS if t == LOG_MASS else t for t in (*CANDIDATES, *study.cfg.options("regression").targets)}
        study.cache[key] = samples.metadata(data, split, sorted(names))
    return study.cache[key]


def varies(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return len(finite) >= 2 and float(np.ptp(finite)) > 0


@dataclass
class RegressionOptions:
    targets: list[str] = field(default_factory=list)
    """targets to regress (default []: log10_axion_mass and the lens parameters that vary in the data)"""
    loss: str = "mse"
    """loss of the trained methods' regression head on the standardised targets: mse | huber | l1
    (`model.task_options.regression.loss` of their runs)"""
    tta: bool = True
    """the trained methods' predictions are the mean over the 8 dihedral views of each eval image
    (`model.task_options.regression.tta`), in the runs whose targets are all invariant under rotations and flips
    (log10_axion_mass, theta_E; e1, e2, gamma1, gamma2 change sign under them and are scored on one view)"""
    precise_bn: bool = True
    """the trained methods' BatchNorm statistics re-estimated on their training images after the last step
    (`eval.precise_bn=-1` of their runs): the running averages were off (-0.17 dex on every prediction of a
    27,000-step run)"""
    ema: float = 0.0
    """the trained methods export and are scored with an exponential moving average of their weights of this decay
    (`optim.ema` of their runs; needs precise_bn); 0 = the last step's weights"""
    refit_head: bool = True
    """the trained methods' heads refitted after the last step by least absolute deviations to the eval-mode
    (view-averaged with tta) features of their training images (`model.task_options.regression.refit_head` of their
    runs; every weight with 20 images per coefficient, else the intercepts only): the trained heads predicted every
    axion mass 0.015-0.019 dex too heavy"""

    def validate(self) -> None:
        if self.loss not in REGRESSION_LOSSES:
            raise ValueError(f"task_options.regression.loss={self.loss!r}: expected one of "
                             f"{', '.join(REGRESSION_LOSSES)}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"task_options.regression.ema={self.ema}: expected a decay in [0, 1) (0 = off)")
        if self.ema and not self.precise_bn:
            raise ValueError(f"task_options.regression.ema={self.ema} needs task_options.regression.precise_bn=true "
                             "(the averaged weights' BatchNorm statistics)")


@DOWNSTREAM.register
class Regression(DownstreamTask):
    name = "regression"
    needs = ("a varying numeric target in the sample metadata of the train and eval splits (`axion_mass` on axion "
             "images, or theta_E / e1 / e2 / gamma1 / gamma2 from the simulator with lens.randomize)")
    anchors = (Anchor(f"mae/{LOG_MASS}", 0.021, "ResNet18 supervised, all labels", ANCHOR_SOURCE),
               Anchor(f"mae/{LOG_MASS}", 0.100, "Lens-LeJEPA + LoRA", ANCHOR_SOURCE))
    higher_is_better = False
    Config = RegressionOptions
    note = ("ridge regression on standardised frozen features of the subset's samples that carry the target "
            "(random-init control likewise); fine-tune, LP-FT (its head starting as that ridge probe) and scratch: "
            "regression-only runs on the same samples with the same budget (the axion mass: axion images only, "
            "scored on the eval split's axion images), their predictions averaged over the 8 dihedral views of each "
            "image for rotation-invariant targets (task_options.regression.tta); MAE in the target's units (dex for "
            "log10 axion mass), R^2")

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.metrics = ()

    def unmet(self, study) -> str | None:
        train, evald = split_metadata(study, "train"), split_metadata(study, study.cfg.split)
        asked = study.cfg.options("regression").targets or list(CANDIDATES)
        self.targets = [t for t in asked
                        if varies(target_values(train, t)) and varies(target_values(evald, t))]
        if study.cfg.options("regression").targets and self.targets != asked:
            missing = sorted(set(asked) - set(self.targets))
            return f"target(s) {', '.join(missing)} do not vary (or are absent) in {study.cfg.data_dir}"
        if not self.targets:
            return f"no candidate target ({', '.join(CANDIDATES)}) varies in the data"
        self.metrics = tuple(m for t in self.targets for m in (f"mae/{t}", f"r2/{t}"))
        return None

    def run(self, study) -> list[dict]:
        cfg = study.cfg
        train_meta, eval_meta = split_metadata(study, "train"), split_metadata(study, cfg.split)
        train_y = {t: target_values(train_meta, t) for t in self.targets}
        self.truth = {t: target_values(eval_meta, t) for t in self.targets}
        self.preds: dict[tuple, list[dict]] = {}
        for method, model, source, init_seed in study.frozen_jobs():
            train = study.frozen_features(source, init_seed, "train")
            evald = study.frozen_features(source, init_seed, cfg.split)
            if not np.array_equal(evald["ids"], eval_meta["ids"]):
                raise RuntimeError(f"regression: features and metadata of {cfg.split} cover other samples")
            for n in cfg.labels_per_class:
                for r in study.frozen_repeats(method, n, init_seed):
                    pred = {}
                    for t in self.targets:
                        index = study.subsets[r][n]
                        index = index[np.isfinite(train_y[t][index])]
                        pred[t] = probe_regressor(train["features"][index], train_y[t][index],
                                                  evald["features"])[:, 0]
                    self.preds.setdefault((method, model, n), []).append(pred)
        trained, runs = run_trained(study, train_y, self.truth, eval_meta["ids"], {LOG_MASS})
        self.preds.update(trained)
        return [cell(self.name, method, model, n, study.n_train(n),
                     summarize(self.draw(preds), len(preds), len(eval_meta["ids"]), study),
                     runs.get((method, model, n)))
                for (method, model, n), preds in self.preds.items()]

    def draw(self, preds: list[dict]):
        def metrics(r: int, counts: np.ndarray) -> dict[str, np.ndarray]:
            out = {}
            for t in self.targets:
                truth, mask = self.truth[t], np.isfinite(self.truth[t])
                pred, truth0 = np.where(mask, preds[r][t], 0.0), np.where(mask, truth, 0.0)
                kept = counts * mask
                out[f"mae/{t}"] = weighted_mean(np.abs(pred - truth0), kept)
                out[f"r2/{t}"] = weighted_r2(pred, truth0, kept)
            return out
        return metrics

    def figures(self, study, cells: list[dict]) -> dict:
        """Predicted against true per target: every trained encoder's probe at the largest N (first repeat)."""
        largest = study.cfg.labels_per_class[-1]
        figure = Figure(figsize=(4.2 * len(self.targets), 4.0), layout="constrained")
        FigureCanvasAgg(figure)
        for j, t in enumerate(self.targets):
            axes = figure.add_subplot(1, len(self.targets), j + 1)
            truth = self.truth[t]
            for k, ((method, model, n), preds) in enumerate(sorted(self.preds.items(), key=lambda kv: str(kv[0]))):
                if n == largest and method == "probe":
                    axes.scatter(truth, preds[0][t], s=6, alpha=0.5, color=f"C{k % 10}", label=model)
            finite = truth[np.isfinite(truth)]
            axes.plot([finite.min(), finite.max()], [finite.min(), finite.max()], color="0.4", linewidth=0.8)
            axes.set(xlabel=f"true {t}", ylabel=f"predicted {t}", title=f"{t} (probe, {largest} labels/class)")
            axes.legend(fontsize="x-small")
        return {"regression_downstream.png": figure}
