"""The anomaly task: unsupervised substructure detection in the frozen feature space.

The detector sees only no_sub training images - the no_sub samples of the N-per-class subset (the labels only
choose the normal class, and score the result). Each eval image gets two anomaly scores on features standardised
with the normal set's statistics: the mean distance to its k nearest normal neighbours (k = min(5, normals)), and
the Mahalanobis distance under the normal set's Ledoit-Wolf covariance. AUROC of no_sub against cdm, against
axion and against both, each with the study's bootstrap CI; the random-init control is scored the same way.

Encoders with a decoder - a run directory (model.pt + config.yaml) whose run trained the `recon` task - also score
each eval image by its reconstruction MSE (`recon_error` rows, metrics auroc_recon/...): the whole run model is
rebuilt (`load_run`) and fed the eval images normalised as the run's data config says. It fits nothing on the
labels, so its value is the same at every N (one repeat; the CI resamples the eval images). An exported encoder.pt,
or a run without a reconstruction head, has no decoder: those encoders lack the row.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from dlscale.data.classes import CLASSES
from dlscale.transfer.bootstrap import weighted_auc
from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize

log = logging.getLogger(__name__)
NORMAL = CLASSES.index("no_sub")
RECON = "recon_error"
SCORES = ("knn", "mahalanobis")
AGAINST = {"cdm": (CLASSES.index("cdm"),), "axion": (CLASSES.index("axion"),),
           "both": (CLASSES.index("cdm"), CLASSES.index("axion"))}
ANCHOR_SOURCE = "DeepLense unsupervised anomaly detection on older DeepLense sets, as quoted in the dlscale issue"


def anomaly_scores(normal: np.ndarray, evald: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """{"knn", "mahalanobis"}: per eval sample, higher = farther from the normal training features."""
    mean, std = normal.mean(0), normal.std(0)
    std = np.where(std > 0, std, 1.0)
    a, b = (normal - mean) / std, (evald - mean) / std
    neighbours = NearestNeighbors(n_neighbors=min(k, len(a))).fit(a)
    knn = neighbours.kneighbors(b)[0].mean(1)
    covariance = LedoitWolf().fit(a)
    return {"knn": knn, "mahalanobis": covariance.mahalanobis(b)}


def auroc_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """auroc_<score>/<against> per draw: normal (no_sub) against each anomalous set, other classes left out."""
    out = {}
    for against, classes in AGAINST.items():
        keep = (labels == NORMAL) | np.isin(labels, classes)
        for name, score in scores.items():
            out[f"auroc_{name}/{against}"] = weighted_auc(score, labels != NORMAL, counts * keep)
    return out


def decoder_run(source) -> Path | None:
    """The run directory behind `source` if its run trained a reconstruction head (else None: no decoder)."""
    if getattr(source, "path", None) is None:
        return None
    run_dir = Path(source.path).parent
    if not ((run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file()):
        return None
    from dlscale.train.config import load_config, run_tasks
    try:
        cfg = load_config(run_dir / "config.yaml", run_dir=str(run_dir))
        return run_dir if "recon" in run_tasks(cfg) else None
    except (ValueError, TypeError, KeyError) as err:
        log.warning("anomaly: %s has a run config this dlscale cannot read (%s): no reconstruction error", run_dir,
                    err)
        return None


def recon_errors(study, source, run_dir: Path) -> dict[str, np.ndarray]:
    """ids, labels, recon_mse of every eval image under the run's whole model (encoder + decoder), in id order."""
    from dlscale.data.stream import eval_loader, finish_batch
    from dlscale.collect import collect, gather
    from dlscale.train.evaluation import load_run
    run_cfg, model, _ = load_run(run_dir)
    stream = dataclasses.replace(study.stream(source), normalize=run_cfg.data.normalize, targets=[])
    device = study.device or torch.device("cpu")
    loader = eval_loader(study.cfg.eval_dir, stream, 0, 1, study.cfg.split)
    out = gather(collect(model.to(device), loader, device, torch.float32, n_examples=0,
                         finish=lambda batch: finish_batch(batch, stream, device)))
    if "recon_mse" not in out:
        raise RuntimeError(f"anomaly: the run {run_dir} collected no recon_mse although it trains recon")
    return out


