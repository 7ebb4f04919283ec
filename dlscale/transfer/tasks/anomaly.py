"""The anomaly task: unsupervised substructure detection in the frozen feature space.

The detector sees only no_sub training images - the no_sub samples of the N-per-class subset (the labels only
choose the normal class, and score the result). Each eval image gets four anomaly scores on features standardised
with the normal set's statistics:

    knn          mean distance to its k nearest normal neighbours (k = min(5, normals)), pooled output features
    mahalanobis  Mahalanobis distance under the normal set's Ledoit-Wolf covariance, pooled output features
    stages       the Mahalanobis distance of every encoder stage's pooled features (`dlscale.models.layer_groups`: each
                 CNN stage, each ViT block), squared and divided by the stage's width, summed over the stages: a
                 substructure perturbation is small-scale, and the early stages still see small scales that the
                 pooled output has averaged away (Rippel et al. 2020 sum per-level Gaussian distances likewise)
    svdd         Deep SVDD (Ruff et al. 2018): a bias-free MLP on the standardised stage features trained, on the
                 normal images only, to pull them to a fixed centre; the score is the squared distance to it

AUROC of no_sub against cdm, against axion and against both, each with the study's bootstrap CI; the random-init
control is scored the same way. `anomaly_scores.png` shows each score's histogram per class.

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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors
from torch import nn
from tqdm import tqdm

from dlscale.collect import collect, gather
from dlscale.data.classes import CLASSES
from dlscale.data.stream import eval_loader
from dlscale.data.transforms import finish_batch
from dlscale.train.config import load_config, run_tasks
from dlscale.train.evaluation import load_run
from dlscale.transfer import features as feats
from dlscale.transfer.bootstrap import weighted_auc
from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize

log = logging.getLogger(__name__)
NORMAL = CLASSES.index("no_sub")
RECON = "recon_error"
SCORES = ("knn", "mahalanobis", "stages", "svdd")
AGAINST = {"cdm": (CLASSES.index("cdm"),), "axion": (CLASSES.index("axion"),),
           "both": (CLASSES.index("cdm"), CLASSES.index("axion"))}
ANCHOR_SOURCE = ("https://github.com/DeepLense-Unsupervised/unsupervised-lensing (Results/README.md, ML4SCI "
                 "DeepLense): AUC of each autoencoder's reconstruction error, no substructure against substructure, "
                 "on the older DeepLense Model A data")
SVDD_WIDTH, SVDD_DIM, SVDD_EPOCHS = 128, 32, 300


def standardized(normal: np.ndarray, evald: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets standardised with the normal set's mean and standard deviation."""
    mean, std = normal.mean(0), normal.std(0)
    std = np.where(std > 0, std, 1.0)
    return (normal - mean) / std, (evald - mean) / std


