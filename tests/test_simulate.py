"""The simulator against lenstronomy (the physics reference) on the same parameters, plus its CLI and config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.cosmology import FlatLambdaCDM
from lenstronomy.Data.imaging_data import ImageData
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.SimulationAPI.sim_api import SimAPI

from dlscale.data.classes import CLASSES
from dlscale.data.shards import MANIFEST, decode_record, load_manifest, verify
from dlscale.sim import LensParams, LensSimulator, SimulatorConfig, load_config, preset_config, simulate_main
from dlscale.sim.config import CosmologyConfig
from dlscale.sim.physics import (add_line_deflections, add_point_mass_deflections, add_shear_deflection,
                                 deflection_scale, einstein_radius_arcsec, lensing_distances_mpc, sersic_ellipse,
                                 sie_deflection)
from dlscale.data.tario import iter_records

F64_TOL, F32_TOL = 1e-5, 2e-5          # max |ours - lenstronomy| / peak


def small_config(preset: str = "model_i", n_pix: int = 33, **lens) -> SimulatorConfig:
    config = preset_config(preset)
    config.instrument.n_pix = n_pix
    for key, value in lens.items():
        setattr(config.lens, key, value)
    return config


def col(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(-1, 1)


def point_masses(p: LensParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta_E, x, y) of every point mass of a batch, (B, K)."""
    if p.vortex_points:
        x, y = p.vortex_positions()
        return p.vortex_theta_E[:, None].expand_as(x), x, y
    return p.subhalo_theta_E, p.subhalo_x, p.subhalo_y


def lens_kwargs(p: LensParams, b: int) -> tuple[list[str], list[dict], list[dict]]:
    theta_E, x, y = point_masses(p)
    kwargs = [dict(theta_E=p.theta_E[b].item(), e1=p.e1[b].item(), e2=p.e2[b].item(), center_x=p.center_x[b].item(),
                   center_y=p.center_y[b].item()), dict(gamma1=p.gamma1[b].item(), gamma2=p.gamma2[b].item())]
    kwargs += [dict(theta_E=t, center_x=cx, center_y=cy) for t, cx, cy in zip(theta_E[b].tolist(), x[b].tolist(),
                                                                              y[b].tolist())]
    source = [dict(amp=p.source_amp[b].item(), R_sersic=p.source_R_sersic[b].item(),
                   n_sersic=p.source_n_sersic[b].item(), e1=p.source_e1[b].item(), e2=p.source_e2[b].item(),
                   center_x=p.source_x[b].item(), center_y=p.source_y[b].item())]
    return ["SIE", "SHEAR"] + ["POINT_MASS"] * theta_E.shape[1], kwargs, source