@DOWNSTREAM.register
class Anomaly(DownstreamTask):
    name = "anomaly"
    needs = ("no_sub images in the train split (the normal class) and no_sub plus cdm or axion images in the eval "
             "split")
    metrics = tuple(f"auroc_{s}/{a}" for s in SCORES for a in AGAINST)
    anchors = (Anchor("auroc_knn/both", 0.932, "adversarial autoencoder", ANCHOR_SOURCE),
               Anchor("auroc_knn/both", 0.899, "VAE", ANCHOR_SOURCE),
               Anchor("auroc_knn/both", 0.730, "convolutional autoencoder", ANCHOR_SOURCE))
    note = ("fitted on the subset's no_sub training images only (labels choose the normal class and score the "
            "result); kNN and Mahalanobis distances in the frozen feature space; AUROC no_sub vs cdm / axion / both. "
            "recon_error rows: reconstruction MSE of encoders whose run has a decoder (no fit on the labels: the same "
            "at every N); encoders without a decoder have no such row")

    def __init__(self) -> None:
        self.decoders: dict[str, Path] = {}
        self.metrics = Anomaly.metrics

    def unmet(self, study) -> str | None:
        if not (study.train_labels == NORMAL).any():
            return f"{study.cfg.data_dir} has no no_sub training images"
        manifest = study.eval_manifest or study.manifest
        counts = (manifest["splits"][study.cfg.split].get("class_counts") or {})
        if counts and (not counts.get("no_sub") or not (counts.get("cdm") or counts.get("axion"))):
            return f"the {study.cfg.split} split of {study.cfg.eval_dir} lacks no_sub or substructure images"
        self.decoders = {s.label: run for s in study.sources if (run := decoder_run(s)) is not None}
        if self.decoders:
            self.metrics = Anomaly.metrics + tuple(f"auroc_recon/{a}" for a in AGAINST)
        return None

    def run(self, study) -> list[dict]:
        cfg, preds, labels = study.cfg, {}, None
        for method, model, source, init_seed in study.frozen_jobs():
            train = study.frozen_features(source, init_seed, "train")
            evald = study.frozen_features(source, init_seed, cfg.split)
            labels = evald["labels"]
            for n in cfg.labels_per_class:
                for r in study.frozen_repeats(method, n, init_seed):
                    index = study.subsets[r][n]
                    normal = train["features"][index[train["labels"][index] == NORMAL]]
                    preds.setdefault((method, model, n), []).append(anomaly_scores(normal, evald["features"]))
        normals = {n: int((study.train_labels[study.subsets[0][n]] == NORMAL).sum()) for n in cfg.labels_per_class}
        return self.recon_cells(study) + [cell(self.name, method, model, n, normals[n],
                     summarize(lambda r, counts, s=scores: auroc_metrics(s[r], labels, counts), len(scores),
                               len(labels), study))
                for (method, model, n), scores in preds.items()]

    def recon_cells(self, study) -> list[dict]:
        """One recon_error cell per (encoder with a decoder, N): AUROC of the reconstruction MSE, eval bootstrap."""
        cells = []
        for source in study.sources:
            if source.label not in self.decoders:
                continue
            out = recon_errors(study, source, self.decoders[source.label])
            score, labels = {"recon": out["recon_mse"].astype(float)}, out["labels"]
            summary = summarize(lambda r, counts: auroc_metrics(score, labels, counts), 1, len(labels), study)
            cells += [cell(self.name, RECON, source.label, n, 0, summary, [str(self.decoders[source.label])])
                      for n in study.cfg.labels_per_class]
        return cells
