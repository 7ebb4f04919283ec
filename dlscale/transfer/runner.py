"""A transfer study: how well do pretrained encoders do with few labels, against the same architecture from scratch.

For every N labels per class and R seeded, nested label subsets of the train split (`subsets`), four methods, each
scored on the whole eval split:

    probe     logistic regression (and ridge for `targets`) on the frozen encoder's features of the subset
    finetune  the encoder trained on the subset through the DeepSpeed engine (init_from; stage supervised, or
              multitask classification + regression with `targets`)
    scratch   the same architecture from random weights, same subset, same config and budget (epochs x batches)
    random    the control: the same architecture at random initialisation, probed like `probe`

Probe features are computed once per encoder (once per repeat for `random`) over the whole train split and subset
in memory. At N = all the probe is deterministic, so it has one repeat; the other methods repeat with other seeds.
Those four methods are the `classification` task; `tasks` (default `all`: every registered task the data can
serve) adds other downstream tasks (`dlscale.transfer.tasks`: regression, anomaly, superres, or any registered
one), each fitted on the same subsets and scored with the same bootstrap, every cell naming its `task`.
`eval_data` scores the frozen-encoder methods on another dataset's eval split (cross-dataset transfer), the
subsets still drawn from `data_dir`'s train split.
Training budget: `epochs` x max(`min_batches_per_epoch`, N_train / (batch x ranks)) batches, warm-up a tenth of it.
A fine-tune run's encoder learns at `finetune_encoder_lr_scale` times the learning rate (its new head at the
full rate). `overrides` (training config settings, dotted keys with typed values: what `dlscale transfer
--section.key=value` says) come last and win. Each run is planned as typed settings (`PlannedRun`), never as
command-line strings.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.train.preflight import check_manifest
from dlscale.transfer import features as feats
from dlscale.transfer.scoring import probe_classifier, probe_regressor, summarize_cell
from dlscale.transfer.tasks.superres import SuperresOptions
from dlscale.transfer.subsets import ALL, check_sizes, nested_subsets, subset_name, train_index, write_subset
from dlscale.transfer.training import PlannedRun, read_scores, train_all

log = logging.getLogger(__name__)
METHODS = ("probe", "finetune", "scratch", "random")
RESERVED_KEYS = ("stage", "data_dir", "run_dir", "init_from")
CI_TEXT = ("95% percentile interval of a two-level bootstrap: each of {b} draws resamples the repeats (subsets, or "
           "seeds at N = all) with replacement and the eval samples once for all of them, then averages the metric "
           "over the drawn repeats")


@dataclass
class TransferConfig:
    encoders: list[str]
    data_dir: str
    out: str
    labels_per_class: list[int | str] = field(default_factory=lambda: [10, 100, 1000, ALL])
    repeats: int = 3
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    split: str = "val"
    epochs: int = 10
    targets: list[str] = field(default_factory=list)
    ranks: int = 1                        # fine-tune / scratch ranks (1: in this process; more: torchrun)
    seed: int = 0
    n_bootstrap: int = 1000
    min_batches_per_epoch: int = 5
    overrides: dict[str, Any] = field(default_factory=dict)   # training config settings: {"section.key": value}
    tasks: list[str] = field(default_factory=lambda: ["all"])   # downstream tasks; all: every one the data allow
    eval_data: str | None = None          # score on this dataset's eval split (cross-dataset transfer)
    regression_targets: list[str] = field(default_factory=list)   # regression task (default: what the data vary)
    superres: SuperresOptions = field(default_factory=SuperresOptions)   # the super-resolution task's options
    finetune_encoder_lr_scale: float = 1.0   # fine-tune runs: the pretrained encoder's lr as a multiple of the head's

    @property
    def eval_dir(self) -> str:
        return self.eval_data or self.data_dir

    def validate(self) -> "TransferConfig":
        if not self.encoders:
            raise ValueError("--encoder: give at least one encoder.pt or run directory")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods {','.join(self.methods)}: expected some of {','.join(METHODS)}")
        if self.repeats < 1 or self.epochs < 1 or self.ranks < 1 or self.n_bootstrap < 0:
            raise ValueError("--repeats, --epochs and --ranks must be >= 1, --n-bootstrap >= 0")
        if not self.labels_per_class:
            raise ValueError("--labels-per-class: give at least one N (or 'all')")
        if not self.tasks:
            raise ValueError("--tasks: give at least one downstream task (or 'all')")
        if self.eval_data and {"finetune", "scratch"} & set(self.methods):
            raise ValueError("--eval-data scores the frozen-encoder methods (probe, random) on other data; fine-tune "
                             "and scratch runs evaluate on their own data: use --methods probe,random")
        if self.finetune_encoder_lr_scale <= 0:
            raise ValueError(f"--finetune-encoder-lr-scale {self.finetune_encoder_lr_scale}: expected a multiple > 0")
        if not isinstance(self.superres, SuperresOptions):
            raise ValueError(f"superres: expected SuperresOptions, got {type(self.superres).__name__}")
        reserved = sorted({key.split(".")[0] for key in self.overrides} & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"override --{reserved[0]}=...: transfer sets {', '.join(RESERVED_KEYS)} itself")
        return self


@dataclass
class Study:
    """What the methods share: the config, data, encoders, subsets and the eval split's truth."""
    cfg: TransferConfig
    manifest: dict
    train_cfg: object
    sources: list[feats.EncoderSource]
    train_ids: np.ndarray
    train_labels: np.ndarray
    subsets: list[dict]                  # per repeat: {N: indices into the train split}
    device: object = None
    truth: dict | None = None
    preds: dict = field(default_factory=dict)     # (method, model, N) -> [per-repeat predictions]
    runs: dict = field(default_factory=dict)      # (method, model, N) -> [run dirs]
    budget: dict = field(default_factory=dict)    # N -> {"epochs", "batches_per_epoch", "batch_size", "ranks"}
    tasks: list = field(default_factory=list)     # DownstreamTask instances, in the order they run
    cache: dict = field(default_factory=dict)     # (model, init seed, split) -> frozen features
    eval_manifest: dict | None = None

    def frozen_features(self, source: feats.EncoderSource, init_seed: int | None, split: str, encoder=None) -> dict:
        """Features of `split` (train: the training data; else the eval data) by the trained encoder or the random
        initialisation `init_seed`, computed once per study and shared by every task."""
        key = (source.label if init_seed is None else source.arch_label, init_seed, split)
        if key not in self.cache:
            from dlscale.transfer.tasks.base import encoder_of
            encoder = encoder if encoder is not None else encoder_of(self, source, init_seed)
            what = f"{key[0]} ({'trained' if init_seed is None else f'random init {init_seed}'})"
            data = self.cfg.data_dir if split == "train" else self.cfg.eval_dir
            out = feats.features(encoder, data, self.stream(source), split, what, self.device)
            if split == "train" and not np.array_equal(out["ids"], self.train_ids):
                raise RuntimeError(f"{what}: the train features cover other samples than the train split's index")
            self.cache[key] = out
        return self.cache[key]

    @property
    def architectures(self) -> dict[str, feats.EncoderSource]:
        out: dict[str, feats.EncoderSource] = {}
        for s in self.sources:
            out.setdefault(s.arch_label, s)
        return out

    def stream(self, source: feats.EncoderSource):
        """The stream config of the probes: the training config's, with the encoder's normalisation unless set."""
        if "data.normalize" in self.cfg.overrides or "normalize" in (self.cfg.overrides.get("data") or {}):
            if self.train_cfg.data.normalize != source.normalize:
                log.warning("data.normalize=%s, encoder %s was trained with %s", self.train_cfg.data.normalize,
                            source.label, source.normalize)
            return self.train_cfg.data
        return dataclasses.replace(self.train_cfg.data, normalize=source.normalize)

    def repeats(self, method: str, n) -> range:
        return range(1 if (method == "probe" and n == ALL) else self.cfg.repeats)

    def add(self, method: str, model: str, n, pred: dict, eval_ids: np.ndarray, what: str) -> None:
        if self.truth is None:
            self.truth = {k: v for k, v in pred.items() if k in ("ids", "labels", "target")}
        if not np.array_equal(eval_ids, self.truth["ids"]):
            raise RuntimeError(f"{what}: scored other {self.cfg.split} samples than the rest of the study")
        self.preds.setdefault((method, model, n), []).append(
            {k: v for k, v in pred.items() if k in ("probs", "regression")})


