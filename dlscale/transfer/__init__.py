"""`dlscale transfer`: the encoder as a foundation - label efficiency of pretrained encoders (probe, fine-tune)
against the same architecture from scratch and at random initialisation, on any dataset (see `runner`)."""
from dlscale.transfer.runner import METHODS, TransferConfig, run_transfer

__all__ = ["METHODS", "TransferConfig", "run_transfer"]
