"""The mixture simulation stream (`data.simulator.mixture`, `data.simulator.nuisance`): shares, one common shape,
instruments that stay themselves, workers and ranks, its record and evaluation set, bad input named at load, a
killed 2-rank run that resumes exactly; and label-free pretraining: the self-supervised stages never read labels."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch

from dlscale import preemption
from dlscale.configtree import from_dict
from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import finish_batch
from dlscale.sim.stream import SimulationSourceConfig, SimulationStream, prepare_eval_set, simulation_loader


def component(preset, n_pix, share=1.0, **overrides):
    return {"preset": preset, "share": share, "overrides": {"instrument.n_pix": n_pix, **overrides}}


# three instruments told apart in a batch by their (physically negligible) source sizes, a regression target
MIXTURE = {"i": component("model_i", 24, 3.0, **{"source.R_sersic": 0.24}),
           "ii": component("model_ii", 12, 2.0, **{"source.R_sersic": 0.25}),
           "iii": component("model_iii", 16, 1.0, **{"source.R_sersic": 0.26})}
SIZE_OF = {"i": 0.24, "ii": 0.25, "iii": 0.26}


def source(mixture=MIXTURE, **fields):
    return SimulationSourceConfig(mixture=copy.deepcopy(mixture), **fields)


def stream(src=None, batch_size=10, batches=4, seed=0, rank=0, world=1, workers=0, **cfg):
    cfg = StreamConfig(batch_size=batch_size, num_workers=workers, **cfg)
    return SimulationStream(src or source(), cfg, rank, world, batches, seed, "cpu")


def epoch_batches(s, epoch=0, loader=None):
    s.set_epoch(epoch)
    return list(loader(s) if loader else s)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def components_of(batch) -> list[str]:
    """The component of every image of a batch made with targets=[source_R_sersic]."""
    by_size = {round(size, 2): name for name, size in SIZE_OF.items()}
    return [by_size[round(v, 2)] for v in batch["target"][:, 0].tolist()]


def test_shares_hold_exactly_over_batches_and_classes_stay_balanced():
    s = stream(batch_size=10, batches=30, targets=["source_R_sersic"])
    batches = epoch_batches(s)
    totals = dict.fromkeys(MIXTURE, 0)
    for b in batches:
        names = components_of(b)
        for name, share in (("i", 0.5), ("ii", 1 / 3), ("iii", 1 / 6)):
            assert abs(names.count(name) - 10 * share) < 2, (int(b["ids"][0, 1]), names)
            totals[name] += names.count(name)
        index = int(b["ids"][0, 1])      # class counts as a single preset's: 3 each, the extra one rotating
        assert torch.bincount(b["label"], minlength=3).tolist() == [3 + ((j - index) % 3 < 1) for j in range(3)]
    assert totals == {"i": 150, "ii": 100, "iii": 50}


def test_shares_need_not_divide_the_batch():
    # 10 images, shares 3 : 4 (3/7 of 10 is no whole number): 4 or 5 a batch, exactly 60 / 80 in 14 batches
    src = source({"i": {**MIXTURE["i"], "share": 3}, "ii": {**MIXTURE["ii"], "share": 4}})
    batches = epoch_batches(stream(src, batch_size=10, batches=14, targets=["source_R_sersic"]))
    assert {components_of(b).count("i") for b in batches} == {4, 5}
    names = [n for b in batches for n in components_of(b)]
    assert (names.count("i"), names.count("ii")) == (60, 80)


def test_every_batch_has_the_common_side_or_data_resize():
    batches = epoch_batches(stream(normalize="none", augment=False))
    assert all(b["image"].shape == (10, 1, 24, 24) and torch.isfinite(b["image"]).all() for b in batches)
    s = stream(resize=20, resize_mode="interpolate")
    assert s.image_shape == (1, 20, 20)
    assert all(b["image"].shape == (10, 1, 20, 20) for b in epoch_batches(s))
    with pytest.raises(ValueError, match=r"data.resize=20 with resize_mode=crop: images of ii are \[1, 12, 12\]"):
        stream(resize=20, resize_mode="crop")


def ring_statistics(batches, side):
    """Per component: the flux-weighted mean distance from the centre (output pixels) and the mean absolute
    difference of neighbouring pixels per unit flux (sharpness) of raw images."""
    centre = (side - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(side) - centre, torch.arange(side) - centre, indexing="ij")
    radius = (xx ** 2 + yy ** 2).sqrt()
    values: dict[str, list] = {}
    for b in batches:
        img = b["image"][:, 0]
        flux = img.sum((1, 2))
        mean_radius = (img * radius).sum((1, 2)) / flux
        sharpness = (img[:, 1:] - img[:, :-1]).abs().sum((1, 2)) / flux
        for name, r, s in zip(components_of(b), mean_radius.tolist(), sharpness.tolist()):
            values.setdefault(name, []).append((r, s))
    return {name: torch.tensor(v).mean(0).tolist() for name, v in values.items()}


def test_each_instrument_keeps_its_pixel_scale_after_resampling():
    # fine: 40 px of 0.08"; coarse: the same field in 20 px of 0.16" (upsampled to 40); wide: 40 px of 0.16"
    def hst(n_pix, scale, size):
        return component("model_iii", n_pix, **{"instrument.pixel_scale": scale, "source.R_sersic": size})
    src = source({"i": hst(40, 0.08, 0.24), "ii": hst(20, 0.16, 0.25), "iii": hst(40, 0.16, 0.26)})
    s = stream(src, batch_size=12, batches=4, normalize="none", augment=False, targets=["source_R_sersic"])
    stats = ring_statistics(epoch_batches(s), 40)
    (fine_r, fine_sharp), (coarse_r, coarse_sharp), (wide_r, _) = stats["i"], stats["ii"], stats["iii"]
    assert 0.95 < coarse_r / fine_r < 1.05          # the same field of view: the ring at the same output radius
    assert coarse_sharp < 0.95 * fine_sharp         # ... but seen through coarser pixels
    assert 0.4 < wide_r / fine_r < 0.6              # twice the field of view: the ring at half the radius


def test_two_dataloader_workers_give_the_batches_of_none():
    src = source(nuisance={"enabled": True})
    alone = epoch_batches(stream(src, batches=5), 1)
    pooled = epoch_batches(stream(src, batches=5, workers=2), 1, loader=simulation_loader)
    assert_same(pooled, alone)
    assert len({img.numpy().tobytes() for b in pooled for img in b["image"]}) == 5 * 10


def test_ranks_draw_disjoint_global_batches_and_a_new_stream_reproduces_them():
    src = source(nuisance={"enabled": True})
    r0, r1 = epoch_batches(stream(src, rank=0, world=2), 2), epoch_batches(stream(src, rank=1, world=2), 2)
    single = epoch_batches(stream(src, batches=8), 2)
    assert_same(single[0::2], r0)
    assert_same(single[1::2], r1)
    assert len({img.numpy().tobytes() for b in single for img in b["image"]}) == 8 * 10


def test_simulation_record_regenerates_the_mixture_stream_bit_for_bit():
    s = stream(source(nuisance={"enabled": True, "shear": None}), seed=5, normalize="standardize", resize=16)
    record = json.loads(json.dumps(s.describe()))
    assert "simulator" not in record and list(record["mixture"]["components"]) == ["i", "ii", "iii"]
    assert record["mixture"]["components"]["i"]["share"] == 0.5 and record["mixture"]["side"] == 16
    assert record["mixture"]["components"]["ii"]["simulator"]["instrument"]["pixel_scale"] == 0.101
    rebuilt = SimulationStream(
        from_dict(SimulationSourceConfig, record["source"], "data.simulator."),
        StreamConfig(batch_size=record["batch_size"], normalize=record["normalize"], augment=record["augment"],
                     resize=record["resize"], resize_mode=record["resize_mode"]),
        0, record["world"], record["batches_per_epoch"], record["seed"], record["device"])
    assert_same(epoch_batches(rebuilt, 3), epoch_batches(s, 3))


def test_nuisances_are_redrawn_within_their_ranges_and_leave_other_draws_alone():
    targets = ["theta_E", "source_x", "gamma1", "exposure_time"]
    off = epoch_batches(stream(targets=targets, batches=2))
    only_theta = {"enabled": True, **{k: None for k in ("source_R_sersic", "source_position", "source_e", "shear",
                                                         "exposure_scale", "background_rms_scale",
                                                         "psf_fwhm_scale")}}
    some = epoch_batches(stream(source(nuisance=only_theta), targets=targets, batches=2))
    for a, b in zip(off, some):
        assert torch.equal(a["target"][:, 1:], b["target"][:, 1:])       # source position, shear, exposure
        assert (a["target"][:, 0] == 1.2815).all()                       # each preset's fixed theta_E
        theta = b["target"][:, 0]
        assert ((theta >= 0.8) & (theta <= 1.8)).all() and len(set(theta.tolist())) == 10
    every = epoch_batches(stream(source(nuisance={"enabled": True, "shear": (0.2, 0.3)}), targets=targets,
                                 batches=2))
    gamma = torch.cat([b["target"][:, 2] for b in every])
    assert ((gamma >= 0.2) & (gamma <= 0.3)).all()
    for a, b in zip(off, every):
        assert not torch.equal(a["image"], b["image"])


def test_the_mixture_eval_set_holds_each_class_split_by_share_and_is_reused(tmp_path, records):
    src = source(eval_per_class=6, probe_per_class=3, nuisance={"enabled": True})
    out = prepare_eval_set(src, tmp_path / "eval", samples_per_record=4)
    manifest = load_manifest(out)
    assert manifest["image_shape"] == [1, 24, 24] and manifest["source"]["kind"] == "simulator_mixture"
    assert manifest["splits"]["val"]["class_counts"] == {c: 6 for c in CLASSES}
    val = records(out, "val")
    for c in CLASSES:
        names = [s.meta["component"] for s in val if s.meta["class"] == c]
        assert (names.count("i"), names.count("ii"), names.count("iii")) == (3, 2, 1)
        psf = {s.meta["component"]: s.meta["psf_fwhm"] for s in val if s.meta["class"] == c}
        assert 0.8 * 0.16 <= psf["ii"] <= 1.25 * 0.16
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_eval_set(source(eval_per_class=6, probe_per_class=3, nuisance={"enabled": True}), out) == out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    changed = copy.deepcopy(MIXTURE)
    changed["iii"]["share"] = 2.0
    with pytest.raises(ValueError, match=r"components.iii.share: 0.16\d* there, 0.2\d* wanted"):
        prepare_eval_set(source(changed, eval_per_class=6, probe_per_class=3, nuisance={"enabled": True}), out)
    with pytest.raises(ValueError, match=r"side: 24 there, 20 wanted"):
        prepare_eval_set(source(eval_per_class=6, probe_per_class=3, nuisance={"enabled": True}), out, resize=20)


@pytest.mark.parametrize(("mixture", "nuisance", "message"), [
    ({"a": component("model_ii", 16, 0.0)}, {}, r"data.simulator.mixture.a.share = 0.0: expected a finite number > 0"),
    ({"a": component("model_ii", 16), "b": component("model_ii", 16, -1.0)}, {}, r"data.simulator.mixture.b.share"),
    ({"a": component("model_ii", 16, float("inf"))}, {}, r"data.simulator.mixture.a.share = inf"),
    ({"a": component("model_ii", 16, "half")}, {}, r"data.simulator.mixture.a.share"),
    ({"a": component("model_ii", 16), "b": component("model_iv", 16)}, {}, r"data.simulator.mixture.b.preset"),
    ({"a": component("model_ii", 0)}, {}, r"data.simulator.mixture.a.overrides .*instrument.n_pix"),
    ({"a": {"preset": "model_ii", "shares": 2}}, {}, r"data.simulator.mixture.a.shares"),
    ([component("model_ii", 16)], {}, r"data.simulator.mixture"),
    ({"a": component("model_ii", 16)}, {"theta_E": [2.0, 1.0]}, r"data.simulator.nuisance.theta_E = \(2.0, 1.0\)"),
    ({"a": component("model_ii", 16)}, {"source_e": [-0.9, 0.9]}, r"data.simulator.nuisance.source_e"),
    ({"a": component("model_ii", 16)}, {"psf_fwhm_scale": [0, 1]}, r"data.simulator.nuisance.psf_fwhm_scale"),
    ({"a": component("model_ii", 16)}, {"seeing": [1, 2]}, r"data.simulator.nuisance.seeing"),
], ids=["zero-share", "negative-share", "infinite-share", "text-share", "unknown-preset", "bad-override",
        "unknown-field", "a-list", "reversed-range", "unphysical-ellipticity", "zero-psf", "unknown-nuisance"])
def test_bad_mixture_or_nuisance_fails_at_load_naming_the_key(mixture, nuisance, message):
    with pytest.raises(ValueError, match=message):
        from_dict(SimulationSourceConfig, {"mixture": mixture, "nuisance": nuisance}, "data.simulator.")


def test_top_level_overrides_are_refused_with_a_mixture_unless_they_change_nothing():
    with pytest.raises(ValueError, match=r"data.simulator.overrides: not used with data.simulator.mixture"):
        source(overrides={"lens.randomize": True})
    assert source(overrides={"instrument.n_pix": 64}).mixture       # model_ii's own value, as --print-config lists


# ---- label-free pretraining -----------------------------------------------------------------------------------------

def loss_and_grads(model, batch, cfg):
    """Loss and every parameter's gradient of one training step of `model` on `batch` (as `Trainer.train_step`,
    without the engine)."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = finish_batch(dict(batch), cfg.data, torch.device("cpu"))
    images = batch["image"]
    losses = model.losses(model(images, batch), images, batch)
    total, _ = model.weighting(losses)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def permuted_step_differs(stage, *extra):
    """(loss equal, every gradient equal, gradients that are not zero) for one step with the batch's labels as
    drawn vs randomly permuted, from identical model copies."""
    from dlscale.train.config import load_config
    from dlscale.train.model import build_run_model
    cfg = load_config(overrides=[f"stage={stage}", "data.source=simulate", "model.encoder.name=small",
                                 "model.encoder.width=8", "data.batch_size=12", "data.num_workers=0",
                                 "data.simulator.mixture=" + json.dumps(MIXTURE), "data.resize=16",
                                 "data.simulator.nuisance.enabled=true", *extra])
    s = SimulationStream(cfg.data.simulator, cfg.data, 0, 1, 2, cfg.seed, "cpu")
    batch = s.batch(0, 1)
    permuted = dict(batch, label=batch["label"][torch.randperm(12, generator=torch.Generator().manual_seed(3))])
    assert not torch.equal(permuted["label"], batch["label"])
    torch.manual_seed(cfg.seed)
    model = build_run_model(cfg, s.image_shape, None)
    twin = copy.deepcopy(model)
    loss, grads = loss_and_grads(model, batch, cfg)
    loss_p, grads_p = loss_and_grads(twin, permuted, cfg)
    assert grads.keys() == grads_p.keys() and grads
    return (torch.equal(loss, loss_p), all(torch.equal(grads[n], grads_p[n]) for n in grads),
            sum(bool(g.abs().sum() > 0) for g in grads.values()))


