"""No host synchronisation inside a training step: dlscale's own code reads nothing back from the device (and starts
no collective) in `Trainer.train_step`; the losses, the non-finite flag and the loss weights are read once per
logging interval (`Trainer.sync`), whatever the loss weighting.

A host read is a call of Tensor.item / tolist / cpu / numpy / __float__ / __int__ / __bool__, a collective one of
torch.distributed's, each counted when the calling frame is dlscale's (DeepSpeed's engine internals are not ours to
remove, and bench/engine.py measures them)."""
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dlscale

PACKAGE = str(Path(dlscale.__file__).parent)
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "barrier", "broadcast_object_list")


@contextmanager
def counting_host_reads():
    """Yields a list that collects 'name at file:line' for every host read or collective made from dlscale code."""
    seen: list[str] = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                seen.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(*args, **kwargs)
        return original, counted

    patched = [(torch.Tensor, name, *wrap(torch.Tensor, name)) for name in READS] + \
              [(dist, name, *wrap(dist, name)) for name in COLLECTIVES]
    for owner, name, _, counted in patched:
        setattr(owner, name, counted)
    try:
        yield seen
    finally:
        for owner, name, original, _ in patched:
            setattr(owner, name, original)


def _trainer(method: str, stage: str = "multitask"):
    from dlscale.distributed import DistInfo
    from dlscale.train.config import load_config
    from dlscale.train.data import InMemoryStream
    from dlscale.train.deepspeed_setup import init_distributed, make_engine
    from dlscale.train.trainer import Trainer
    from dlscale.train.model import build_run_model
    cfg = load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=4",
                             "--data.num_workers=0", f"--loss.method={method}", "--optim.warmup_steps=1",
                             "--model.tasks=[recon,classification]"], stage=stage, data_dir="-", run_dir="-")
    info = DistInfo(0, 1, 0)
    init_distributed(info, torch.device("cpu"))
    torch.manual_seed(0)
    engine, _, _ = make_engine(build_run_model(cfg, (1, 16, 16), None), cfg, 1, torch.device("cpu"),
                               total_steps=100)
    batches = [{"image": torch.rand(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, k % 3]),
                "ids": torch.zeros(4, 3, dtype=torch.long)} for k in range(6)]
    return Trainer(cfg, info, engine, InMemoryStream(batches), batches=len(batches)), batches


@pytest.mark.parametrize("method", ["fixed", "uncertainty", "dwa", "famo"])
def test_a_training_step_reads_nothing_back_to_the_host(method):
    trainer, batches = _trainer(method)
    trainer.train_step(batches[0])            # first step: lazy set-up (FAMO's state on the device, ...)
    with counting_host_reads() as seen:
        for batch in batches[1:]:
            trainer.train_step(batch)
    assert seen == [], f"{method}: host reads inside a step: {seen}"
    with counting_host_reads() as seen:        # the logging interval reads them: the counter does count
        means = trainer.sync()
        weights = {task: float(w) for task, w in trainer.weights.items()}
    assert seen and set(means) == {"total", "recon", "classification"} and set(weights) == set(means) - {"total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in means.values())


def test_a_non_finite_loss_is_caught_at_the_next_read_naming_its_step():
    from dlscale.train.trainer import NonFiniteLossError
    trainer, batches = _trainer("fixed")
    trainer.train_step(batches[0])
    poisoned = {**batches[1], "image": torch.full((4, 1, 16, 16), float("nan")),
                "ids": torch.tensor([[0, 0, 7], [0, 0, 8], [0, 0, 9], [0, 0, 10]])}
    trainer.train_step(poisoned)              # step 1: nothing raised inside the step
    trainer.train_step(batches[2])
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss at step 1 .* starts with \['in-memory sample 0:0:7', "):
        trainer.sync()


def test_the_window_means_are_the_steps_losses():
    trainer, batches = _trainer("fixed")
    values = []
    for batch in batches[:3]:
        losses, total = trainer.train_step(batch)
        values.append([float(total.detach()), *(float(v.detach()) for v in losses.values())])
    means = trainer.sync()
    expected = torch.tensor(values, dtype=torch.float64).mean(0).tolist()
    assert [means[k] for k in ("total", "recon", "classification")] == pytest.approx(expected, rel=1e-6)
    assert trainer.sync()["total"] == 0.0      # an empty window after the read
