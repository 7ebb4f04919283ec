"""Transfer studies: pretrained encoders on downstream tasks with few labels (`dlscale transfer`)."""
from dlscale.transfer.config import TransferConfig, load_transfer_config
from dlscale.transfer.methods import METHODS
from dlscale.transfer.runner import run_transfer

__all__ = ["METHODS", "TransferConfig", "load_transfer_config", "run_transfer"]