def lenstronomy_image(sim: LensSimulator, p: LensParams, b: int) -> np.ndarray:
    """Noiseless image of sample b by lenstronomy's ImageModel (x along columns, pixel centres as ours)."""
    inst = sim.config.instrument
    n, d = inst.n_pix, inst.pixel_scale
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=-(n - 1) / 2 * d, dec_at_xy_0=-(n - 1) / 2 * d,
                     transform_pix2angle=np.diag([d, d]))
    psf = PSF(psf_type="GAUSSIAN", fwhm=inst.psf_fwhm, pixel_size=d, truncation=inst.psf_truncation)
    models, kwargs, source = lens_kwargs(p, b)
    model = ImageModel(data, psf, lens_model_class=LensModel(models),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics={"supersampling_factor": inst.supersampling, "supersampling_convolution": False})
    return model.image(kwargs, source)


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# -- profiles --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_sie_and_shear_deflections_match_lenstronomy(dtype, tol):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-2.5, 2.5, 2000), rng.uniform(-2.5, 2.5, 2000)
    xt, yt = (torch.tensor(a, dtype=dtype)[None] for a in (x, y))
    for theta_E, e1, e2, cx, cy in [(1.28, 0.1, 0.0, 0.0, 0.0), (0.9, -0.15, 0.12, 0.1, -0.07), (1.5, 0.0, 0.0, 0, 0),
                                    (1.1, 0.3, -0.4, -0.2, 0.3)]:
        params = [col([v]).to(dtype) for v in (theta_E, e1, e2, cx, cy)]
        ours = np.stack([a.double().numpy()[0] for a in sie_deflection(xt, yt, *params)])
        ref = np.stack(LensModel(["SIE"]).alpha(x, y, [dict(theta_E=theta_E, e1=e1, e2=e2, center_x=cx,
                                                                 center_y=cy)]))
        assert max_rel_error(ours, ref) < tol, (theta_E, e1, e2)
    alpha = [torch.zeros(1, len(x), dtype=dtype) for _ in range(2)]
    add_shear_deflection(*alpha, xt, yt, col([0.05]).to(dtype), col([-0.02]).to(dtype))
    ours = np.stack([a.double().numpy()[0] for a in alpha])
    ref = np.stack(LensModel(["SHEAR"]).alpha(x, y, [dict(gamma1=0.05, gamma2=-0.02)]))
    assert max_rel_error(ours, ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_point_mass_and_vortex_deflections_match_lenstronomy(dtype, tol):
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-2, 2, 3000), rng.uniform(-2, 2, 3000)
    xt, yt = (torch.tensor(a, dtype=dtype)[None] for a in (x, y))
    theta_E, cx, cy = rng.uniform(0.001, 0.1, 7), rng.uniform(-1.5, 1.5, 7), rng.uniform(-1.5, 1.5, 7)
    alpha = [torch.zeros(1, len(x), dtype=dtype) for _ in range(2)]
    add_point_mass_deflections(*alpha, xt, yt, *(torch.tensor(a, dtype=dtype)[None] for a in (theta_E, cx, cy)))
    ref = np.stack(LensModel(["POINT_MASS"] * 7).alpha(x, y, [dict(theta_E=t, center_x=a, center_y=b)
                                                              for t, a, b in zip(theta_E, cx, cy)]))
    assert max_rel_error(np.stack([a.double().numpy()[0] for a in alpha]), ref) < tol
    # a vortex: 11 equal masses on a line at 40 degrees through (0.1, -0.2), half-length 0.8"
    angle, half, te = math.radians(40), 0.8, 0.02
    along = np.linspace(-half, half, 11)
    kwargs = [dict(theta_E=te, center_x=0.1 + t * math.cos(angle), center_y=-0.2 + t * math.sin(angle)) for t in along]
    ref = np.stack(LensModel(["POINT_MASS"] * 11).alpha(x, y, kwargs))
    alpha = [torch.zeros(1, len(x), dtype=dtype) for _ in range(2)]
    add_line_deflections(*alpha, xt, yt, *(col([v]).to(dtype) for v in (te, angle, half)), 11,
                         *(col([v]).to(dtype) for v in (0.1, -0.2)))
    assert max_rel_error(np.stack([a.double().numpy()[0] for a in alpha]), ref) < tol


def test_sersic_matches_lenstronomy():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-1, 1, 2000), rng.uniform(-1, 1, 2000)
    for amp, R, n, e1, e2 in [(20.0, 0.25, 1.0, -0.1, 0.1), (3.0, 0.4, 4.0, 0.2, 0.05), (1.0, 0.1, 0.5, 0.0, 0.0)]:
        kwargs = dict(amp=amp, R_sersic=R, n_sersic=n, e1=e1, e2=e2, center_x=0.05, center_y=-0.1)
        ref = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(x, y, [kwargs])
        ours = sersic_ellipse(torch.tensor(x)[None], torch.tensor(y)[None],
                              *(col([v]) for v in (amp, R, n, e1, e2, 0.05, -0.1)))
        assert max_rel_error(ours.numpy()[0], ref) < 1e-12, kwargs


# -- whole images ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("dtype,tol,supersampling,one_image_chunks", [
    (torch.float64, F64_TOL, 1, False), (torch.float64, F64_TOL, 2, True), (torch.float32, F32_TOL, 1, False)])
def test_noiseless_images_match_lenstronomy(class_name, dtype, tol, supersampling, one_image_chunks, monkeypatch):
    if one_image_chunks:      # the CPU point-mass loops then run image by image
        monkeypatch.setattr("dlscale.sim.simulator.CPU_CHUNK_VALUES", 1)
    config = small_config(randomize=True, center_x=0.07, center_y=-0.04)
    config.instrument.supersampling = supersampling
    sim = LensSimulator(config, "cpu", dtype)
    params = sim.sample(class_name, 2, sim.generators(5)[0])
    images = sim.render(params).double().numpy()[:, 0]
    for b in range(2):
        assert max_rel_error(images[b], lenstronomy_image(sim, params, b)) < tol


