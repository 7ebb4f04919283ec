"""Fine-tune against scratch for the regression task's targets, trained through the DeepSpeed engine.

Each run trains the `regression` training task alone: stage `multitask` with `model.tasks: [regression]` (the stage
table lets a multitask run name its tasks; `supervised` trains classification only, and classification on axion
images alone would be one class). The fine-tune run starts from the encoder (`init_from`), the scratch run from the
same architecture's random weights, with the same subset, config and budget (`training.run_config`); every run
is planned as a typed training config (`PlannedRun.config`).

Targets are trained in groups carried by the same samples: the lens parameters (on every image) in one run per
(N, repeat, method, encoder), the axion mass (axion images only) in another. The training stream reads a target from
every sample's metadata and standardises it with the train split's statistics, so a group whose target is derived
(log10 of the mass) or missing on some images trains on a copied dataset (`subsets.write_samples`): the subset's
images that carry the targets, the derived values written into their metadata, and the eval split's images that
carry them; it is scored on those eval images only (NaN elsewhere, as the probe's metrics skip them). The writer
shuffles samples inside a shard, so each copied sample carries `transfer_row` (its row in the study's arrays) and the
run's predictions are put back by it. A group held by every image of both splits trains on the classification
study's label subsets (`Study.subset_dirs`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from dlscale.train.config import Config
from dlscale.transfer.samples import metadata
from dlscale.transfer.subsets import ALL, is_subset, write_samples
from dlscale.transfer.training import PlannedRun, read_scores, run_config, train_all

log = logging.getLogger(__name__)
DIHEDRAL_INVARIANT = {"log10_axion_mass", "theta_E"}   # targets rotations and flips of the image leave unchanged
ROW = "transfer_row"                 # metadata of a copied sample: its row in the study's train / eval arrays


def target_groups(train_y: dict[str, np.ndarray], eval_y: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray,
                                                                                               np.ndarray]]:
    """[(target names, train mask, eval mask)]: targets carried by exactly the same samples share one run."""
    groups: dict[tuple[bytes, bytes], list] = {}
    for name in train_y:
        train_mask, eval_mask = np.isfinite(train_y[name]), np.isfinite(eval_y[name])
        groups.setdefault((train_mask.tobytes(), eval_mask.tobytes()), [[], train_mask, eval_mask])[0].append(name)
    return [tuple(g) for g in groups.values()]


def group_data(study, names: list[str], n, r: int, index: np.ndarray, masks: tuple, values: dict,
               derived: set[str]) -> str:
    """The dataset a group's run trains on: the label subset when every image carries the targets as they are
    stored, else a copy of the carrying images with the targets written into their metadata."""
    cfg = study.cfg
    train_mask, eval_mask = masks
    if train_mask.all() and eval_mask.all() and not set(names) & derived:
        return study.subset_dirs()[(n, r)]
    where = Path(cfg.out) / "subsets" / f"regression-{'+'.join(names)}-{'all' if n == ALL else f'n{n}-r{r}'}"
    provenance = {"n_per_class": n, "repeat": 0 if n == ALL else r, "seed": cfg.seed, "targets": list(names)}
    if is_subset(where, cfg.data_dir, cfg.split, provenance):
        return str(where)
    eval_ids = values["eval_ids"]
    written = {"train": {tuple(i): j for j, i in enumerate(study.train_ids.tolist())},
               cfg.split: {tuple(i): j for j, i in enumerate(eval_ids.tolist())}}
    ys = {"train": values["train"], cfg.split: values["eval"]}

    def extra_meta(split: str, sample_id: tuple) -> dict:
        row = written[split][tuple(sample_id)]
        return {ROW: row, **{t: float(ys[split][t][row]) for t in names if t in derived}}
    log.info("writing the regression subset %s (%d training and %d %s images carrying %s)", where, len(index),
             int(eval_mask.sum()), cfg.split, ", ".join(names))
    write_samples(cfg.data_dir, {"train": study.train_ids[index], cfg.split: eval_ids[eval_mask]}, where,
                  provenance, extra_meta)
    return str(where)


def plan(study, train_y: dict, eval_y: dict, eval_ids: np.ndarray, derived: set[str]) -> list[tuple]:
    """[((method, model, N), repeat, names, eval mask, PlannedRun)] of every regression fine-tune / scratch run."""
    cfg = study.cfg
    models = study.trained_models()
    if not models:
        return []
    planned = []
    values = {"train": train_y, "eval": eval_y, "eval_ids": eval_ids}
    for names, train_mask, eval_mask in target_groups(train_y, eval_y):
        for n in cfg.labels_per_class:
            for r in range(cfg.repeats):
                index = study.subsets[r][n]
                index = index[train_mask[index]]
                if len(index) < 2:
                    raise ValueError(f"--tasks regression: {len(index)} training image(s) of N={n} carry "
                                     f"{', '.join(names)}; fine-tuning needs at least 2")
                data_dir = group_data(study, names, n, r, index, (train_mask, eval_mask), values, derived)
                for method, model, source in models:
                    run_dir = Path(cfg.out) / "runs" / model / f"regression-{'+'.join(names)}-{method}-n{n}-r{r}"
                    config = head_options(run_config(study, source, method, len(index), run_dir, data_dir,
                                                     cfg.seed + r, "multitask", ["regression"], list(names)),
                                          cfg.options("regression"), names)
                    run = PlannedRun(str(run_dir), config)
                    planned.append(((method, model, n), r, names, eval_mask, run))
    return planned


def head_options(config: Config, options, names: list[str]) -> Config:
    """A run's config with the study's regression options (`task_options.regression`): the head's loss and refit,
    precise BatchNorm statistics, the weight average, and test-time augmentation when every target of the run is invariant
    under the dihedral group. A run with a target that the group changes (e1, e2, gamma1, gamma2 change sign under
    rotations by 90 degrees and flips) trains without the dihedral augmentation: a flipped image keeps its label only
    for invariant targets."""
    invariant = set(names) <= DIHEDRAL_INVARIANT
    config.model.task_options["regression"] = dataclasses.replace(config.model.task_options["regression"],
                                                                  loss=options.loss, tta=options.tta and invariant,
                                                                  refit_head=options.refit_head)
    config.data.augment = config.data.augment and invariant
    config.eval.precise_bn = -1 if options.precise_bn else config.eval.precise_bn
    config.optim = dataclasses.replace(config.optim, ema=options.ema)
    return config.validate()


def run_trained(study, train_y: dict, eval_y: dict, eval_ids: np.ndarray, derived: set[str]) -> tuple[dict, dict]:
    """Train every planned run (one launch, finished runs reused) and read its eval predictions back.

    Returns ({(method, model, N): [per repeat {target: (n_eval,) predictions, NaN where not scored}]},
    {(method, model, N): [run dirs]})."""
    planned = plan(study, train_y, eval_y, eval_ids, derived)
    if not planned:
        return {}, {}
    cfg = study.cfg
    train_all([p[-1] for p in planned], Path(cfg.out) / "plan_regression.json", cfg.split, cfg.ranks)
    preds: dict[tuple, dict[int, dict]] = {}
    runs: dict[tuple, list[str]] = {}
    for key, r, names, eval_mask, run in planned:
        scores = read_scores(run, cfg.split)
        rows = eval_rows(study, run.config.data_dir, eval_mask)
        check_scored(run.run_dir, scores, names, {t: eval_y[t][rows] for t in names})
        repeat = preds.setdefault(key, {}).setdefault(r, {})
        for j, t in enumerate(names):
            full = np.full(len(eval_ids), np.nan)
            full[rows] = scores["regression"][:, j]
            repeat[t] = full
        runs.setdefault(key, []).append(run.run_dir)
    return {k: [v[r] for r in sorted(v)] for k, v in preds.items()}, runs


def eval_rows(study, data_dir: str, eval_mask: np.ndarray) -> np.ndarray:
    """Row in the study's eval arrays of each eval sample of `data_dir`, in its id order (the order of the run's
    scores): the eval split itself for a label subset, else each copied sample's `transfer_row`."""
    key = ("transfer_rows", data_dir)
    if key not in study.cache:
        if str(data_dir).startswith(str(Path(study.cfg.out) / "subsets" / "regression-")):
            study.cache[key] = metadata(data_dir, study.cfg.split, [ROW])[ROW].astype(int)
        else:
            study.cache[key] = np.flatnonzero(eval_mask)
    return study.cache[key]


def check_scored(run_dir: str, scores: dict, names: list[str], truth: dict[str, np.ndarray]) -> None:
    """The run scored exactly the eval images that carry its targets, in id order (its targets are theirs)."""
    target = scores.get("target")
    if target is None or len(target) != len(truth[names[0]]) or not all(
            np.allclose(target[:, j], truth[t], rtol=1e-5, atol=1e-5) for j, t in enumerate(names)):
        raise RuntimeError(f"{run_dir}: its eval predictions do not line up with the eval images carrying "
                           f"{', '.join(names)}")
