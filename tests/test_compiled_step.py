"""`train.compile` and `train.channels_last` change how the training step runs, not what it computes: the same
seed, batches and steps give the same losses as the eager NCHW step, within float tolerance (inductor and
channels-last kernels may sum in another order: relative 1e-4, absolute 1e-5 per loss, over 4 optimizer steps)."""
import os
import shutil

import pytest
import torch

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
STEPS = 4


def _losses(*overrides: str, layouts: list | None = None) -> list[list[float]]:
    """The per-task losses of STEPS steps of the small CNN (recon + classification) on fixed 16x16 batches; `layouts`
    collects, per step, whether the first convolution's output was channels-last."""
    from dlscale.distributed import DistInfo
    from dlscale.train.config import load_config
    from dlscale.train.data import InMemoryStream
    from dlscale.train.deepspeed_setup import init_distributed, make_engine
    from dlscale.train.model import build_run_model
    from dlscale.train.trainer import Trainer
    cfg = load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=4",
                             "--data.num_workers=0", "--optim.warmup_steps=1", "--model.tasks=[recon,classification]",
                             *overrides], stage="multitask", data_dir="-", run_dir="-")
    info = DistInfo(0, 1, 0)
    init_distributed(info, torch.device("cpu"))
    torch.manual_seed(0)
    engine, _, _ = make_engine(build_run_model(cfg, (1, 16, 16), None), cfg, 1, torch.device("cpu"),
                               total_steps=100)
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.rand(4, 1, 16, 16, generator=g), "label": torch.tensor([0, 1, 2, k % 3]),
                "ids": torch.zeros(4, 3, dtype=torch.long)} for k in range(STEPS)]
    trainer = Trainer(cfg, info, engine, InMemoryStream(batches), batches=len(batches))
    if layouts is not None:
        first_conv = next(m for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(
            lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    return [[float(v.detach()) for v in trainer.train_step(batch)[0].values()] for batch in batches]


def test_channels_last_step_gives_the_eager_losses():
    eager_layouts, layouts = [], []
    eager = _losses(layouts=eager_layouts)
    torch.testing.assert_close(_losses("--train.channels_last=true", layouts=layouts), eager, **TOLERANCE)
    assert layouts == [True] * STEPS and eager_layouts == [False] * STEPS   # the convolutions did run NHWC


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


@pytest.mark.slow   # inductor generates and builds C++ kernels for the forward and backward: ~1 min on 2 cores
@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile (inductor) on a CPU needs a C++ compiler")
def test_compiled_step_gives_the_eager_losses():
    eager = _losses()
    compiled = _losses("--train.compile=true")
    assert compiled[0] != [] and len(compiled) == STEPS
    torch.testing.assert_close(compiled, eager, **TOLERANCE)
    torch.testing.assert_close(_losses("--train.compile=true", "--train.channels_last=true"), eager, **TOLERANCE)
