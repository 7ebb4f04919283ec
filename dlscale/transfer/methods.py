"""The methods of a transfer study, shared by every downstream task: how each uses an encoder."""
from __future__ import annotations

METHOD_TEXT = {
    "probe": "a linear model (logistic regression; ridge for regression targets) on the frozen encoder's pooled "
             "features",
    "finetune": "the encoder fine-tuned with a new head through the DeepSpeed engine (init_from)",
    "scratch": "the same architecture from random weights, same labels, config and budget",
    "random": "control: the same architecture at random initialisation, probed like `probe`"}
METHODS = tuple(METHOD_TEXT)
FROZEN = ("probe", "random")          # methods that fit on frozen features (cross-dataset scoring allowed)
TRAINED = ("finetune", "scratch")     # methods that train the encoder through the engine
