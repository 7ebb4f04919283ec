"""The open engine: a task, a stage and a loss weighting defined here, in the test file, with no library edit,
train on 2 real ranks (gloo); a weighting's hooks are called as documented (epoch end with all-reduced means,
`backward` replacing the default); a training step runs on a given engine and stream.

This file is also the launch script of its own 2-rank run: `torchrun ... tests/test_registry.py --stage toy ...`
imports it (registering the parts below) and calls `dlscale.train.main`.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlscale.models.heads import global_pool
from dlscale.train.stages import Stage, register_stage
from dlscale.train.tasks import Task, register_task
from dlscale.train.weighting import LossWeighting, register_weighting

RECORDS = "TOY_WEIGHTING_RECORDS"     # where each rank's toy weighting writes what its hooks received
TIMEOUT_S = 300


@register_task
class Brightness(Task):
    """Predict each image's mean pixel value from the pooled features (needs no labels)."""
    name = "brightness"

    def build_head(self) -> nn.Module:
        return nn.Linear(self.ctx.encoder_channels, 1)

    def forward(self, head, feature_map, images, batch, model):
        return {"brightness": head(global_pool(feature_map)).squeeze(1)}

    def loss(self, out, images, batch):
        return F.mse_loss(out["brightness"].float(), images.float().mean(dim=(1, 2, 3)))

    def collect(self, out, images, batch):
        return {"brightness": out["brightness"]}


register_stage("toy", Stage(("classification", "brightness"), "classification plus mean brightness"))


@register_weighting
class Recording(LossWeighting):
    """Weights 1; doubles the loss in its own backward; records every hook call (per rank) for the test."""
    name = "recording"

    def __init__(self, tasks, options=None):
        super().__init__(tasks)
        self.local_sums, self.local_count, self.backward_calls, self.epochs = {t: 0.0 for t in tasks}, 0, 0, []

    def forward(self, losses):
        for task in self.tasks:
            self.local_sums[task] += float(losses[task].detach())
        self.local_count += 1
        return self.weighted_sum(losses, self.weights)

    def end_epoch(self, mean_losses):
        local = {t: v / self.local_count for t, v in self.local_sums.items()}
        self.epochs.append({"received": dict(mean_losses), "local": local})
        self.local_sums, self.local_count = {t: 0.0 for t in self.tasks}, 0
        self._write()

    def backward(self, engine, losses, total, images, batch):
        self.backward_calls += 1
        engine.backward(2.0 * total)
        self._write()

    def _write(self):
        if os.environ.get(RECORDS):
            rank = dist.get_rank() if dist.is_initialized() else 0
            Path(os.environ[RECORDS], f"rank{rank}.json").write_text(json.dumps(
                {"epochs": self.epochs, "backward_calls": self.backward_calls}))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, launch, venv_bin, separable_data, tiny_args):
    root = tmp_path_factory.mktemp("toy")
    records = root / "records"
    records.mkdir()
    os.environ[RECORDS] = str(records)
    try:
        started = launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", Path(__file__),
                          "--stage", "toy", "--data", separable_data, "--run-dir", root / "run", *tiny_args,
                          "--schedule.epochs=2", "--loss.method=recording"], root / "torchrun.log", root)
        code = started.wait(TIMEOUT_S)
    finally:
        del os.environ[RECORDS]
    assert code == 0, started.output()[-4000:]
    return root / "run", records


def test_a_task_and_stage_defined_in_a_test_file_train_on_two_ranks(toy_run):
    run_dir, _ = toy_run
    log = (run_dir / "log.txt").read_text()
    assert "stage toy, tasks classification+brightness" in log and "2 rank(s)" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/n_samples"] == 61 and 0.0 <= metrics["val/auc_macro"] <= 1.0
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert "heads.brightness.weight" in state and "heads.classification.linear.weight" in state
    import dlscale
    assert dlscale.load_encoder(run_dir).dlscale["stage"] == "toy"


def test_epoch_end_hook_receives_the_all_reduced_epoch_means(toy_run):
    _, records = toy_run
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["epochs"]) for r in ranks] == [2, 2]
    for epoch in range(2):
        received = [r["epochs"][epoch]["received"] for r in ranks]
        local = [r["epochs"][epoch]["local"] for r in ranks]
        assert received[0] == pytest.approx(received[1], rel=1e-12)
        assert local[0] != local[1]   # the ranks saw different batches
        assert received[0] == pytest.approx({t: (local[0][t] + local[1][t]) / 2 for t in local[0]}, rel=1e-9)


def test_backward_hook_replaces_the_default_on_every_step(toy_run):
    run_dir, records = toy_run
    steps = json.loads((run_dir / "metrics.json").read_text())["step"]
    assert steps > 0
    assert [json.loads((records / f"rank{r}.json").read_text())["backward_calls"] for r in (0, 1)] == [steps, steps]


def test_a_training_step_runs_on_a_given_engine_and_stream():
    from dlscale.distributed import DistInfo
    from dlscale.train.config import load_config
    from dlscale.train.deepspeed_setup import init_distributed, make_engine
    from dlscale.train.data import InMemoryStream
    from dlscale.train.trainer import Trainer
    from dlscale.train.model import build_run_model
    cfg = load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=4",
                             "--data.num_workers=0", "--loss.method=recording", "--optim.warmup_steps=1"],
                      stage="toy", data_dir="-", run_dir="-")
    info = DistInfo(0, 1, 0)
    init_distributed(info, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 16, 16), None)
    engine, _, _ = make_engine(model, cfg, 1, torch.device("cpu"), total_steps=10)
    batch = {"image": torch.rand(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, 0]),
             "ids": torch.zeros(4, 3, dtype=torch.long)}
    trainer = Trainer(cfg, info, engine, InMemoryStream([batch]), batches=1)
    before = {k: v.clone() for k, v in engine.module.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        expected = engine.module.losses(engine.module(batch["image"], batch), batch["image"], batch)
    losses, total = trainer.train_step(batch)
    losses, total = {k: float(v.detach()) for k, v in losses.items()}, float(total.detach())
    assert losses == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-5)
    assert total == pytest.approx(sum(losses.values()), rel=1e-5) and trainer.weights == {"classification": 1.0,
                                                                                            "brightness": 1.0}
    assert trainer.sync() == pytest.approx({"total": total, **losses}, rel=1e-6)   # the window's means
    assert engine.module.weighting.backward_calls == 1 and engine.global_steps == 1
    changed = [k for k, v in engine.module.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("heads.brightness") for k in changed) and any(k.startswith("encoder") for k in changed)


if __name__ == "__main__":
    from dlscale.train import main
    sys.exit(main())