@pytest.mark.parametrize("stage", ["autoencoder", "mae", "contrastive"])
def test_self_supervised_stages_never_read_the_labels(stage):
    loss_equal, grads_equal, nonzero = permuted_step_differs(stage)
    assert loss_equal and grads_equal and nonzero > 0


def test_the_label_check_sees_a_stage_that_reads_labels():
    loss_equal, grads_equal, _ = permuted_step_differs("supervised")
    assert not loss_equal and not grads_equal


# ---- 2 ranks: a killed mixture run resumes to the parameters of an uninterrupted one ------------------------------

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
BATCHES = 4
RUN_MIXTURE = ("{wide: {preset: model_i, share: 2, overrides: {instrument.n_pix: 24}}, "
               "deep: {preset: model_iii, overrides: {instrument.n_pix: 16}}}")
SIM = ["--data.source=simulate", f"--data.simulator.mixture={RUN_MIXTURE}", "--data.simulator.nuisance.enabled=true",
       "--data.resize=20", "--data.simulator.eval_per_class=12", "--data.simulator.probe_per_class=12",
       "--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=12", "--data.num_workers=0",
       "--eval.n_bootstrap=10", "--schedule.log_every=2", f"--schedule.batches_per_epoch={BATCHES}",
       "--schedule.epochs=3", "--schedule.checkpoint_every=2"]
