"""The classification task: today's label-efficiency study of `dlscale transfer` (see `runner`)."""
from __future__ import annotations

from dlscale.transfer.tasks import DOWNSTREAM
from dlscale.transfer.tasks.base import DownstreamTask


@DOWNSTREAM.register
class Classification(DownstreamTask):
    name = "classification"
    needs = "a train split holding every class (no_sub, cdm, axion), N of each"
    metrics = ("auc_macro", "accuracy")
    note = ("3-class substructure classification: logistic-regression probe on frozen features, fine-tune and "
            "scratch runs through the DeepSpeed engine, random-init control (the table above)")

    def run(self, study) -> list[dict]:
        from dlscale.transfer.runner import run_classification
        return run_classification(study)
