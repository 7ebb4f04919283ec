"""What every downstream task of a transfer study shares: the config, the data, the encoders, the label subsets,
the frozen features (computed once per encoder) and the eval split's truth.

For every N labels per class, `repeats` seeded, nested label subsets of the train split (`subsets`); at N = all a
frozen fit is deterministic, so it has one repeat, the other methods repeat with other seeds. `eval_data` scores
the frozen-encoder methods on another dataset's eval split (cross-dataset transfer), the subsets still drawn from
`data_dir`'s train split.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream_config import StreamConfig
from dlscale.models.adapters import LoRAConfig, add_adapters
from dlscale.train.deepspeed_setup import pick_device
from dlscale.train.preflight import check_manifest
from dlscale.transfer import features as feats
from dlscale.transfer.config import TransferConfig
from dlscale.transfer.methods import METHOD_TABLE, TRAINED
from dlscale.transfer.subsets import (ALL, check_sizes, is_subset, nested_subsets, subset_name, train_index,
                                     write_subset)
from dlscale.transfer.tasks import resolve_tasks

log = logging.getLogger(__name__)


@dataclass
class Study:
    """What the tasks share: the config, data, encoders, subsets and the eval split's truth."""
    cfg: TransferConfig
    manifest: dict
    sources: list[feats.EncoderSource]
    train_ids: np.ndarray
    train_labels: np.ndarray
    subsets: list[dict]                  # per repeat: {N: indices into the train split}
    device: object = None
    budget: dict = field(default_factory=dict)    # N -> {"epochs", "batches_per_epoch", "batch_size", "ranks"}
    tasks: list = field(default_factory=list)     # DownstreamTask instances, in the order they run
    cache: dict = field(default_factory=dict)     # (model, init seed, split) -> frozen features; task caches
    eval_manifest: dict | None = None

    def frozen_features(self, source: feats.EncoderSource, init_seed: int | None, split: str, encoder=None) -> dict:
        """Features of `split` (train: the training data; else the eval data) by the trained encoder or the random
        initialisation `init_seed`, computed once per study and shared by every task."""
        key = (source.label if init_seed is None else source.arch_label, init_seed, split)
        if key not in self.cache:
            encoder = encoder if encoder is not None else self.encoder(source, init_seed)
            what = f"{key[0]} ({'trained' if init_seed is None else f'random init {init_seed}'})"
            data = self.cfg.data_dir if split == "train" else self.cfg.eval_dir
            out = feats.features(encoder, data, self.stream(source), split, what, self.device)
            if split == "train" and not np.array_equal(out["ids"], self.train_ids):
                raise RuntimeError(f"{what}: the train features cover other samples than the train split's index")
            self.cache[key] = out
        return self.cache[key]

    def encoder(self, source: feats.EncoderSource, init_seed: int | None):
        """The trained encoder, or the architecture at the random initialisation of repeat `init_seed`."""
        if init_seed is None:
            return feats.load_weights(source)
        return feats.random_encoder(source, self.cfg.seed + init_seed)

    @property
    def architectures(self) -> dict[str, feats.EncoderSource]:
        out: dict[str, feats.EncoderSource] = {}
        for s in self.sources:
            out.setdefault(s.arch_label, s)
        return out

    def stream(self, source: feats.EncoderSource) -> StreamConfig:
        """The stream of the probes and runs: the study's `data`, normalised as the encoder was (or as forced)."""
        return dataclasses.replace(self.cfg.data, normalize=self.cfg.normalize or source.normalize)

    def repeats(self, method: str, n) -> range:
        return range(1 if (method == "probe" and n == ALL) else self.cfg.repeats)

    def n_train(self, n) -> int:
        """Labelled images of N per class (the whole train split at N = all)."""
        return len(self.train_labels) if n == ALL else n * len(CLASSES)

    def frozen_jobs(self, methods=("probe", "random")) -> list[tuple]:
        """(method, model label, source, init seed or None) of every frozen-encoder fit the study's methods ask
        for: each trained encoder (`probe`) and each architecture at `repeats` random initialisations (`random`)."""
        cfg, jobs = self.cfg, []
        if "probe" in cfg.methods and "probe" in methods:
            jobs += [("probe", s.label, s, None) for s in self.sources]
        if "random" in cfg.methods and "random" in methods:
            jobs += [("random", label, s, r) for label, s in self.architectures.items() for r in range(cfg.repeats)]
        return jobs

    def frozen_repeats(self, method: str, n, init_seed: int | None) -> list[int]:
        """The repeats a frozen fit covers: every subset for a trained encoder (one at N = all, where the fit is
        deterministic), the repeat of its own initialisation for a random one."""
        return list(self.repeats(method, n)) if init_seed is None else [init_seed]

    def trained_models(self) -> list[tuple]:
        """(method, model label, source) of every training run of the study's methods: per trained encoder for a
        method that starts from it (finetune, lpft, ...), per architecture for one that does not (scratch)."""
        jobs = []
        for method in TRAINED:
            if method in self.cfg.methods:
                jobs += [(method, s.label, s) for s in self.sources] if METHOD_TABLE[method].pretrained else \
                    [(method, a, s) for a, s in self.architectures.items()]
        return jobs

    def subset_dirs(self) -> dict:
        """{(N, repeat): dataset directory} of the training methods (the source itself at N = all)."""
        cfg, out = self.cfg, Path(self.cfg.out) / "subsets"
        dirs = {}
        for r in range(cfg.repeats):
            for n in cfg.labels_per_class:
                if n == ALL:
                    dirs[(n, r)] = cfg.data_dir
                    continue
                where = out / subset_name(n, r)
                provenance = {"n_per_class": n, "repeat": r, "seed": cfg.seed}
                if not is_subset(where, cfg.data_dir, cfg.split, provenance):
                    log.info("writing the label subset %s (%d per class, repeat %d)", where, n, r)
                    write_subset(cfg.data_dir, self.train_ids[self.subsets[r][n]], where, cfg.split, provenance)
                dirs[(n, r)] = str(where)
        return dirs