def training_config(cfg: TransferConfig):
    from dlscale.train.build import build_config
    extra = {"data.targets": list(cfg.targets)} if cfg.targets else {}
    return build_config(None, {**extra, **cfg.overrides}, stage="supervised", data_dir=cfg.data_dir,
                        run_dir=str(Path(cfg.out) / "runs"))


def prepare(cfg: TransferConfig) -> Study:
    """Check everything that can be checked before any work: data, encoders and their input size, subset sizes."""
    cfg.validate()
    manifest = load_manifest(cfg.data_dir)
    check_manifest(cfg.data_dir, manifest, ("train", cfg.split))
    eval_manifest = manifest if not cfg.eval_data else check_eval_data(cfg)
    train_cfg = training_config(cfg)
    sources = feats.load_sources(cfg.encoders)
    for source in sources:
        feats.check_input(source, manifest["image_shape"], train_cfg.data, cfg.data_dir)
        if cfg.eval_data:
            feats.check_input(source, eval_manifest["image_shape"], train_cfg.data, cfg.eval_data)
        if not source.trained_on:
            log.warning("encoder %s: neither its metadata nor a config.yaml beside it says what it was trained on",
                        source.path)
    ids, labels = train_index(cfg.data_dir)
    check_sizes(cfg.labels_per_class, labels, cfg.data_dir)
    subsets = [nested_subsets(labels, cfg.labels_per_class, cfg.seed, r) for r in range(cfg.repeats)]
    from dlscale.train.deepspeed_setup import pick_device
    study = Study(cfg, manifest, train_cfg, sources, ids, labels, subsets, pick_device(train_cfg.device),
                  eval_manifest=eval_manifest)
    from dlscale.transfer.tasks import resolve_tasks
    study.tasks = resolve_tasks(study)
    return study


