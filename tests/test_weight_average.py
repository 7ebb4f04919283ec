"""The exponential moving average of the weights (`optim.ema`): the recurrence itself, computed by hand on a tiny
model; bad values refused naming the key; and on 2 ranks, a run stopped mid-epoch and resumed exports the average of
an uninterrupted run, bitwise, which is the average its last checkpoint holds, not the last step's weights."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dlscale import preemption
from dlscale.train import checkpoint
from dlscale.train.weight_average import WeightAverage

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
DECAY = 0.9
BATCHES = 240 // (16 * 2)   # per rank and epoch on 2 ranks (the default toy set, 16-image batches)
STOP = BATCHES + 3          # mid-epoch of the second epoch
EMA = [f"--optim.ema={DECAY}", "--eval.precise_bn=-1", "--schedule.epochs=2", "--schedule.checkpoint_every=1000",
       "--optim.lr=0.05"]


def test_the_average_follows_its_recurrence_computed_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)   # frozen: not averaged
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    average = WeightAverage(model, DECAY)
    assert set(average.average) == {"0.weight", "0.bias", "1.weight"}
    expected = {k: v.double() for k, v in start.items() if k != "1.bias"}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        average.update()
        for name, p in model.named_parameters():
            if p.requires_grad:
                expected[name] = DECAY * expected[name] + (1 - DECAY) * p.detach().double()
    for name, value in expected.items():
        assert torch.allclose(average.average[name].double(), value, rtol=1e-6, atol=1e-6), name
    state = average.state_dict()
    other = WeightAverage(model, DECAY)
    other.load_state_dict(state)
    assert all(torch.equal(other.average[k], state[k]) for k in state)
    frozen = model[1].bias.detach().clone()
    other.copy_to_model()
    assert all(torch.equal(p.detach(), state[k]) for k, p in model.named_parameters() if k in state)
    assert torch.equal(model[1].bias, frozen)
    with pytest.raises(ValueError, match=r"optim\.ema: .*missing \['1\.weight'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "1.weight"})


@pytest.mark.parametrize("overrides, message", [
    (["optim.ema=1.0"], r"optim\.ema=1\.0: expected a decay in \[0, 1\)"),
    (["optim.ema=-0.5"], r"optim\.ema=-0\.5: expected a decay"),
    (["optim.ema=0.99"], r"optim\.ema=0\.99 needs eval\.precise_bn"),
])
def test_bad_ema_values_are_refused_naming_the_key(separable_data, overrides, message):
    from dlscale.train.config import load_config
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides, stage="supervised", data_dir=str(separable_data))


def test_the_study_s_regression_ema_reaches_its_runs_and_bad_values_are_refused(tmp_path, separable_data):
    from dlscale.models.backbone import EncoderConfig
    from dlscale.transfer.config import load_transfer_config
    from dlscale.transfer.tasks.regression_runs import head_options
    from dlscale.transfer.training import run_config
    cfg = load_transfer_config(None, ["task_options.regression.ema=0.999"], complete=False)
    study = SimpleNamespace(cfg=cfg, stream=lambda source: cfg.data)
    source = SimpleNamespace(path=None, architecture=EncoderConfig(name="small", width=8))
    run = run_config(study, source, "scratch", 60, tmp_path, str(separable_data), 0, "multitask", ["regression"],
                     ["theta_E"])
    run = head_options(run, cfg.options("regression"), ["theta_E"])
    assert (run.optim.ema, run.eval.precise_bn) == (0.999, -1)
    with pytest.raises(ValueError, match=r"task_options\.regression\.ema=1\.0: expected a decay"):
        load_transfer_config(None, ["task_options.regression.ema=1.0"], complete=False)
    with pytest.raises(ValueError, match=r"task_options\.regression\.ema=0\.9 needs "
                                         r"task_options\.regression\.precise_bn=true"):
        load_transfer_config(None, ["task_options.regression.ema=0.9", "task_options.regression.precise_bn=false"],
                             complete=False)


# ---- 2 ranks, stopped and resumed ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_runs(launch, venv_bin, separable_data, tiny_args, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with the average and one stopped by SIGTERM mid-epoch, then resumed."""
    root = tmp_path_factory.mktemp("ema")

    def start(name: str, *extra: str, prefix: tuple = (), log: str = ""):
        return launch([*prefix, venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT,
                       "--stage", "supervised", "--data", separable_data, "--run-dir", root / name, *tiny_args, *EMA,
                       *extra], root / f"{log or name}.log", root)
    whole = start("whole")
    stopped = start("stopped", prefix=("env", f"{preemption.DRILL}={STOP}:SIGTERM:1"))
    assert stopped.wait(TIMEOUT_S) != 0, stopped.output()[-3000:]   # torchrun's code once both ranks stopped
    resumed = start("stopped", "--resume", "auto", log="resumed")
    assert whole.wait(TIMEOUT_S) == 0, whole.output()[-3000:]
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-3000:]
    return root


@pytest.mark.slow
def test_two_ranks_resumed_mid_epoch_export_the_average_of_an_uninterrupted_run(two_rank_runs):
    root = two_rank_runs
    assert f"resumed from {checkpoint.tag_for(STOP)}" in (root / "stopped" / "log.txt").read_text()
    last = checkpoint.tag_for(2 * BATCHES)
    states = {name: torch.load(root / name / checkpoint.CHECKPOINTS / last / checkpoint.MODEL_STATES,
                               map_location="cpu", weights_only=False) for name in ("whole", "stopped")}
    average = states["whole"]["weight_average"]
    resumed = states["stopped"]["weight_average"]
    assert average.keys() == resumed.keys() and all(torch.equal(average[k], resumed[k]) for k in average)
    exported = {name: torch.load(root / name / "model.pt", weights_only=True) for name in ("whole", "stopped")}
    assert all(torch.equal(v, exported["stopped"][k]) for k, v in exported["whole"].items() if torch.is_tensor(v))
    # the exported weights are the average, not the last step's (which the checkpoint's module holds)
    encoder = [k for k in average if k.startswith("encoder.")]
    assert encoder and all(torch.equal(exported["whole"][k], average[k]) for k in encoder)
    assert any(not torch.equal(average[k], states["whole"]["module"][k]) for k in encoder)
    metrics = json.loads((root / "whole" / "metrics.json").read_text())
    assert metrics["step"] == 2 * BATCHES and metrics["precise_bn/images"] == 240