@pytest.mark.filterwarnings("ignore:Cosmology is provided")
def test_model_ii_matches_lenstronomy_sim_api():
    """Magnitude -> amplitude, z_source_convention=2.5 deflection scaling, PSF cut at 5 sigma, background noise."""
    band = {"read_noise": 4.2, "pixel_scale": 0.101, "ccd_gain": 3.1, "exposure_time": 565.0, "sky_brightness": 22.35,
            "magnitude_zero_point": 24.0, "num_exposures": 4, "seeing": 0.16, "psf_type": "GAUSSIAN"}
    sim = LensSimulator(preset_config("model_ii"), "cpu", torch.float64)
    params = sim.sample("cdm", 1, sim.generators(3)[0])
    models, kwargs, source = lens_kwargs(params, 0)
    api = SimAPI(num_pix=64, kwargs_single_band=band, kwargs_model={
        "lens_model_list": models, "lens_redshift_list": [0.5] * len(models),
        "source_light_model_list": ["SERSIC_ELLIPSE"], "source_redshift_list": [1.0],
        "cosmo": FlatLambdaCDM(H0=70, Om0=0.3), "z_source_convention": 2.5, "z_source": 1.0})
    del source[0]["amp"]
    _, source, _ = api.magnitude2amplitude(None, [{**source[0], "magnitude": 20.0}])
    ref = api.image_model_class({"point_source_supersampling_factor": 1}).image(kwargs, source)
    assert max_rel_error(sim.render(params).numpy()[0, 0], ref) < F64_TOL
    assert sim.config.instrument.background_rms == pytest.approx(api.background_noise, rel=1e-12)


def test_einstein_radii_and_distances():
    cosmo = CosmologyConfig()
    assert einstein_radius_arcsec(1e12, 0.5, 1.0, cosmo) == pytest.approx(1.2815, abs=1e-4)   # DeepLenseSim
    assert einstein_radius_arcsec(1e12, 0.5, 1.0, CosmologyConfig(distances="angular")) == pytest.approx(1.6645,
                                                                                                        abs=1e-4)
    astropy = FlatLambdaCDM(H0=70, Om0=0.3)
    d_l, d_s, d_ls = lensing_distances_mpc(0.5, 1.0, cosmo)
    assert d_l == pytest.approx(astropy.angular_diameter_distance(0.5).value, rel=1e-9)
    assert d_s == pytest.approx(astropy.angular_diameter_distance(1.0).value, rel=1e-9)
    assert d_ls == pytest.approx(astropy.angular_diameter_distance(0.5, 1.0).value, rel=1e-9)
    assert deflection_scale(preset_config("model_ii").lens, cosmo) == pytest.approx(0.634, abs=1e-3)


# -- sampling: seeds and the physics of the classes -----------------------------------------------------------

def test_same_seed_gives_identical_images_and_other_seeds_differ():
    sim = LensSimulator(small_config(), "cpu")
    first, meta_first = sim.simulate("cdm", 4, *sim.generators(7))
    again, meta_again = sim.simulate("cdm", 4, *sim.generators(7))
    other, _ = sim.simulate("cdm", 4, *sim.generators(8))
    assert np.array_equal(first, again) and meta_first == meta_again
    assert not np.array_equal(first, other)
    as_float64 = LensSimulator(small_config(), "cpu", torch.float64)
    assert as_float64.metadata(as_float64.sample("cdm", 4, as_float64.generators(7)[0])) == meta_first


def test_no_sub_image_equals_cdm_image_with_masses_zeroed():
    sim = LensSimulator(small_config(), "cpu", torch.float64)
    cdm = sim.sample("cdm", 3, sim.generators(0)[0])
    zeroed = LensParams(**{**vars(cdm), "subhalo_theta_E": torch.zeros_like(cdm.subhalo_theta_E)})
    no_sub = LensParams(**{**vars(cdm), "class_name": "no_sub", **{k: torch.zeros(3, 0) for k in (
        "subhalo_mass", "subhalo_theta_E", "subhalo_x", "subhalo_y")}})
    assert torch.equal(sim.render(zeroed), sim.render(no_sub))
    assert not torch.allclose(sim.render(cdm), sim.render(no_sub))


