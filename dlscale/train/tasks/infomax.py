"""Information maximisation on the unlabelled target domain (task `shot`, stage adapt), after SHOT (Liang et al.
2020, "Do we really need to access the source data? Source hypothesis transfer for unsupervised domain
adaptation"): the source classifier (the hypothesis) is kept, and the encoder learns target features that it
classifies confidently (each target image's prediction has low entropy) and diversely (the batch's mean prediction
has high entropy, so the confident answers do not all fall on one class):

    loss = mean_x H(p(x)) + diversity * (log K - H(mean_x p(x)))        (>= 0; 0: confident and balanced)

SHOT's second part, pseudo-labels from the nearest class centroid of the target features, is left out: lensing
images' pooled features do not cluster by class (their variance is the lens's, the class a faint direction), so on
the instrument shift those labels were right for half of the images where the classifier was right for 73%.

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
from dlscale.train.tasks.adaptation import require_classifier, target_features
from dlscale.train.tasks.base import Task, register_task


@dataclass
class InfoMaxConfig:
    diversity: float = 1.0
    """weight of the diversity term, log K - H(mean prediction) (0: entropy minimisation alone, which may put every
    target image in one class)"""
    freeze_classifier: bool = True
    """the classifier gets no gradient from this task (SHOT's frozen source hypothesis); false: it learns from the
    target's entropy too"""

    def __post_init__(self) -> None:
        if self.diversity < 0:
            raise ValueError(f"model.task_options.shot.diversity={self.diversity}: expected >= 0")


def information_maximisation(logits: torch.Tensor, diversity: float) -> torch.Tensor:
    """Mean prediction entropy + diversity x (log K - entropy of the mean prediction) of (B, K) logits."""
    log_p = F.log_softmax(logits.float(), 1)
    entropy = -(log_p.exp() * log_p).sum(1).mean()
    mean = log_p.exp().mean(0)
    return entropy + diversity * (math.log(logits.shape[1]) + (mean * mean.clamp_min(1e-12).log()).sum())


@register_task
class SHOT(Task):
    """Information maximisation of the run's classifier on the target images (reported: the loss, 0 when the
    target predictions are confident and balanced)."""
    name = "shot"
    Config = InfoMaxConfig
    batch_keys = (TARGET_DOMAIN,)

    def build_head(self) -> nn.Module:
        return nn.Identity()

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to adapt
            return {}
        classifier = require_classifier(model, self.name)
        o = self.ctx.options or InfoMaxConfig()
        features = target_features(batch)
        with running_stats_kept(classifier):   # its standardisation's running statistics stay the labelled ones
            if o.freeze_classifier:
                frozen = {k: v.detach() for k, v in classifier.state_dict(keep_vars=True).items()}
                logits = torch.func.functional_call(classifier, frozen, (features,))
            else:
                logits = classifier(features)
        return {"shot_logits": logits}

    def loss(self, out, images, batch):
        return information_maximisation(out["shot_logits"], (self.ctx.options or InfoMaxConfig()).diversity)