def check_eval_data(cfg: TransferConfig) -> dict:
    """The cross-dataset eval data: the eval split and the classes of the training data."""
    manifest = load_manifest(cfg.eval_data)
    check_manifest(f"--eval-data {cfg.eval_data}", manifest, (cfg.split,))
    return manifest


def run_probes(study: Study) -> None:
    """`probe` (trained encoders) and `random` (random initialisations) on every subset."""
    cfg, jobs = study.cfg, []
    if "probe" in cfg.methods:
        jobs += [("probe", s.label, s, None) for s in study.sources]
    if "random" in cfg.methods:
        jobs += [("random", label, s, r) for label, s in study.architectures.items() for r in range(cfg.repeats)]
    for method, model, source, init_seed in tqdm(jobs, desc="probes", unit="encoder"):
        what = f"{model} ({'trained' if init_seed is None else f'random init {init_seed}'})"
        train = study.frozen_features(source, init_seed, "train")
        evald = study.frozen_features(source, init_seed, cfg.split)
        for n in cfg.labels_per_class:
            repeats = study.repeats(method, n) if init_seed is None else [init_seed]
            for r in repeats:
                index = study.subsets[r][n]
                pred = {"ids": evald["ids"], "labels": evald["labels"], "probs": probe_classifier(
                    train["features"][index], train["labels"][index], evald["features"], CLASSES, cfg.seed)}
                if cfg.targets:
                    pred["target"] = evald["target"]
                    pred["regression"] = probe_regressor(train["features"][index], train["target"][index],
                                                         evald["features"])
                study.add(method, model, n, pred, evald["ids"], what)


def subset_dirs(study: Study) -> dict:
    """{(N, repeat): dataset directory} of the training methods (the source itself at N = all)."""
    cfg, out = study.cfg, Path(study.cfg.out) / "subsets"
    dirs = {}
    for r in range(cfg.repeats):
        for n in cfg.labels_per_class:
            if n == ALL:
                dirs[(n, r)] = cfg.data_dir
                continue
            where = out / subset_name(n, r)
            provenance = {"n_per_class": n, "repeat": r, "seed": cfg.seed}
            if not _is_subset(where, cfg.data_dir, cfg.split, provenance):
                log.info("writing the label subset %s (%d per class, repeat %d)", where, n, r)
                write_subset(cfg.data_dir, study.train_ids[study.subsets[r][n]], where, cfg.split, provenance)
            dirs[(n, r)] = str(where)
    return dirs


def _is_subset(where: Path, data_dir: str, split: str, provenance: dict) -> bool:
    try:
        manifest = load_manifest(where)
    except (FileNotFoundError, ValueError):
        return False
    source = manifest.get("source") or {}
    return split in manifest["splits"] and source.get("of") == str(data_dir) and \
        all(source.get(k) == v for k, v in provenance.items())


