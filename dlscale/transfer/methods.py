"""The methods of a transfer study, shared by every downstream task: how each uses an encoder.

A frozen method fits on the encoder's frozen features; a trained one is a training run through the DeepSpeed engine
under the study's shared budget, and declares here what it changes in the run's training config (the runs are
planned from these fields by `training.run_config`, never by the method's name).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    text: str
    """what the method does, for the report"""
    frozen: bool = False
    """fits on frozen features (probe, random): cross-dataset scoring allowed"""
    pretrained: bool = True
    """starts from the trained encoder's weights (one run per encoder; scratch: one per architecture), its encoder
    at `budget.finetune_encoder_lr_scale`"""
    probe_head: bool = False
    """the new heads start from the probes fitted on the subset's frozen features (LP-FT): logistic regression for
    the classification head, ridge for the regression head (`probe_init` of the training task's options)"""
    layer_decay: bool = False
    """the encoder learns with layer-wise learning-rate decay `budget.layer_decay`"""
    freeze_stages: bool = False
    """the encoder's first `budget.freeze_stages` layer groups stay frozen"""
    adapters: bool = False
    """only LoRA adapters of rank `budget.lora_rank` on the encoder (a ViT's attention) and the heads train"""
    semi_supervised: bool = False
    """semi-supervised multi-task (stage multitask): beside the downstream task's heads, which learn from the
    subset's labels, the tasks of `budget.unlabelled_tasks` learn from every image of the study's train split,
    labelled or not, read as the unlabelled stream `data.target` (default: a decoder rebuilds them)"""


METHOD_TABLE = {
    "probe": Method("a linear model (logistic regression; ridge for regression targets) on the frozen encoder's "
                    "pooled features", frozen=True),
    "finetune": Method("the encoder fine-tuned with a new head through the DeepSpeed engine (init_from)"),
    "scratch": Method("the same architecture from random weights, same labels, config and budget", pretrained=False),
    "random": Method("control: the same architecture at random initialisation, probed like `probe`", frozen=True,
                     pretrained=False),
    "lpft": Method("linear probe, then fine-tune (Kumar et al. 2022): the new head starts from the probe fitted on "
                   "the subset's frozen features (ridge for regression targets), then the whole model is fine-tuned",
                   probe_head=True),
    "layer_decay": Method("fine-tuned with layer-wise learning-rate decay (BEiT, Bao et al. 2022): the encoder's "
                          "layer group d from the output learns at budget.layer_decay^d of the head's rate",
                          layer_decay=True),
    "partial": Method("partial fine-tuning: the encoder's first budget.freeze_stages layer groups frozen, the rest "
                      "and the head trained", freeze_stages=True),
    "lora": Method("LoRA adapters (Hu et al. 2022, rank-stabilised) of rank budget.lora_rank on the ViT encoder's "
                   "attention projections train with the new head, every pretrained weight frozen", adapters=True),
    "multitask": Method("the encoder fine-tuned with a new head on the subset's labels while the tasks of "
                        "budget.unlabelled_tasks learn from every train image, labelled or not (semi-supervised "
                        "multi-task; by default a decoder rebuilds them: reconstruction regularises the encoder beyond "
                        "the labels)", semi_supervised=True),
    "multitask_scratch": Method("`multitask` from random weights: classification on the subset's labels, the "
                                "unlabelled tasks on every train image", pretrained=False, semi_supervised=True),
}
METHOD_TEXT = {name: m.text for name, m in METHOD_TABLE.items()}
METHODS = tuple(METHOD_TABLE)
FROZEN = tuple(name for name, m in METHOD_TABLE.items() if m.frozen)      # fit on frozen features
TRAINED = tuple(name for name, m in METHOD_TABLE.items() if not m.frozen)  # train through the engine
DEFAULT_METHODS = ("probe", "finetune", "scratch", "random")
"""What a study runs unless `methods` says otherwise (the newer methods cost a run each per subset)."""