KILL_AT_STEP = 2 * BATCHES + 3       # rank 0 SIGKILLs itself mid last epoch; step 10's checkpoint is the newest


def two_ranks(venv_bin, run_dir: Path, *extra) -> list:
    return [venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage", "autoencoder",
            "--run-dir", run_dir, *SIM, *extra]


@pytest.fixture(scope="module")
def mixture_runs(tmp_path_factory, launch, venv_bin):
    """An uninterrupted 2-rank mixture run and one SIGKILLed in its last epoch, started together."""
    root = tmp_path_factory.mktemp("mixture")
    whole = launch(two_ranks(venv_bin, root / "whole"), root / "whole.log", root)
    killed = launch(two_ranks(venv_bin, root / "killed"), root / "killed.log", root,
                    env={preemption.DRILL: f"{KILL_AT_STEP}:SIGKILL"})
    assert killed.wait(TIMEOUT_S) != 0, killed.output()[-4000:]
    assert whole.wait(TIMEOUT_S) == 0, whole.output()[-4000:]
    return root, killed


@pytest.mark.slow
def test_a_mixture_run_records_its_stream_and_evaluates_on_a_mixture_set(mixture_runs, records):
    root, _ = mixture_runs
    run = root / "whole"
    simulation = json.loads((run / "simulation.json").read_text())
    assert list(simulation["mixture"]["components"]) == ["wide", "deep"] and simulation["mixture"]["side"] == 20
    assert simulation["world"] == 2 and simulation["source"]["nuisance"]["enabled"] is True
    manifest = load_manifest(run / "eval_data")
    assert manifest["image_shape"] == [1, 20, 20] and manifest["splits"]["val"]["samples"] == 36
    names = [s.meta["component"] for s in records(run / "eval_data", "val")]
    assert (names.count("wide"), names.count("deep")) == (24, 12)
    assert json.loads((run / "metrics.json").read_text())["step"] == 3 * BATCHES


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_to_the_same_parameters(mixture_runs, launch, venv_bin):
    root, killed = mixture_runs
    run = root / "killed"
    assert re.search(rf"drill: rank 0 sends SIGKILL to itself \(pid \d+\) after step {KILL_AT_STEP}\n",
                     (run / "log.txt").read_text()), killed.output()[-3000:]
    assert int((run / "checkpoints" / "latest").read_text().strip()[4:]) == KILL_AT_STEP - 1
    resumed = launch(two_ranks(venv_bin, run, "--resume", "auto"), root / "resumed.log", root)
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-4000:]
    assert "resumed from step" in (run / "log.txt").read_text()
    assert "reusing the evaluation set" in resumed.output()
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(root / "whole" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])] == []


def test_a_bad_mixture_stops_training_before_the_run_directory_exists(cli, tmp_path):
    result = cli("train", "--stage", "autoencoder", "--run-dir", tmp_path / "run", *SIM,
                 "--data.simulator.mixture={a: {preset: model_ii, share: -2}}")
    assert result.code != 0 and "data.simulator.mixture.a.share" in result.err
    assert not (tmp_path / "run").exists()
