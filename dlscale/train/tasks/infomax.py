"""Information maximisation on the unlabelled target domain (task `shot`, stage adapt), after SHOT (Liang et al.
2020, "Do we really need to access the source data? Source hypothesis transfer for unsupervised domain
adaptation"): the source classifier (the hypothesis) is kept, and the encoder learns target features that it
classifies confidently (each target image's prediction has low entropy) and diversely (the batch's mean prediction
has high entropy, so the confident answers do not all fall on one class):

    loss = mean_x H(p(x)) + diversity * (log K - H(mean_x p(x)))        (>= 0; 0: confident and balanced)

optionally plus SHOT's self-supervised pseudo-labels (`cluster_weight`): class centroids of the target features
weighted by the predictions, each image labelled by its nearest centroid (cosine), one refinement round, and
cross-entropy to those labels. SHOT computes the centroids over the whole target set once per epoch; here they are
the batch's (no pass outside the training step, nothing to checkpoint).

Why it suits an instrument shift: it starts where AdaBN ends. With `model.domain_batchnorm=separate` the target
images pass the encoder (and the classifier's standardisation) alone, normalised by their own statistics as AdaBN's
are, and the run starts from the source model (`init_from` a source-only run, with the classifier fitted to its
features before the first step: `model.task_options.classification.probe_init=true`). The labelled images keep
their cross-entropy (task `classification`), so the labelled domain keeps its accuracy.

With `freeze_classifier` (SHOT's frozen hypothesis) this task's gradient reaches the encoder only; the classifier
learns from the labelled images alone. No randomness, no state: a resumed run continues exactly. Target labels are
never read: the batch does not carry them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlscale.models.model import TARGET_DOMAIN, running_stats_kept
from dlscale.train.tasks.adaptation import target_features
from dlscale.train.tasks.base import Task, register_task


@dataclass
class InfoMaxConfig:
    diversity: float = 1.0
    """weight of the diversity term, log K - H(mean prediction) (0: entropy minimisation alone, which may put every
    target image in one class)"""
    cluster_weight: float = 0.0
    """weight of SHOT's nearest-centroid pseudo-labels' cross-entropy (0: information maximisation alone, SHOT-IM)"""
    freeze_classifier: bool = True
    """the classifier gets no gradient from this task (SHOT's frozen source hypothesis); false: it learns from the
    target's entropy too"""

    def __post_init__(self) -> None:
        if self.diversity < 0 or self.cluster_weight < 0:
            raise ValueError(f"model.task_options.shot: expected diversity >= 0 and cluster_weight >= 0 (got "
                             f"{self.diversity}, {self.cluster_weight})")


def information_maximisation(logits: torch.Tensor, diversity: float) -> torch.Tensor:
    """Mean prediction entropy + diversity x (log K - entropy of the mean prediction) of (B, K) logits."""
    log_p = F.log_softmax(logits.float(), 1)
    entropy = -(log_p.exp() * log_p).sum(1).mean()
    mean = log_p.exp().mean(0)
    return entropy + diversity * (math.log(logits.shape[1]) + (mean * mean.clamp_min(1e-12).log()).sum())


@torch.no_grad()
def centroid_labels(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """SHOT's pseudo-labels of (B, C) features: centroids weighted by (B, K) predictions, each feature labelled by
    its nearest centroid in cosine distance; then the centroids of those hard labels, and the nearest again."""
    x = F.normalize(features.float(), dim=1)
    weights = probs.float()
    for _ in range(2):
        centroids = F.normalize(weights.T @ x / weights.sum(0).clamp_min(1e-8)[:, None], dim=1)
        labels = (x @ centroids.T).argmax(1)
        weights = F.one_hot(labels, probs.shape[1]).float()
    return labels


@register_task
class SHOT(Task):
    """Information maximisation (+ optional nearest-centroid pseudo-labels) of the run's classifier on the target
    images (reported: the whole loss, 0 when the target predictions are confident and balanced)."""
    name = "shot"
    Config = InfoMaxConfig
    batch_keys = (TARGET_DOMAIN,)

    def build_head(self) -> nn.Module:
        return nn.Identity()

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to adapt
            return {}
        if "classification" not in model.heads:
            raise ValueError("task shot maximises the information of the run's classifier on the target: add task "
                             "classification (model.tasks=[classification,shot,...])")
        o = self.ctx.options or InfoMaxConfig()
        classifier = model.heads["classification"]
        features = target_features(batch)
        with running_stats_kept(classifier):   # its standardisation's running statistics stay the labelled ones
            if o.freeze_classifier:
                frozen = {k: v.detach() for k, v in classifier.state_dict(keep_vars=True).items()}
                logits = torch.func.functional_call(classifier, frozen, (features,))
            else:
                logits = classifier(features)
        out = {"shot_logits": logits}
        if o.cluster_weight:
            out["shot_labels"] = centroid_labels(features, torch.softmax(logits.float(), 1))
        return out

    def loss(self, out, images, batch):
        o = self.ctx.options or InfoMaxConfig()
        loss = information_maximisation(out["shot_logits"], o.diversity)
        if o.cluster_weight:
            loss = loss + o.cluster_weight * F.cross_entropy(out["shot_logits"].float(), out["shot_labels"])
        return loss