def test_cdm_and_axion_follow_the_deeplense_physics():
    sim = LensSimulator(small_config(), "cpu")
    sub = sim.config.substructure
    cdm = sim.sample("cdm", 40, sim.generators(1)[0])
    assert cdm.subhalo_mass.shape == (40, 25)
    assert cdm.subhalo_mass.min() >= 1e6 and cdm.subhalo_mass.max() <= 1e10
    radius = torch.hypot(cdm.subhalo_x, cdm.subhalo_y)
    assert radius.min() >= 0.25 and radius.max() <= 2.0
    # dN/dm ~ m^-0.9 on [1e6, 1e10]: P(m < 1e8) = (10^0.8 - 10^0.6) / (10 - 10^0.6) = 0.387
    assert (cdm.subhalo_mass < 1e8).double().mean().item() == pytest.approx(0.387, abs=0.05)
    assert torch.allclose(cdm.subhalo_theta_E, 1.2815 * torch.sqrt(cdm.subhalo_mass / 1e12), rtol=1e-4)

    axion = sim.sample("axion", 200, sim.generators(2)[0])
    assert axion.vortex_points == 100 and axion.subhalo_mass.shape[1] == 0
    assert torch.allclose(axion.vortex_mass, torch.tensor(3e10, dtype=torch.float64))
    assert torch.allclose(axion.vortex_theta_E, torch.tensor(1.2815 * math.sqrt(3e8 / 1e12), dtype=torch.float64),
                          rtol=1e-4)
    assert axion.axion_mass.min() >= 1e-24 and axion.axion_mass.max() <= 1e-22
    assert torch.allclose(axion.vortex_half_length, 0.03 * 1e-22 / axion.axion_mass)
    assert torch.log10(axion.axion_mass).mean().item() == pytest.approx(-23, abs=0.15)   # log-uniform
    x, y = axion.vortex_positions()
    assert torch.allclose(x[:, 0] + x[:, -1], torch.zeros(200, dtype=torch.float64), atol=1e-12)   # through centre
    cross = x[:, 1:] * y[:, :1] - y[:, 1:] * x[:, :1]
    assert cross.abs().max() < 1e-12                                                         # on one line

    no_sub = sim.sample("no_sub", 3, sim.generators(3)[0])
    assert no_sub.subhalo_mass.shape == (3, 0) and no_sub.vortex_points == 0
    assert sub.cdm_count == 25


def test_metadata_is_json_and_complete():
    sim = LensSimulator(small_config(randomize=True), "cpu")
    gens = sim.generators(0)
    metas = {}
    for class_name in CLASSES:
        metas[class_name] = json.loads(json.dumps(sim.simulate(class_name, 2, *gens)[1]))[0]
        for key in ("class", "preset", "theta_E", "e1", "e2", "gamma1", "gamma2", "source_x", "source_y",
                    "source_amp", "source_R_sersic", "source_n_sersic", "source_e1", "source_e2", "subhalo_count",
                    "subhalo_masses", "subhalo_x", "subhalo_y", "axion_mass", "exposure_time", "substructure_mass",
                    "vortex_points", "vortex_angle", "vortex_half_length"):
            assert key in metas[class_name], (class_name, key)
        assert metas[class_name]["class"] == class_name and metas[class_name]["preset"] == "model_i"
    cdm, axion = metas["cdm"], metas["axion"]
    assert cdm["subhalo_count"] == 25 and len(cdm["subhalo_masses"]) == len(cdm["subhalo_x"]) == 25
    assert cdm["substructure_mass"] == pytest.approx(sum(cdm["subhalo_masses"])) and cdm["axion_mass"] is None
    assert axion["vortex_points"] == 100 and axion["substructure_mass"] == pytest.approx(3e10)
    assert 1e-24 <= axion["axion_mass"] <= 1e-22
    assert metas["no_sub"]["substructure_mass"] == 0 and metas["no_sub"]["subhalo_masses"] == []


def test_model_i_noise_gives_poisson_counts_around_the_model():
    config = small_config()
    config.instrument.exposure_time = (2000.0, 2000.0)
    sim = LensSimulator(config, "cpu", torch.float64)
    params = sim.sample("no_sub", 64, sim.generators(0)[0])
    model = sim.render(params)
    counts = sim.add_noise(model.clone(), params, sim.generators(0)[1])
    assert torch.equal(counts, counts.round()) and counts.min() >= 0
    # counts = Poisson(clip(t * (model + N(0, bkg^2 + model/t)), 0)), as DeepLenseSim: where the clip is negligible,
    # mean t * model and variance 2 t model + (t bkg)^2
    bright = 2000 * model > 150
    residual = (counts - 2000 * model)[bright] / torch.sqrt(2 * 2000 * model + (2000 * 0.01) ** 2)[bright]
    assert bright.sum() > 2000
    assert residual.mean().abs() < 0.05 and residual.std().item() == pytest.approx(1.0, abs=0.05)


# -- config and CLI ------------------------------------------------------------------------------------------------