def prepare(cfg: TransferConfig) -> Study:
    """Check everything that can be checked before any work: data, encoders and their input size, subset sizes,
    the tasks the data can serve."""
    manifest = load_manifest(cfg.data_dir)
    check_manifest(cfg.data_dir, manifest, ("train", cfg.split))
    eval_manifest = manifest
    if cfg.eval_data:
        eval_manifest = load_manifest(cfg.eval_data)
        check_manifest(f"--eval-data {cfg.eval_data}", eval_manifest, (cfg.split,))
    sources = feats.load_sources(cfg.encoders)
    for source in sources:
        feats.check_input(source, manifest["image_shape"], cfg.data, cfg.data_dir)
        if cfg.eval_data:
            feats.check_input(source, eval_manifest["image_shape"], cfg.data, cfg.eval_data)
        if not source.trained_on:
            log.warning("encoder %s: neither its metadata nor a config.yaml beside it says what it was trained on",
                        source.path)
    check_adapters(cfg, sources)
    ids, labels = train_index(cfg.data_dir)
    check_sizes(cfg.labels_per_class, labels, cfg.data_dir)
    subsets = [nested_subsets(labels, cfg.labels_per_class, cfg.seed, r) for r in range(cfg.repeats)]
    study = Study(cfg, manifest, sources, ids, labels, subsets, pick_device(cfg.device), eval_manifest=eval_manifest)
    study.tasks = resolve_tasks(study)
    return study


def check_adapters(cfg: TransferConfig, sources: list[feats.EncoderSource]) -> None:
    """A method with LoRA adapters (lora) needs encoders that have the layers to put them on: refused before any
    training, naming the encoder."""
    adapted = [m for m in cfg.methods if METHOD_TABLE[m].adapters]
    for source in sources if adapted else []:
        try:
            add_adapters(feats.random_encoder(source, 0), LoRAConfig(rank=cfg.budget.lora_rank),
                         source.architecture.name)
        except ValueError as err:
            raise ValueError(f"methods {','.join(adapted)}: encoder {source.label} ({source.path}): {err}") from None
