"""Self-training the encoder after AdaBN and a head refit (`dlscale adapt-bn --head em --self-train-rounds N`).

Why: AdaBN + the EM head moves the classifier's boundary but leaves the encoder as the labelled domain trained it.
Each round here fine-tunes the adapted model on the target's images with its own pseudo-labels (the most confident
of each pseudo-class, as many per class: a class-balanced set, so one dominant pseudo-class cannot take over) beside
the labelled images with their labels (which keep the classes anchored), each domain normalised by its own batch
statistics as AdaBN normalises it at inference; then AdaBN and the head refit again on the fine-tuned encoder
(Lee 2013 for pseudo-labels; Zou et al. 2018 for class-balanced self-training in domain adaptation). The teacher of a
round is the previous round's adapted model, fixed while the round trains. The labelled images' statistics of the
fine-tuned encoder (what the refit compares the target with) are re-estimated exactly on those images.

With head `source` (`dlscale adapt-bn --self-train-rounds N` without `--head`) the trained head on AdaBN's
statistics teaches and each round keeps its fine-tuned head (measured: it helps weak starting points and costs
strong ones, so it is a choice, not a fallback for a refused refit).

A round whose refit is refused (the EM gate of `dlscale.train.target_head`: the target's clusters no longer look
like the classes) ends the self-training and the previous round's model stays. No target label is read; every
random draw comes from one seeded generator, so the result is a function of the inputs and the seed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlscale.data.views import dihedral
from dlscale.train.target_head import refit_head


@dataclass
class SelfTrainConfig:
    """Rounds of self-training after a head refit."""
    rounds: int = 0
    """rounds of pseudo-label fine-tuning, each followed by AdaBN and the head refit (0: none)"""
    steps: int = 600
    """optimiser steps per round, each one labelled and one pseudo-labelled batch"""
    lr: float = 3e-4
    """AdamW learning rate (weight decay 1e-4)"""
    keep: float = 0.3
    """per pseudo-class, the most confident `keep` x (the smallest pseudo-class's size) target images are trained on"""
    batch_size: int = 32
    """images per batch of each domain"""
    seed: int = 0
    """seeds the batches and the dihedral views"""

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.steps < 1 or self.batch_size < 1 or not 0 < self.keep <= 1 or self.lr <= 0:
            raise ValueError(f"self-training: rounds >= 0, steps >= 1, batch_size >= 1, 0 < keep <= 1 and lr > 0 "
                             f"expected (got rounds={self.rounds}, steps={self.steps}, batch_size={self.batch_size}, "
                             f"keep={self.keep}, lr={self.lr})")


@torch.no_grad()
def class_probabilities(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(images)["logits"].float(), 1) for images in batches])


def balanced_confident(probs: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, pseudo-labels) of the most confident `keep` x min(pseudo-class size) images of every pseudo-class.
    Ties in confidence are broken by index (a stable sort), so the choice is deterministic."""
    confidence, labels = probs.max(1)
    by_class = [torch.nonzero(labels == k).squeeze(1) for k in range(probs.shape[1])]
    per_class = int(min(len(i) for i in by_class) * keep)
    chosen = torch.cat([i[torch.sort(confidence[i], descending=True, stable=True).indices[:per_class]]
                        for i in by_class])
    return chosen, labels[chosen]


def fine_tune(teacher: nn.Module, source_images: torch.Tensor, labels: torch.Tensor, target_images: torch.Tensor,
              pseudo_labels: torch.Tensor, st: SelfTrainConfig, generator: torch.Generator,
              progress: bool) -> nn.Module:
    """A copy of `teacher` trained on labelled and pseudo-labelled batches, each domain in its own forward pass."""
    student = copy.deepcopy(teacher).train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=st.lr, weight_decay=1e-4)
    for _ in tqdm(range(st.steps), desc="self-training", disable=not progress):
        loss = 0.0
        for images, targets in ((source_images, labels), (target_images, pseudo_labels)):
            rows = torch.randint(len(images), (st.batch_size,), generator=generator, device=images.device)
            logits = student(dihedral(images[rows], generator))["logits"]
            loss = loss + nn.functional.cross_entropy(logits.float(), targets[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval()


def self_train(head: str, adapted: nn.Module, source_batches: list[torch.Tensor], labels: np.ndarray,
               target_batches: list[torch.Tensor], st: SelfTrainConfig, adapt_statistics,
               progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """`st.rounds` rounds from `adapted` (target statistics, `head` refitted); returns the last kept model and one
    report per round. `adapt_statistics(model, batches)` re-estimates a model's BatchNorms on `batches` (AdaBN)."""
    source_images = torch.cat(source_batches)
    generator = torch.Generator(source_images.device).manual_seed(st.seed)
    source_labels = torch.as_tensor(labels, dtype=torch.long, device=source_images.device)
    target_images = torch.cat(target_batches)
    model, reports = adapted, []
    for _ in range(st.rounds):
        chosen, pseudo_labels = balanced_confident(class_probabilities(model, target_batches), st.keep)
        if len(chosen) == 0:
            reports.append({"pseudo_labelled": 0, "kept": False})
            break
        student = fine_tune(model, source_images, source_labels, target_images[chosen], pseudo_labels, st,
                            generator, progress)
        labelled_side = copy.deepcopy(student)
        adapt_statistics(labelled_side, source_batches)
        adapt_statistics(student, target_batches)
        report = {"pseudo_labelled": len(chosen), **refit_head(head, student, labelled_side, source_batches, labels,
                                                             target_batches)}
        reports.append(report)
        if not report.get("kept", True):
            break
        model = student
    return model, reports