def test_config_yaml_and_cli_overrides(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("preset: model_iii\nlens:\n  theta_E: 1.1\n  e_range: [-0.1, 0.1]\ninstrument:\n  n_pix: 48\n")
    config = load_config(None, path, ["--lens.theta_E=1.3", "--instrument.supersampling=2", "--instrument.noise=true"])
    assert config.preset == "model_iii" and config.instrument.n_pix == 48 and config.lens.e_range == (-0.1, 0.1)
    assert config.lens.theta_E == 1.3 and config.instrument.supersampling == 2 and config.instrument.noise is True
    with pytest.raises(ValueError, match="unknown config key 'e1'"):
        load_config("model_i", None, ["--e1=0.1"])
    with pytest.raises(ValueError, match="lens.theta_E_range.*expected 2 values"):
        load_config("model_i", None, ["--lens.theta_E_range=[1, 2, 3]"])


def test_print_config_round_trips_through_yaml(tmp_path, capsys):
    overrides = ["--lens.theta_E_range=[1, 2]", "--instrument.n_pix=48"]
    assert simulate_main(["--preset", "model_ii", "--print-config", *overrides]) == 0
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    expected = load_config("model_ii", None, overrides)
    assert load_config(None, path) == expected


def run_cli(out: Path, *extra: str) -> int:
    return simulate_main(["--preset", "model_ii", "--n-per-class", "10", "--out", str(out), "--batch-size", "4",
                          "--instrument.n_pix=16", *extra])


def test_cli_writes_a_dataset_with_right_counts(tmp_path):
    out = tmp_path / "sim"
    assert run_cli(out, "--splits", "train=0.8,val=0.2", "--seed", "3", "--lens.randomize=true") == 0
    manifest = load_manifest(out)
    assert manifest["image_shape"] == [1, 16, 16] and manifest["source"]["preset"] == "model_ii"
    assert {s: v["class_counts"] for s, v in manifest["splits"].items()} == {
        "train": {c: 8 for c in CLASSES}, "val": {c: 2 for c in CLASSES}}
    assert verify(out) == []
    shard = out / manifest["splits"]["train"]["shards"][0]["name"]
    with open(shard, "rb") as f:
        _, record = next(iter_records(f, str(shard)))
    images, labels, metas = decode_record(record, manifest["record_layout"], (1, 16, 16), 3, str(shard))
    assert len(set(labels.tolist())) == 3                                       # classes interleaved in a shard
    assert all(m["class"] == CLASSES[label] and m["preset"] == "model_ii" for m, label in zip(metas, labels))
    assert len({m["theta_E"] for m in metas}) > 1                               # randomised lenses


def read_split(data_dir: Path, split: str) -> tuple[np.ndarray, list[dict]]:
    manifest = load_manifest(data_dir)
    images, metas = [], []
    for shard in manifest["splits"][split]["shards"]:
        with open(data_dir / shard["name"], "rb") as f:
            for key, record in iter_records(f, shard["name"]):
                batch, _, meta = decode_record(record, manifest["record_layout"], tuple(manifest["image_shape"]), 3,
                                               key)
                images.append(batch)
                metas += meta
    return np.concatenate(images), metas


def test_cli_worker_processes_write_the_same_dataset(tmp_path):
    assert run_cli(tmp_path / "one", "--seed", "5") == 0
    assert run_cli(tmp_path / "two", "--seed", "5", "--workers", "2") == 0
    for split in ("train", "val"):
        (images_one, metas_one), (images_two, metas_two) = (read_split(tmp_path / d, split) for d in ("one", "two"))
        assert np.array_equal(images_one, images_two) and metas_one == metas_two


@pytest.mark.parametrize("extra,field", [
    (["--preset", "model_x"], "preset"),
    (["--n-per-class", "0"], "--n-per-class"),
    (["--lens.e1=0.8", "--lens.e2=0.7"], "lens.(e1, e2)"),
    (["--instrument.psf_fwhm=-0.1"], "instrument.psf_fwhm"),
    (["--substructure.cdm_mass_range=[-1, 1e10]"], "substructure.cdm_mass_range"),
    (["--splits", "train=0.5,val=0.2"], "--splits"),
    (["--lens.theta_E=abc"], "lens.theta_E"),
    (["--no_such_field=1"], "no_such_field"),
    (["--workers", "0"], "--workers"),
])
def test_cli_bad_input_raises_and_writes_nothing(tmp_path, extra, field):
    out = tmp_path / "sim"
    with pytest.raises(ValueError) as err:
        run_cli(out, *extra)
    assert field in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_directory_that_holds_a_dataset(tmp_path):
    out = tmp_path / "sim"
    assert run_cli(out) == 0
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="already holds"):
        run_cli(out, "--seed", "1")
    assert sorted(p.name for p in out.iterdir()) == before and MANIFEST in before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]
