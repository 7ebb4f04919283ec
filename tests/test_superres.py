"""Super-resolution: the network starts as bicubic exactly, its scores are torchmetrics', `--stage superres` trains
from the simulator on 2 ranks, a run SIGKILLed mid-training resumes to the parameters of an uninterrupted one, and
its evaluation gives the same numbers on 1 rank as on 2."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import two_rank_command, whole_and_killed
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from dlscale.models.sr import (DegradationConfig, SRConfig, SRNet, bicubic_down, bicubic_up, degradation, sr_loss,
                               sr_scores, unit_range)

TIMEOUT_S = 300
BATCHES = 5
SIM = ["--data.source=simulate", "--data.simulator.overrides={instrument.n_pix: 32, lens.randomize: true}",
       "--data.simulator.eval_per_class=8", "--data.simulator.probe_per_class=8", "--model.encoder.name=small",
       "--model.encoder.width=8", "--data.batch_size=8", "--data.num_workers=0", "--eval.n_bootstrap=10",
       "--schedule.log_every=1", f"--schedule.batches_per_epoch={BATCHES}", "--schedule.epochs=2",
       "--schedule.checkpoint_every=2", "--optim.lr=3e-3", "--model.task_options.superres.network.channels=8",
       "--model.task_options.superres.network.blocks=1"]
KILL_AT_STEP = BATCHES + 2      # rank 0 SIGKILLs itself after step 7 of 10: step 6's checkpoint is the newest


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("guide_channels", [0, 5])
@pytest.mark.parametrize("block", ["residual", "attention"])
def test_a_fresh_network_returns_bicubic_exactly(scale, guide_channels, block):
    torch.manual_seed(0)
    net = SRNet(SRConfig(scale=scale, block=block), image_channels=1, guide_channels=guide_channels)
    low = torch.rand(3, 1, 64 // scale, 64 // scale)
    guide = torch.randn(3, guide_channels, 4, 4) if guide_channels else None
    out = net(low, guide)
    assert out.shape == (3, 1, 64, 64)
    assert torch.equal(out, bicubic_up(low, scale))


def test_a_guided_network_refuses_to_run_without_its_feature_map():
    with pytest.raises(ValueError, match="feature map"):
        SRNet(SRConfig(), guide_channels=4)(torch.rand(1, 1, 16, 16))


def test_one_training_step_moves_the_output_away_from_bicubic_and_lowers_the_loss():
    torch.manual_seed(0)
    net = SRNet(SRConfig(channels=8, blocks=1))
    high, _, _ = unit_range(torch.rand(4, 1, 32, 32))
    low = bicubic_down(high, 2)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = sr_loss(net(low), high)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and not torch.equal(net(low), bicubic_up(low, 2))


def test_scores_are_torchmetrics_psnr_and_ssim_per_image_of_the_clamped_prediction():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 32, 32, generator=generator, dtype=torch.float64)
    pred = target + 0.05 * torch.randn(3, 1, 32, 32, generator=generator, dtype=torch.float64)
    scores = sr_scores(pred, target)
    clamped = pred.clamp(0, 1)
    for i in range(3):
        psnr = PeakSignalNoiseRatio(data_range=1.0)(clamped[i:i + 1], target[i:i + 1])
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(clamped[i:i + 1], target[i:i + 1])
        assert float(scores["psnr"][i]) == pytest.approx(float(psnr), rel=1e-6)
        assert float(scores["ssim"][i]) == pytest.approx(float(ssim), rel=1e-6)
        mse = (clamped[i] - target[i]).square().mean()
        assert float(scores["psnr"][i]) == pytest.approx(float(-10 * torch.log10(mse)), rel=1e-6)


def test_the_psf_degradation_blurs_and_adds_seeded_noise():
    high = torch.zeros(1, 1, 32, 32)
    high[..., 16, 16] = 1.0
    clean = degradation(DegradationConfig(name="psf", psf_fwhm=3.0))(high, 2)
    plain = degradation(DegradationConfig())(high, 2)
    assert clean.shape == plain.shape == (1, 1, 16, 16) and clean.max() < plain.max()
    noisy = degradation(DegradationConfig(name="psf", noise_std=0.1))
    draw = [noisy(high, 2, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


@pytest.mark.parametrize(("override", "message"), [
    ("--model.task_options.superres.network.scale=3", "scale"),
    ("--model.task_options.superres.degradation.name=jpeg", "degradation"),
    ("--model.task_options.superres.loss=l3", "superres.loss"),
])
def test_bad_superres_options_fail_before_the_run_directory_exists(cli, tmp_path, override, message):
    result = cli("train", "--stage", "superres", "--run-dir", tmp_path / "run", *SIM, override)
    assert result.code != 0 and message in result.err
    assert not (tmp_path / "run").exists()


def test_images_the_scale_does_not_divide_are_refused_naming_the_option(cli, tmp_path):
    result = cli("train", "--stage", "superres", "--run-dir", tmp_path / "run", *SIM,
                 "--data.simulator.overrides={instrument.n_pix: 30}", "--model.task_options.superres.network.scale=4")
    assert result.code != 0 and "not divisible by the super-resolution scale 4" in result.err


# ---- 2 ranks, killed and resumed --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sr_runs(tmp_path_factory, launch, venv_bin):
    """An uninterrupted 2-rank superres run and one SIGKILLed mid-training, started together."""
    root = tmp_path_factory.mktemp("superres")
    return root, whole_and_killed(launch, lambda run: two_rank_command(venv_bin, "superres", run, *SIM), root,
                                  KILL_AT_STEP, TIMEOUT_S)


def test_superres_trains_on_two_ranks_and_records_psnr_and_ssim_against_bicubic(sr_runs):
    root, _ = sr_runs
    metrics = json.loads((root / "whole" / "metrics.json").read_text())
    assert metrics["step"] == 2 * BATCHES and metrics["val/n_samples"] == 24
    for key in ("val/psnr", "val/ssim", "val/psnr_bicubic", "val/ssim_bicubic"):
        assert key in metrics
    assert metrics["val/psnr"] > metrics["val/psnr_bicubic"] > 20
    assert 0 < metrics["val/ssim_bicubic"] <= 1
    scores = dict(np.load(root / "whole" / "scores_val.npz"))
    assert scores["psnr"].shape == (24,) and metrics["val/psnr"] == pytest.approx(float(scores["psnr"].mean()))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(root / "whole" / "tb"))
    tb.Reload()
    assert "val/superres_hr_lr_bicubic_sr_error" in tb.Tags()["images"]
    assert tb.Scalars("val/psnr")[-1].value == pytest.approx(metrics["val/psnr"])


def test_killed_superres_run_resumes_to_the_same_parameters(sr_runs, launch, venv_bin):
    root, killed = sr_runs
    run = root / "killed"
    assert re.search(rf"drill: rank 0 sends SIGKILL to itself \(pid \d+\) after step {KILL_AT_STEP}\n",
                     (run / "log.txt").read_text()), killed.output()[-3000:]
    assert not (run / "model.pt").exists()
    assert int((run / "checkpoints" / "latest").read_text().strip()[4:]) == KILL_AT_STEP - 1
    resumed = launch(two_rank_command(venv_bin, "superres", run, *SIM, "--resume", "auto"), root / "resumed.log", root)
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-4000:]
    assert "resumed from step" in (run / "log.txt").read_text()
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(root / "whole" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])] == []
    ours, theirs = (json.loads((r / "metrics.json").read_text()) for r in (run, root / "whole"))
    assert ours["val/psnr"] == theirs["val/psnr"] and ours["val/ssim"] == theirs["val/ssim"]


def test_one_rank_evaluates_a_two_rank_superres_run_to_the_same_scores(sr_runs, cli):
    root, _ = sr_runs
    run = root / "whole"
    trained = json.loads((run / "metrics.json").read_text())
    result = cli("eval", "--run-dir", run, "--split", "val")
    assert result.code == 0, result.err[-3000:]
    again = json.loads((run / "metrics.json").read_text())
    for key in ("val/psnr", "val/ssim", "val/psnr_bicubic", "val/ssim_bicubic"):
        assert again[key] == trained[key], key


# ---- dlscale predict on a superres run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory) -> Path:
    from dlscale.cli import main
    from runs import own_logging
    run = tmp_path_factory.mktemp("superres_one") / "run"
    with own_logging():
        assert main(["train", "--stage", "superres", "--run-dir", str(run), *SIM]) == 0
    return run


def low_resolution_files(folder: Path, n: int, side: int = 16) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = [folder / f"lens_{i:02d}.npy" for i in range(n)]
    for path in paths:
        np.save(path, rng.random((1, side, side)).astype(np.float32) * 50)
    return paths


def test_predict_writes_one_super_resolved_image_per_input_in_csv_order(one_rank_run, cli, tmp_path):
    from dlscale.data.transforms import normalize
    from dlscale.train.evaluation import load_run
    paths = low_resolution_files(tmp_path / "low", 5)
    result = cli("predict", "--run", one_rank_run, "--data", tmp_path / "low", "--out", tmp_path / "out",
                 "--workers", "0", "--batch-size", "2")
    assert result.code == 0, result.err[-3000:]
    made = np.load(tmp_path / "out" / "superres.npy")
    assert made.shape == (5, 1, 32, 32)
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]
    assert [Path(r.split(",")[0]).name for r in rows] == [p.name for p in paths]
    cfg, model, _ = load_run(one_rank_run)
    task = model.task_specs["superres"]
    for i, path in enumerate(paths):    # each row: the network on that file alone
        image = normalize(torch.from_numpy(np.load(path))[None], cfg.data.normalize)
        with torch.no_grad():
            alone = task.make_images(model.heads["superres"], image, model.eval())
        assert np.allclose(made[i], alone[0].numpy(), atol=1e-6)
    assert (tmp_path / "out" / "superres_0.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", ["size", "nan"])
def test_predict_refuses_a_bad_low_resolution_input_naming_it_and_writes_nothing(one_rank_run, cli, tmp_path, bad):
    paths = low_resolution_files(tmp_path / "low", 3)
    if bad == "size":
        np.save(paths[1], np.ones((1, 32, 32), np.float32))     # high-resolution size: not this run's input
    else:
        image = np.ones((1, 16, 16), np.float32)
        image[0, 3, 3] = np.nan
        np.save(paths[1], image)
    result = cli("predict", "--run", one_rank_run, "--data", tmp_path / "low", "--out", tmp_path / "out",
                 "--workers", "0")
    assert result.code != 0 and paths[1].name in result.err
    assert ("expects 16x16" in result.err) if bad == "size" else ("NaN/Inf" in result.err)
    assert not (tmp_path / "out" / "superres.npy").exists()


def test_predict_resizes_other_sizes_when_asked(one_rank_run, cli, tmp_path):
    paths = low_resolution_files(tmp_path / "low", 2, side=20)
    result = cli("predict", "--run", one_rank_run, "--data", tmp_path / "low", "--out", tmp_path / "out",
                 "--workers", "0", "--resize")
    assert result.code == 0, result.err[-3000:]
    assert np.load(tmp_path / "out" / "superres.npy").shape == (len(paths), 1, 32, 32)


@pytest.mark.parametrize(("values", "message"), [({"methods": ["lora"]}, "superres.methods"),
                                                 ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr")])
def test_bad_transfer_superres_options_are_refused_naming_them(values, message):
    from dlscale.transfer.tasks.superres import SuperresOptions
    with pytest.raises(ValueError, match=message):
        SuperresOptions(**values)


def test_a_fit_from_scratch_beats_bicubic_and_restores_the_thread_count():
    from dlscale.transfer.tasks.superres import SuperresOptions, fit_sr, super_resolve, torch_threads
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 32)
    blobs = torch.exp(-((x[None, :, None] - torch.rand(40, 1, 1) + 0.5) ** 2 + (x[None, None, :] - torch.rand(
        40, 1, 1) + 0.5) ** 2) / 0.02)[:, None]            # sharp Gaussian blobs: bicubic blurs them
    before = torch.get_num_threads()
    with torch_threads(1):
        net = fit_sr(blobs[:32], SuperresOptions(steps=60, batch_size=8, lr=3e-3), seed=0)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    low = bicubic_down(blobs[32:], 2)
    ours, base = sr_scores(super_resolve(net, low), blobs[32:]), sr_scores(bicubic_up(low, 2), blobs[32:])
    assert ours["psnr"].mean() > base["psnr"].mean() + 0.1