def plan_runs(study: Study) -> list[tuple[tuple, PlannedRun]]:
    """((method, model, N), run) for every fine-tune and scratch run, with the shared budget."""
    cfg, out = study.cfg, Path(study.cfg.out) / "runs"
    dirs = subset_dirs(study)
    batch = study.train_cfg.data.batch_size
    stage = "multitask" if cfg.targets else "supervised"
    tasks = {"model.tasks": ["classification", "regression"], "loss.method": "fixed"} if cfg.targets else {}
    models = ([("finetune", s.label, s) for s in study.sources] if "finetune" in cfg.methods else []) + \
        ([("scratch", a, s) for a, s in study.architectures.items()] if "scratch" in cfg.methods else [])
    planned = []
    for n in cfg.labels_per_class:
        budget = budget_settings(cfg, len(study.train_labels) if n == ALL else n * len(CLASSES), batch)
        for r in range(cfg.repeats):
            for method, model, source in models:
                targets = {"data.targets": list(cfg.targets)} if cfg.targets else {}
                gentle = {"optim.encoder_lr_scale": cfg.finetune_encoder_lr_scale} if method == "finetune" else {}
                settings = {**targets, **source.settings(), **budget, "seed": cfg.seed + r, **tasks, **gentle,
                            **cfg.overrides}
                run = PlannedRun(str(out / model / f"{method}-n{n}-r{r}"), dirs[(n, r)], stage,
                                 str(source.path) if method == "finetune" else None, settings)
                planned.append(((method, model, n), run))
        if planned and n not in study.budget:
            study.budget[n] = resolved_budget(planned[-1][1], cfg.ranks)
    return planned


def budget_settings(cfg: TransferConfig, n_train: int, batch: int, classification: bool = True) -> dict[str, Any]:
    """The shared training budget of a fine-tune or scratch run on `n_train` images: `epochs` x max(floor,
    N_train / (batch x ranks)) batches, warm-up a tenth; evaluation on the eval split without bootstrap. A run with
    a classification head has the probe read all `n_train` labelled images, so the head is refitted to their
    eval-mode features as in any training run (`classification.refit_head`; without it 2 of 3 label subsets ended
    with most no_sub images called cdm, accuracy 0.58-0.61 at macro AUC 0.93); a regression-only run, which may
    hold one class, has no probe."""
    batches = max(cfg.min_batches_per_epoch, n_train // (batch * cfg.ranks))
    return {"schedule.epochs": cfg.epochs, "schedule.batches_per_epoch": batches,
            "optim.warmup_steps": max(1, cfg.epochs * batches // 10), "eval.split": cfg.split,
            "eval.probe_samples": n_train if classification else 0, "eval.n_bootstrap": 0,
            "schedule.checkpoint_every": 0, "schedule.keep_checkpoints": 1}


def resolved_budget(run: PlannedRun, ranks: int) -> dict:
    """Epochs, batches per epoch and batch of a planned run, read from its typed config (the settings given by
    `overrides` included)."""
    c = run.config()
    return {"epochs": c.schedule.epochs, "batches_per_epoch": c.schedule.batches_per_epoch,
            "batch_size": c.data.batch_size, "ranks": ranks}


def run_training(study: Study) -> None:
    planned = plan_runs(study)
    if not planned:
        return
    train_all([run for _, run in planned], Path(study.cfg.out) / "plan.json", study.cfg.split, study.cfg.ranks)
    for key, run in planned:
        scores = read_scores(run, study.cfg.split)
        study.add(*key, scores, scores["ids"], run.run_dir)
        study.runs.setdefault(key, []).append(run.run_dir)


def summarize(study: Study) -> list[dict]:
    """One record per (method, model, N): per-repeat metrics, mean, CI, the runs behind it."""
    cfg, cells = study.cfg, []
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted(study.preds, key=lambda k: (cfg.labels_per_class.index(k[2]), order[k[0]], k[1]))
    for method, model, n in tqdm(keys, desc="bootstrap", unit="cell", leave=False):
        summary = summarize_cell(study.preds[(method, model, n)], study.truth, CLASSES, cfg.targets,
                                 cfg.n_bootstrap, cfg.seed)
        cells.append({"task": "classification", "method": method, "model": model, "n_per_class": n,
                      "n_train": len(study.train_labels) if n == ALL else n * len(CLASSES),
                      **summary, "runs": study.runs.get((method, model, n), [])})
    return cells


def run_transfer(cfg: TransferConfig) -> dict:
    """The whole study; writes report.md, label_efficiency.png, results.json (and the regression figure) in
    `cfg.out` and returns the results record."""
    from dlscale.transfer.report import write_outputs
    study = prepare(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    cells = []
    for task in study.tasks:
        log.info("downstream task %s", task.name)
        cells += task.run(study)
    return write_outputs(study, cells, CI_TEXT.format(b=cfg.n_bootstrap))


def run_classification(study: Study) -> list[dict]:
    """The classification task: probes, fine-tune and scratch runs, one cell per (method, model, N)."""
    run_probes(study)
    if {"finetune", "scratch"} & set(study.cfg.methods):
        run_training(study)
    return summarize(study)