def anomaly_scores(normal: np.ndarray, evald: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """{"knn", "mahalanobis"}: per eval sample, higher = farther from the normal training features."""
    a, b = standardized(normal, evald)
    neighbours = NearestNeighbors(n_neighbors=min(k, len(a))).fit(a)
    knn = neighbours.kneighbors(b)[0].mean(1)
    covariance = LedoitWolf().fit(a)
    return {"knn": knn, "mahalanobis": covariance.mahalanobis(b)}


def stage_scores(normal: list[np.ndarray], evald: list[np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """{"stages", "svdd"} of per-stage features (one (N, C_s) array per stage, input to output)."""
    total = np.zeros(len(evald[0]))
    pairs = [standardized(a, b) for a, b in zip(normal, evald)]
    for a, b in pairs:
        total += LedoitWolf().fit(a).mahalanobis(b) / a.shape[1]
    a, b = (np.concatenate(parts, axis=1) for parts in zip(*pairs))
    return {"stages": total, "svdd": deep_svdd(a, b, seed)}


def deep_svdd(normal: np.ndarray, evald: np.ndarray, seed: int) -> np.ndarray:
    """Squared distance of each eval sample to the centre a bias-free MLP maps the normal samples around, after
    training the MLP (full batch, Adam) to shrink the normal samples' distances. No bias terms and a fixed centre
    (the initial mean) keep the map from collapsing onto the centre for every input (Ruff et al. 2018)."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(normal.shape[1], SVDD_WIDTH, bias=False), nn.LeakyReLU(),
                        nn.Linear(SVDD_WIDTH, SVDD_DIM, bias=False))
    for layer in (net[0], net[2]):
        nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=generator)
    x, y = torch.as_tensor(normal, dtype=torch.float32), torch.as_tensor(evald, dtype=torch.float32)
    with torch.no_grad():
        centre = net(x).mean(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    for _ in range(SVDD_EPOCHS):
        optimizer.zero_grad()
        (net(x) - centre).square().sum(1).mean().backward()
        optimizer.step()
    with torch.no_grad():
        return (net(y) - centre).square().sum(1).double().numpy()


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
    try:
        cfg = load_config(run_dir / "config.yaml", run_dir=str(run_dir))
        return run_dir if "recon" in run_tasks(cfg) else None
    except (ValueError, TypeError, KeyError) as err:
        log.warning("anomaly: %s has a run config this dlscale cannot read (%s): no reconstruction error", run_dir,
                    err)
        return None


def recon_errors(study, source, run_dir: Path) -> dict[str, np.ndarray]:
    """ids, labels, recon_mse of every eval image under the run's whole model (encoder + decoder), in id order."""
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
    anchors = (Anchor("auroc_recon/both", 0.932, "adversarial autoencoder (reconstruction error)", ANCHOR_SOURCE),
               Anchor("auroc_recon/both", 0.899, "VAE (reconstruction error)", ANCHOR_SOURCE),
               Anchor("auroc_recon/both", 0.730, "convolutional autoencoder (reconstruction error)", ANCHOR_SOURCE))
    note = ("fitted on the subset's no_sub training images only (labels choose the normal class and score the "
            "result); kNN and Mahalanobis distances of the pooled frozen features, the summed per-stage "
            "Mahalanobis distances (stages) and Deep SVDD on the stage features (svdd); AUROC no_sub vs cdm / "
            "axion / both. "
            "recon_error rows: reconstruction MSE of encoders whose run has a decoder (no fit on the labels: the same "
            "at every N); encoders without a decoder have no such row")

    def __init__(self) -> None:
        self.decoders: dict[str, Path] = {}
        self.metrics = Anomaly.metrics
        self.preds: dict = {}            # (method, model, N) -> [per repeat {score: (n_eval,)}]
        self.labels: np.ndarray | None = None

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
        for method, model, source, init_seed in tqdm(study.frozen_jobs(), desc="anomaly", unit="encoder"):
            train = study.frozen_features(source, init_seed, "train")
            evald = study.frozen_features(source, init_seed, cfg.split)
            train_stages, eval_stages = (self.stage_features(study, source, init_seed, split)
                                         for split in ("train", cfg.split))
            labels = evald["labels"]
            for n in cfg.labels_per_class:
                for r in study.frozen_repeats(method, n, init_seed):
                    index = study.subsets[r][n]
                    normal = index[train["labels"][index] == NORMAL]
                    scores = anomaly_scores(train["features"][normal], evald["features"])
                    scores.update(stage_scores([x[normal] for x in train_stages], eval_stages, cfg.seed + r))
                    preds.setdefault((method, model, n), []).append(scores)
        self.preds, self.labels = preds, labels
        normals = {n: int((study.train_labels[study.subsets[0][n]] == NORMAL).sum()) for n in cfg.labels_per_class}
        return self.recon_cells(study) + [cell(self.name, method, model, n, normals[n],
                     summarize(lambda r, counts, s=scores: auroc_metrics(s[r], labels, counts), len(scores),
                               len(labels), study))
                for (method, model, n), scores in preds.items()]

    @staticmethod
    def stage_features(study, source, init_seed: int | None, split: str) -> list[np.ndarray]:
        """Per stage (input to output, the pooled output last), the (N, C_s) features of `split` by the trained
        encoder or the random initialisation `init_seed`, in id order (computed once per study)."""
        key = ("anomaly_stages", source.label if init_seed is None else source.arch_label, init_seed, split)
        if key not in study.cache:
            encoder = study.encoder(source, init_seed)
            data = study.cfg.data_dir if split == "train" else study.cfg.eval_dir
            out = feats.features(encoder, data, study.stream(source), split, f"{key[1]} stages", study.device,
                                 feats.stage_modules(encoder))
            if not np.array_equal(out["ids"], study.frozen_features(source, init_seed, split)["ids"]):
                raise RuntimeError(f"anomaly: the stage features of {key[1]} cover other samples than its features")
            study.cache[key] = np.split(out["features"], np.cumsum(out["widths"])[:-1], axis=1)
        return study.cache[key]

    def figures(self, study, cells: list[dict]) -> dict:
        """anomaly_scores.png: the first trained encoder's (else the first model's) scores at the largest N."""
        largest = study.cfg.labels_per_class[-1]
        keys = sorted((k for k in self.preds if k[2] == largest), key=lambda k: (k[0] != "probe", k[1]))
        return {"anomaly_scores.png": score_histograms(keys[0], self.preds[keys[0]][0], self.labels)} if keys else {}

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


def score_histograms(key: tuple, scores: dict[str, np.ndarray], labels: np.ndarray) -> Figure:
    """Each score's histogram per class (no_sub, cdm, axion) for the cell `key` (method, model, N), one panel per
    score, log10 of the scores where all are positive (distances span decades)."""
    figure = Figure(figsize=(3.6 * len(scores), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for j, (name, score) in enumerate(scores.items()):
        axes = figure.add_subplot(1, len(scores), j + 1)
        positive = bool((score > 0).all())
        values = np.log10(score) if positive else score
        bins = np.histogram_bin_edges(values, bins=40)
        for c, class_name in enumerate(CLASSES):
            axes.hist(values[labels == c], bins=bins, histtype="step", density=True, color=f"C{c}",
                      label=class_name)
        axes.set(xlabel=f"log10 {name} score" if positive else f"{name} score", ylabel="density", title=name)
        axes.legend(fontsize="x-small")
    figure.suptitle(f"Anomaly scores of the eval split: {key[1]} {key[0]}, {key[2]} labels per class "
                    "(normal: no_sub)")
    return figure
