"""Batched strong-lensing simulator in torch: the DeepLense Model I/II/III physics, fast enough for 10^5-10^7 images.

One image: an SIE main lens plus external shear, optional substructure (CDM point-mass subhalos or an axion vortex
made of point masses), an elliptical Sersic source evaluated at the ray-traced positions (optionally supersampled),
a Gaussian PSF, and noise. Every convention follows lenstronomy (the reference in tests/test_simulate.py):
theta_E is the product-averaged SIE Einstein radius, (e1, e2) -> (phi, q) with phi = atan2(e2, e1)/2 and
q = (1-|e|)/(1+|e|), R_sersic is the product-averaged half-light radius and the Sersic `amp` is the surface brightness
at R_sersic; pixel (i, j) sits at x = (j - (n-1)/2) * pixel_scale, y = (i - (n-1)/2) * pixel_scale (x along columns,
y along rows), and a pixel's value is its mean surface brightness times the pixel area, i.e. counts/s per pixel.

Substructure, as DeepLenseSim (github.com/mwt5345/DeepLenseSim) makes it:
  cdm    exactly `cdm_count` (25) point masses, dN/dm ~ m^-0.9 on [1e6, 1e10] Msun, radius uniform in 0.25-2 arcsec;
  axion  a vortex: `vortex_points` (100) equal point masses, 3e10 Msun in total, evenly spaced on a line through the
         lens centre at a uniform random angle, half-length 0.03 * (1e-22 eV / m) arcsec, m log-uniform in
         [1e-24, 1e-22] eV (not a continuous line of mass: that differs by up to ~7% of the peak);
  no_sub nothing.
A point mass's Einstein radius comes from its mass and the lens/source redshifts in a flat LambdaCDM cosmology
(H0=70 km/s/Mpc, Om0=0.3, as DeepLenseSim's astropy FlatLambdaCDM; radiation neglected as astropy does by default).
DeepLenseSim used luminosity distances and D_LS = D_S - D_L (`distances="deeplensesim"`, the default, which gives its
main-lens theta_E = 1.2815" for 1e12 Msun); `distances="angular"` is the textbook angular-diameter formula (1.6645").

Noise (`instrument`): Gaussian background (`background_rms`) plus the Gaussian approximation of the source's shot
noise (lenstronomy's noise_for_model); with `output_counts` the image becomes Poisson(clip(exposure_time * that)),
DeepLenseSim's Model I recipe (counts). Presets: model_i = Model I; model_ii = Model II (Euclid VIS, noiseless and
deflections x0.634 as shipped); model_iii = our reading of Model III (HST F160W through Model II's pipeline).

Randomness: each batch draws its lens/source/substructure parameters on the CPU in float64 from one torch.Generator
and its noise on the simulation device from another, both seeded from (seed, batch index). A seed and batch size
therefore give the same parameters on any device and dtype, and the same images on a given device whatever the
number of --workers processes.

Speed: parameters the whole batch shares (the fixed DeepLense macro lens) are computed once per batch; the rest is
in-place elementwise torch, so CPU batches of 16-64 and GPU batches of 1024+ work well. On CPU, glibc handing freed
memory back to the OS costs up to a third of the time (64x64 images); MALLOC_TRIM_THRESHOLD_=1000000000
MALLOC_MMAP_THRESHOLD_=100000000 in the environment avoids it.

    dlscale simulate --preset model_ii --n-per-class 10000 --out data/sim_ii --splits train=0.9,val=0.1
    dlscale simulate --preset model_i --n-per-class 1000 --out data/reg --lens.randomize=true --device cuda
    dlscale simulate --config sim.yaml --n-per-class 100 --out data/x --instrument.supersampling=2 --instrument.noise=true
    dlscale simulate --preset model_iii --n-per-class 100000 --out data/sim_iii --workers 16     # CPU node
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dlscale.configtree import load_dataclass, plain
from dlscale.data.classes import CLASSES

log = logging.getLogger(__name__)

ARCSEC_PER_RAD = 180.0 * 3600.0 / math.pi
SPEED_OF_LIGHT_M_S = 299_792_458.0
G_SI = 6.67430e-11                      # m^3 kg^-1 s^-2 (CODATA 2018, as astropy)
MSUN_KG = 1.988409870698051e30          # IAU 2015 nominal solar mass (as astropy)
MPC_M = 3.0856775814913673e22
SIE_SMOOTHING_ARCSEC = 1e-10            # lenstronomy's SIE is its NIE with this core
SIE_MIN_K = math.sqrt(1.0 - 0.99999999 ** 2)   # lenstronomy caps q at 0.99999999 inside the NIE formulae
SERSIC_SMOOTHING_ARCSEC = 1e-4          # lenstronomy floors Sersic radii at this
SPLITS = ("train", "val", "test")
CPU_CHUNK_VALUES = 2 ** 17              # pixels x images per point-mass loop on CPU (cache-sized buffers)


# ----------------------------------------------------------------------------------------------------------------
# Configuration: one typed dataclass tree per preset; YAML file < CLI overrides; validated once.

@dataclass
class InstrumentConfig:
    n_pix: int = 150                                    # image side (pixels)
    pixel_scale: float = 0.05                           # arcsec per pixel
    supersampling: int = 1                              # sub-pixels per pixel side for the surface brightness
    psf_fwhm: float = 0.087                             # Gaussian PSF FWHM (arcsec); 0 = no PSF
    psf_truncation: float = 3.0                         # kernel radius in PSF sigmas (lenstronomy's `truncation`)
    exposure_time: tuple[float, float] = (1e3, 10 ** 3.5)   # s, log-uniform between the bounds (equal = fixed)
    background_rms: float = 0.01                        # Gaussian background per pixel (counts/s)
    noise: bool = True                                  # False = noiseless model images
    poisson_noise: bool = True                          # source shot noise, Gaussian approximation (lenstronomy)
    output_counts: bool = True                          # images = Poisson(exposure_time * flux) counts, as Model I
    zero_point: float = 25.0                            # magnitude of 1 count/s; used when source.magnitude is set


@dataclass
class LensConfig:
    theta_E: float = 1.2815                             # SIE Einstein radius (arcsec, product-averaged)
    e1: float = 0.1
    e2: float = 0.0
    gamma1: float = 0.05                                # external shear
    gamma2: float = 0.0
    center_x: float = 0.0                               # arcsec
    center_y: float = 0.0
    z_lens: float = 0.5
    z_source: float = 1.0
    z_source_convention: float | None = None            # lenstronomy: lens parameters quoted for a source here;
                                                        # all deflections scale by beta(z_source)/beta(convention)
    randomize: bool = False                             # draw theta_E, e1, e2, gamma1, gamma2 from the ranges below
    theta_E_range: tuple[float, float] = (0.8, 1.8)     # arcsec
    e_range: tuple[float, float] = (-0.2, 0.2)          # for e1 and e2 independently
    gamma_range: tuple[float, float] = (-0.1, 0.1)      # for gamma1 and gamma2 independently


@dataclass
class SourceConfig:
    amplitude: float = 20.0                             # Sersic surface brightness at R_sersic (counts/s/arcsec^2)
    magnitude: float | None = None                      # if set, overrides amplitude via instrument.zero_point
    R_sersic: float = 0.25                              # arcsec, product-averaged half-light radius
    n_sersic: float = 1.0
    e1: float = -0.1
    e2: float = 0.1
    position_range: tuple[float, float] = (-0.35, 0.35)  # source centre x and y, uniform (arcsec)


@dataclass
class SubstructureConfig:
    cdm_count: int = 25                                 # subhalos per cdm image (DeepLenseSim: always 25)
    cdm_mass_range: tuple[float, float] = (1e6, 1e10)   # Msun
    cdm_mass_slope: float = -0.9                        # dN/dm ~ m^slope
    cdm_radius_range: tuple[float, float] = (0.25, 2.0)  # arcsec from the lens centre, uniform in radius
    vortex_mass: float = 3e10                           # Msun, total
    vortex_points: int = 100                            # point masses the vortex line is made of
    axion_mass_range: tuple[float, float] = (1e-24, 1e-22)  # eV, log-uniform
    vortex_half_length_ref: float = 0.03                # arcsec at m = 1e-22 eV; scales as 1/m


@dataclass
class CosmologyConfig:
    H0: float = 70.0                                    # km/s/Mpc
    Om0: float = 0.3                                    # flat: Ode0 = 1 - Om0
    distances: str = "deeplensesim"                     # point-mass theta_E: "deeplensesim" | "angular" (see top)


@dataclass
class SimulatorConfig:
    preset: str = "model_i"
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    substructure: SubstructureConfig = field(default_factory=SubstructureConfig)
    cosmology: CosmologyConfig = field(default_factory=CosmologyConfig)

    def validate(self) -> "SimulatorConfig":
        validate_config(self)
        return self


def _background_rms(read_noise: float, exposure_s: float, n_exposures: int, sky_mag: float, zero_point: float,
                    pixel_scale: float) -> float:
    """lenstronomy's per-pixel background sigma (counts/s) from read noise and sky brightness (mag/arcsec^2)."""
    total_s = exposure_s * n_exposures
    sky_counts = 10 ** (-0.4 * (sky_mag - zero_point)) * pixel_scale ** 2 * total_s
    return math.sqrt(n_exposures * read_noise ** 2 + sky_counts) / total_s


def _model_i() -> SimulatorConfig:
    """DeepLenseSim Model I: 150x150, 0.05"/px, PSF 0.087" cut at 3 sigma, amp 20, Poisson counts."""
    return SimulatorConfig(preset="model_i")


def _model_ii() -> SimulatorConfig:
    """DeepLenseSim Model II: Euclid VIS with lenstronomy 1.9.2's values (0.101"/px, PSF 0.16", 4 x 565 s, sky 22.35,
    zero point 24.0, read noise 4.2), source magnitude 20, deflections for z_source_convention=2.5 (x0.634).

    Noiseless like the shipped set (its code saved model + model, i.e. twice these fluxes); set
    `instrument.noise=true` for Euclid noise. lenstronomy's SimAPI cuts its PSF at 5 sigma.
    """
    return SimulatorConfig(
        preset="model_ii",
        instrument=InstrumentConfig(n_pix=64, pixel_scale=0.101, psf_fwhm=0.16, psf_truncation=5.0,
                                    exposure_time=(4 * 565.0, 4 * 565.0),
                                    background_rms=_background_rms(4.2, 565.0, 4, 22.35, 24.0, 0.101),
                                    noise=False, output_counts=False, zero_point=24.0),
        source=SourceConfig(magnitude=20.0),
        lens=LensConfig(z_source_convention=2.5))


def _model_iii() -> SimulatorConfig:
    """Model III as we read it (never published as code): Model II's pipeline with HST WFC3 F160W
    (lenstronomy: 0.08"/px, PSF 0.08", 5400 s, sky 22.3, zero point 25.96, read noise 4). Noiseless like Model II."""
    return SimulatorConfig(
        preset="model_iii",
        instrument=InstrumentConfig(n_pix=64, pixel_scale=0.08, psf_fwhm=0.08, psf_truncation=5.0,
                                    exposure_time=(5400.0, 5400.0),
                                    background_rms=_background_rms(4.0, 5400.0, 1, 22.3, 25.96, 0.08),
                                    noise=False, output_counts=False, zero_point=25.96),
        source=SourceConfig(magnitude=20.0),
        lens=LensConfig(z_source_convention=2.5))


PRESETS: dict[str, typing.Callable[[], SimulatorConfig]] = {
    "model_i": _model_i, "model_ii": _model_ii, "model_iii": _model_iii}


def preset_config(name: str) -> SimulatorConfig:
    """The default configuration of a preset (model_i, model_ii, model_iii)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config(preset: str | None = None, yaml_path: Path | str | None = None,
                overrides: list[str] | None = None) -> SimulatorConfig:
    """Preset defaults < YAML file (config sections; may name the preset) < `--section.field=value` overrides;
    validated. The same typed-config machinery as training (`dlscale.config`)."""
    if preset is None and yaml_path is not None and Path(yaml_path).is_file():
        loaded = yaml.safe_load(Path(yaml_path).read_text())
        preset = loaded.get("preset") if isinstance(loaded, dict) else None
    if preset is None:
        raise ValueError(f"preset: none given; expected one of {', '.join(PRESETS)}")
    config = load_dataclass(preset_config(str(preset)), yaml_path, overrides)
    if config.preset != preset:
        raise ValueError(f"preset {config.preset!r} in {yaml_path} differs from --preset {preset!r}")
    return config.validate()


def validate_config(c: SimulatorConfig) -> None:
    """Raise ValueError naming the first field outside its physical range."""
    def need(ok: bool, key: str, expected: str, value: object) -> None:
        if not ok:
            raise ValueError(f"{key} = {value!r}: expected {expected}")

    def need_range(key: str, pair: tuple[float, float], low: float = -math.inf, strict: bool = False) -> None:
        lo, hi = pair
        ok = all(math.isfinite(v) for v in pair) and (lo > low if strict else lo >= low) and lo <= hi
        need(ok, key, f"finite (low, high) with low {'>' if strict else '>='} {low} and low <= high", pair)

    def need_ellipticity(key: str, e1: float, e2: float) -> None:
        need(math.hypot(e1, e2) < 1, key, "|e| = sqrt(e1^2 + e2^2) < 1 (axis ratio q > 0)", (e1, e2))

    need(c.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}", c.preset)
    i, lens, s, sub, cos = c.instrument, c.lens, c.source, c.substructure, c.cosmology
    need(i.n_pix >= 1, "instrument.n_pix", "an integer >= 1", i.n_pix)
    need(i.pixel_scale > 0, "instrument.pixel_scale", "> 0 arcsec", i.pixel_scale)
    need(i.supersampling >= 1, "instrument.supersampling", "an integer >= 1", i.supersampling)
    need(i.psf_fwhm >= 0, "instrument.psf_fwhm", ">= 0 arcsec (0 = no PSF)", i.psf_fwhm)
    need(i.psf_truncation > 0, "instrument.psf_truncation", "> 0 sigmas", i.psf_truncation)
    need_range("instrument.exposure_time", i.exposure_time, 0.0, strict=True)
    need(i.background_rms >= 0, "instrument.background_rms", ">= 0 counts/s", i.background_rms)
    need(lens.theta_E > 0, "lens.theta_E", "> 0 arcsec", lens.theta_E)
    need_ellipticity("lens.(e1, e2)", lens.e1, lens.e2)
    need(0 < lens.z_lens < lens.z_source, "lens.(z_lens, z_source)", "0 < z_lens < z_source",
         (lens.z_lens, lens.z_source))
    need(lens.z_source_convention is None or lens.z_source_convention > lens.z_lens, "lens.z_source_convention",
         "None or > z_lens", lens.z_source_convention)
    need_range("lens.theta_E_range", lens.theta_E_range, 0.0, strict=True)
    need_range("lens.e_range", lens.e_range)
    need(max(map(abs, lens.e_range)) * math.sqrt(2) < 1, "lens.e_range",
         "|e| < 1 for every (e1, e2) drawn, i.e. max |bound| < 1/sqrt(2)", lens.e_range)
    need_range("lens.gamma_range", lens.gamma_range)
    need(s.amplitude >= 0, "source.amplitude", ">= 0", s.amplitude)
    need(s.magnitude is None or math.isfinite(s.magnitude), "source.magnitude", "None or finite", s.magnitude)
    need(s.R_sersic > 0, "source.R_sersic", "> 0 arcsec", s.R_sersic)
    need(s.n_sersic > 0, "source.n_sersic", "> 0", s.n_sersic)
    need_ellipticity("source.(e1, e2)", s.e1, s.e2)
    need_range("source.position_range", s.position_range)
    need(sub.cdm_count >= 0, "substructure.cdm_count", "an integer >= 0", sub.cdm_count)
    need_range("substructure.cdm_mass_range", sub.cdm_mass_range, 0.0, strict=True)
    need(math.isfinite(sub.cdm_mass_slope), "substructure.cdm_mass_slope", "finite", sub.cdm_mass_slope)
    need_range("substructure.cdm_radius_range", sub.cdm_radius_range, 0.0)
    need(sub.vortex_mass >= 0, "substructure.vortex_mass", ">= 0 Msun", sub.vortex_mass)
    need(sub.vortex_points >= 1, "substructure.vortex_points", "an integer >= 1", sub.vortex_points)
    need_range("substructure.axion_mass_range", sub.axion_mass_range, 0.0, strict=True)
    need(sub.vortex_half_length_ref >= 0, "substructure.vortex_half_length_ref", ">= 0 arcsec",
         sub.vortex_half_length_ref)
    need(cos.H0 > 0, "cosmology.H0", "> 0 km/s/Mpc", cos.H0)
    need(0 <= cos.Om0 <= 1, "cosmology.Om0", "0 <= Om0 <= 1", cos.Om0)
    need(cos.distances in ("deeplensesim", "angular"), "cosmology.distances", "'deeplensesim' or 'angular'",
         cos.distances)


# ----------------------------------------------------------------------------------------------------------------
# Cosmology (flat LambdaCDM, no radiation), numpy.

def comoving_distance_mpc(z: float, cosmology: CosmologyConfig) -> float:
    """Line-of-sight comoving distance (Mpc), 64-point Gauss-Legendre quadrature (exact to ~1e-15 here)."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    zz = 0.5 * z * (nodes + 1.0)
    e_z = np.sqrt(cosmology.Om0 * (1.0 + zz) ** 3 + 1.0 - cosmology.Om0)
    return SPEED_OF_LIGHT_M_S / 1e3 / cosmology.H0 * 0.5 * z * float(np.sum(weights / e_z))


def lensing_distances_mpc(z_lens: float, z_source: float, cosmology: CosmologyConfig,
                          kind: str = "angular") -> tuple[float, float, float]:
    """(D_L, D_S, D_LS) in Mpc: angular-diameter distances, or DeepLenseSim's luminosity distances with
    D_LS = D_S - D_L (`kind="deeplensesim"`)."""
    dc_l, dc_s = comoving_distance_mpc(z_lens, cosmology), comoving_distance_mpc(z_source, cosmology)
    if kind == "deeplensesim":
        d_l, d_s = dc_l * (1 + z_lens), dc_s * (1 + z_source)
        return d_l, d_s, d_s - d_l
    return dc_l / (1 + z_lens), dc_s / (1 + z_source), (dc_s - dc_l) / (1 + z_source)


def einstein_radius_arcsec(mass_msun: float, z_lens: float, z_source: float, cosmology: CosmologyConfig) -> float:
    """Einstein radius of a point mass, sqrt(4 G M / c^2 * D_LS / (D_L D_S)), with `cosmology.distances`."""
    d_l, d_s, d_ls = lensing_distances_mpc(z_lens, z_source, cosmology, cosmology.distances)
    theta_sq = 4 * G_SI * mass_msun * MSUN_KG / SPEED_OF_LIGHT_M_S ** 2 * d_ls / (d_l * d_s * MPC_M)
    return math.sqrt(theta_sq) * ARCSEC_PER_RAD


def deflection_scale(lens: LensConfig, cosmology: CosmologyConfig) -> float:
    """Factor on every deflection when lens parameters are quoted for `z_source_convention` (lenstronomy)."""
    if lens.z_source_convention is None:
        return 1.0
    _, d_s, d_ls = lensing_distances_mpc(lens.z_lens, lens.z_source, cosmology)
    _, d_sc, d_lsc = lensing_distances_mpc(lens.z_lens, lens.z_source_convention, cosmology)
    return (d_ls / d_s) / (d_lsc / d_sc)


# ----------------------------------------------------------------------------------------------------------------
# Profiles, torch. Coordinates (1, P) or (B, P), parameters (1, 1) or (B, 1): a parameter the whole batch shares is
# passed as (1, 1), so work that depends only on shared parameters is done once on (1, P). lenstronomy's conventions.

def sie_deflection(x: torch.Tensor, y: torch.Tensor, theta_E: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor,
                   center_x: torch.Tensor, center_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SIE deflection (arcsec): lenstronomy's 'SIE' = NIE (Keeton & Kochanek 1998) with a 1e-10" core.

    In-place chains keep few (B, P) temporaries alive: each large one freed is memory glibc may hand back to the OS
    and page-fault in again on the next batch (that was half the CPU time).
    """
    c = torch.sqrt(e1 * e1 + e2 * e2).clamp(max=0.9999)
    phi, q = 0.5 * torch.atan2(e2, e1), (1 - c) / (1 + c)
    # sqrt(1 - q^2) without cancellation; lenstronomy's q <= 0.99999999 cap keeps it finite for a round lens
    k = (2 * torch.sqrt(c) / (1 + c)).clamp(min=SIE_MIN_K)
    b_over_k = theta_E * torch.sqrt(q) / k                # b = theta_E sqrt(q): product-averaged -> major-axis radius
    s = SIE_SMOOTHING_ARCSEC / torch.sqrt(q)
    cos, sin = torch.cos(phi), torch.sin(phi)
    u = (x * cos).addcmul_(y, sin).sub_(center_x * cos + center_y * sin)     # along the major axis
    v = (y * cos).addcmul_(x, sin, value=-1).sub_(center_y * cos - center_x * sin)
    psi = (u * u).add_(s * s).mul_(q * q).addcmul_(v, v).sqrt_()
    alpha_u = u.mul_(k).div_(psi + s).atan_().mul_(b_over_k)
    alpha_v = v.mul_(k).div_(psi.add_(q * q * s)).atanh_().mul_(b_over_k)
    alpha_x = torch.addcmul(alpha_u * cos, alpha_v, sin, value=-1)
    return alpha_x, alpha_u.mul_(sin).addcmul_(alpha_v, cos)


def add_shear_deflection(alpha_x: torch.Tensor, alpha_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         gamma1: torch.Tensor, gamma2: torch.Tensor) -> None:
    """Add the external shear deflection (lenstronomy 'SHEAR', zero at the origin) into alpha in place."""
    alpha_x.addcmul_(x, gamma1).addcmul_(y, gamma2)
    alpha_y.addcmul_(x, gamma2).addcmul_(y, gamma1, value=-1)


def add_point_mass_deflections(alpha_x: torch.Tensor, alpha_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                               theta_E: torch.Tensor, center_x: torch.Tensor, center_y: torch.Tensor) -> None:
    """Add theta_E^2 (r - r_k) / |r - r_k|^2 of K point masses (theta_E, centres (B, K)) into alpha (B, P).

    One mass at a time into preallocated buffers: a (B, K, P) tensor is ~10x slower on CPU (memory traffic).
    """
    dx, dy, f = torch.empty_like(alpha_x), torch.empty_like(alpha_x), torch.empty_like(alpha_x)
    theta_sq = theta_E * theta_E
    tiny = torch.tensor(torch.finfo(alpha_x.dtype).tiny, dtype=alpha_x.dtype, device=alpha_x.device)
    for k in range(theta_E.shape[1]):
        torch.sub(x, center_x[:, k:k + 1], out=dx)
        torch.sub(y, center_y[:, k:k + 1], out=dy)
        torch.addcmul(tiny, dx, dx, out=f).addcmul_(dy, dy)     # |r - r_k|^2 > 0 even on a pixel centre
        torch.div(theta_sq[:, k:k + 1], f, out=f)
        alpha_x.addcmul_(f, dx)
        alpha_y.addcmul_(f, dy)


def add_line_deflections(alpha_x: torch.Tensor, alpha_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         theta_E: torch.Tensor, angle: torch.Tensor, half_length: torch.Tensor, n_points: int,
                         center_x: torch.Tensor, center_y: torch.Tensor) -> None:
    """Add the deflection of `n_points` equal point masses (Einstein radius theta_E each) evenly spaced over
    [-half_length, half_length] on a line through the centre at `angle` (all (B, 1)) into alpha (B, P).

    The same sum as `add_point_mass_deflections`, done in the line's frame, where the perpendicular offset is shared
    by all masses: 5 cheaper ops per mass instead of 7 (the axion vortex is 100 masses).
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (x * cos).addcmul_(y, sin).sub_(center_x * cos + center_y * sin).expand_as(alpha_x).contiguous()
    v = (y * cos).addcmul_(x, sin, value=-1).sub_(center_y * cos - center_x * sin).expand_as(alpha_x)
    v_sq = (v * v).clamp_(min=torch.finfo(v.dtype).tiny)
    sum_u, sum_inv, du, inv_r2 = (torch.zeros_like(u), torch.zeros_like(u), torch.empty_like(u), torch.empty_like(u))
    offsets = half_length * torch.linspace(-1.0, 1.0, n_points, dtype=u.dtype, device=u.device)
    for k in range(n_points):
        torch.sub(u, offsets[:, k:k + 1], out=du)
        torch.addcmul(v_sq, du, du, out=inv_r2).reciprocal_()
        sum_u.addcmul_(inv_r2, du)
        sum_inv.add_(inv_r2)
    theta_sq = theta_E * theta_E
    alpha_u, alpha_v = sum_u.mul_(theta_sq), sum_inv.mul_(v).mul_(theta_sq)
    alpha_x.addcmul_(alpha_u, cos).addcmul_(alpha_v, -sin)
    alpha_y.addcmul_(alpha_u, sin).addcmul_(alpha_v, cos)


def sersic_b_n(n_sersic: torch.Tensor | float) -> torch.Tensor | float:
    """lenstronomy's b(n) approximation, so that R_sersic is the half-light radius."""
    if isinstance(n_sersic, torch.Tensor):
        return (1.9992 * n_sersic - 0.3271).clamp(min=1e-5)
    return max(1.9992 * n_sersic - 0.3271, 1e-5)


def sersic_ellipse(x: torch.Tensor, y: torch.Tensor, amp: torch.Tensor, R_sersic: torch.Tensor,
                   n_sersic: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor, center_x: torch.Tensor,
                   center_y: torch.Tensor) -> torch.Tensor:
    """Elliptical Sersic surface brightness (lenstronomy 'SERSIC_ELLIPSE': product-averaged radius, `amp` = surface
    brightness at R_sersic, radii floored at 1e-4")."""
    norm = torch.sqrt((1 - e1 * e1 - e2 * e2).abs().clamp(min=1e-6))
    a11, a12, a22 = (1 - e1) / norm, -e2 / norm, (1 + e1) / norm
    u = (x * a11).addcmul_(y, a12).sub_(center_x * a11 + center_y * a12)
    v = (x * a12).addcmul_(y, a22).sub_(center_x * a12 + center_y * a22)
    r_sq = u.mul_(u).addcmul_(v, v).clamp_(min=SERSIC_SMOOTHING_ARCSEC ** 2)
    # amp exp(b_n (1 - (R / R_sersic)^(1/n))) with (R / R_sersic)^(1/n) = r_sq^(1/2n) R_sersic^(-1/n);
    # a scalar exponent when the batch shares n is far faster
    b_n = sersic_b_n(n_sersic)
    scale = b_n * R_sersic.clamp(min=SERSIC_SMOOTHING_ARCSEC) ** (-1 / n_sersic)
    n_first = n_sersic.flatten()[0]
    t = r_sq.pow_(0.5 / n_first.item()) if bool((n_sersic == n_first).all()) else r_sq.pow(0.5 / n_sersic)
    return t.mul_(-scale).add_(torch.log(amp) + b_n).exp_()


def sersic_total_flux(amp: float, R_sersic: float, n_sersic: float) -> float:
    """Total flux of a Sersic profile with surface brightness `amp` at R_sersic (lenstronomy's total_flux)."""
    b_n = sersic_b_n(n_sersic)
    return amp * R_sersic ** 2 * 2 * math.pi * n_sersic * math.exp(b_n) / b_n ** (2 * n_sersic) * math.gamma(
        2 * n_sersic)


def pixel_grid(n_pix: int, pixel_scale: float, supersampling: int = 1) -> np.ndarray:
    """1-D coordinates (arcsec) of the (sub-)pixel centres: (j - (n-1)/2) * pixel_scale without supersampling."""
    m = n_pix * supersampling
    return ((np.arange(m) + 0.5) / supersampling - n_pix / 2) * pixel_scale


def psf_weights(fwhm: float, pixel_scale: float, truncation: float) -> np.ndarray:
    """1-D weights of the separable Gaussian PSF, out to int(truncation * sigma + 0.5) pixels: what lenstronomy's image
    model convolves a 'GAUSSIAN' PSF with (scipy.ndimage.gaussian_filter with `truncate`). [1.0] without a PSF."""
    if fwhm == 0:
        return np.ones(1)
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel_scale
    radius = int(truncation * sigma + 0.5)
    weights = np.exp(-0.5 * np.arange(-radius, radius + 1) ** 2 / sigma ** 2)
    return weights / weights.sum()


def observe(brightness: torch.Tensor, supersampling: int, weights: list[float], pixel_scale: float) -> torch.Tensor:
    """Surface brightness (B, n*s, n*s) -> image (B, 1, n, n) in counts/s per pixel: sub-pixel mean, PSF, pixel area.

    The PSF runs along rows then columns over edge-replicated padding, as scipy's gaussian_filter(mode="nearest")
    in lenstronomy; 2 (2r + 1) shifted adds are far cheaper on CPU than a 1-channel conv2d or dense matmuls.
    """
    batch, side = brightness.shape[0], brightness.shape[1] // supersampling
    if supersampling > 1:
        brightness = brightness.view(batch, side, supersampling, side, supersampling).mean(dim=(2, 4))
    r = len(weights) // 2
    padded = torch.nn.functional.pad(brightness[:, None], (r, r, r, r), mode="replicate")[:, 0] if r else brightness
    rows = padded[:, :side] * weights[0]
    for t in range(1, 2 * r + 1):
        rows.add_(padded[:, t:t + side], alpha=weights[t])
    image = rows[:, :, :side] * (weights[0] * pixel_scale ** 2)
    for t in range(1, 2 * r + 1):
        image.add_(rows[:, :, t:t + side], alpha=weights[t] * pixel_scale ** 2)
    return image[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Parameters of a batch and the simulator.

@dataclass
class LensParams:
    """Everything that defines a batch of images of one class; (B,) or (B, K) float64 CPU tensors."""
    class_name: str
    theta_E: torch.Tensor
    e1: torch.Tensor
    e2: torch.Tensor
    gamma1: torch.Tensor
    gamma2: torch.Tensor
    center_x: torch.Tensor
    center_y: torch.Tensor
    source_x: torch.Tensor
    source_y: torch.Tensor
    source_amp: torch.Tensor
    source_R_sersic: torch.Tensor
    source_n_sersic: torch.Tensor
    source_e1: torch.Tensor
    source_e2: torch.Tensor
    exposure_time: torch.Tensor                     # s
    subhalo_mass: torch.Tensor                      # Msun (B, K); K = 0 outside cdm
    subhalo_theta_E: torch.Tensor                   # arcsec (B, K), before the deflection scale
    subhalo_x: torch.Tensor                         # arcsec (B, K)
    subhalo_y: torch.Tensor
    vortex_points: int = 0                          # axion: equal point masses on a line through the lens centre
    vortex_mass: torch.Tensor | None = None         # Msun, total
    vortex_theta_E: torch.Tensor | None = None      # arcsec, of each point mass, before the deflection scale
    vortex_angle: torch.Tensor | None = None        # rad from the x axis
    vortex_half_length: torch.Tensor | None = None  # arcsec
    axion_mass: torch.Tensor | None = None          # eV

    def __len__(self) -> int:
        return len(self.theta_E)

    def vortex_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the vortex's point masses, (B, vortex_points) arcsec."""
        along = torch.linspace(-1.0, 1.0, self.vortex_points, dtype=torch.float64) * self.vortex_half_length[:, None]
        return (self.center_x[:, None] + along * torch.cos(self.vortex_angle)[:, None],
                self.center_y[:, None] + along * torch.sin(self.vortex_angle)[:, None])


class LensSimulator:
    """Renders batches of lensing images for one configuration on one device.

    >>> sim = LensSimulator(preset_config("model_ii"), device="cpu")
    >>> images, metas = sim.simulate("cdm", 32, *sim.generators(seed=0))   # (32, 1, 64, 64) float32 numpy
    """

    def __init__(self, config: SimulatorConfig, device: str = "auto", dtype: torch.dtype = torch.float32):
        self.config = config.validate()
        self.device = resolve_device(device)
        self.dtype = dtype
        inst, lens, src = config.instrument, config.lens, config.source
        coords = torch.as_tensor(pixel_grid(inst.n_pix, inst.pixel_scale, inst.supersampling), dtype=dtype)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        self.x = xx.reshape(1, -1).to(self.device)
        self.y = yy.reshape(1, -1).to(self.device)
        self.psf_weights = psf_weights(inst.psf_fwhm, inst.pixel_scale, inst.psf_truncation).tolist()
        self.deflection_scale = deflection_scale(lens, config.cosmology)
        self.theta_E_per_sqrt_msun = einstein_radius_arcsec(1.0, lens.z_lens, lens.z_source, config.cosmology)
        self.source_amp = src.amplitude
        if src.magnitude is not None:
            counts_per_s = 10 ** (-0.4 * (src.magnitude - inst.zero_point))
            self.source_amp = counts_per_s / sersic_total_flux(1.0, src.R_sersic, src.n_sersic)

    def generators(self, seed: int, batch_index: int = 0) -> tuple[torch.Generator, torch.Generator]:
        """(parameter generator on the CPU, noise generator on the device) for one batch: independent streams from
        (seed, batch_index), so a dataset does not depend on how many processes made it."""
        entropy = np.random.SeedSequence(seed, spawn_key=(batch_index,))
        param_seed, noise_seed = entropy.generate_state(2, dtype=np.uint64)
        params = torch.Generator().manual_seed(int(param_seed) >> 1)
        noise = torch.Generator(device=self.device).manual_seed(int(noise_seed) >> 1)
        return params, noise

    def sample(self, class_name: str, n: int, generator: torch.Generator) -> LensParams:
        """Draw the parameters of `n` images of one class (float64, CPU)."""
        if class_name not in CLASSES:
            raise ValueError(f"class {class_name!r}: expected one of {', '.join(CLASSES)}")
        lens, src, sub, inst = self.config.lens, self.config.source, self.config.substructure, self.config.instrument

        def uniform(bounds: tuple[float, float], shape: tuple[int, ...] = (n,)) -> torch.Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape, generator=generator, dtype=torch.float64)

        def fixed(value: float) -> torch.Tensor:
            return torch.full((n,), float(value), dtype=torch.float64)

        if lens.randomize:
            theta_E, e1, e2 = uniform(lens.theta_E_range), uniform(lens.e_range), uniform(lens.e_range)
            gamma1, gamma2 = uniform(lens.gamma_range), uniform(lens.gamma_range)
        else:
            theta_E, e1, e2, gamma1, gamma2 = map(fixed, (lens.theta_E, lens.e1, lens.e2, lens.gamma1, lens.gamma2))
        source_x, source_y = uniform(src.position_range), uniform(src.position_range)
        log_t = uniform((math.log10(inst.exposure_time[0]), math.log10(inst.exposure_time[1])))
        mass = sub_x = sub_y = torch.zeros((n, 0), dtype=torch.float64)
        vortex: dict = {}
        if class_name == "cdm":
            mass = power_law_masses(uniform((0.0, 1.0), (n, sub.cdm_count)), sub.cdm_mass_range, sub.cdm_mass_slope)
            radius = uniform(sub.cdm_radius_range, (n, sub.cdm_count))
            angle = uniform((0.0, 2 * math.pi), (n, sub.cdm_count))
            sub_x, sub_y = lens.center_x + radius * torch.cos(angle), lens.center_y + radius * torch.sin(angle)
        elif class_name == "axion":
            log_m = uniform((math.log10(sub.axion_mass_range[0]), math.log10(sub.axion_mass_range[1])))
            axion_mass = 10 ** log_m
            point_mass = sub.vortex_mass / sub.vortex_points
            vortex = {"vortex_points": sub.vortex_points, "vortex_mass": fixed(sub.vortex_mass),
                      "vortex_theta_E": fixed(self.theta_E_per_sqrt_msun * math.sqrt(point_mass)),
                      "vortex_angle": uniform((0.0, 2 * math.pi)),
                      "vortex_half_length": sub.vortex_half_length_ref * 1e-22 / axion_mass, "axion_mass": axion_mass}
        return LensParams(
            class_name=class_name, theta_E=theta_E, e1=e1, e2=e2, gamma1=gamma1, gamma2=gamma2,
            center_x=fixed(lens.center_x), center_y=fixed(lens.center_y), source_x=source_x, source_y=source_y,
            source_amp=fixed(self.source_amp), source_R_sersic=fixed(src.R_sersic),
            source_n_sersic=fixed(src.n_sersic), source_e1=fixed(src.e1), source_e2=fixed(src.e2),
            exposure_time=10 ** log_t, subhalo_mass=mass, subhalo_theta_E=self.theta_E_per_sqrt_msun * mass.sqrt(),
            subhalo_x=sub_x, subhalo_y=sub_y, **vortex)

    @torch.no_grad()
    def deflection(self, p: LensParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Total deflection (arcsec) at every (sub-)pixel: (B, P), or (1, P) when the batch shares all of it."""
        scale = self.deflection_scale
        # the deflection scale goes into the parameters: theta_E for the SIE, gamma, theta_E^2 for point masses
        theta_E, e1, e2, center_x, center_y, gamma1, gamma2 = self._columns(
            p.theta_E * scale, p.e1, p.e2, p.center_x, p.center_y, p.gamma1 * scale, p.gamma2 * scale)
        alpha_x, alpha_y = sie_deflection(self.x, self.y, theta_E, e1, e2, center_x, center_y)
        add_shear_deflection(alpha_x, alpha_y, self.x, self.y, gamma1, gamma2)
        if p.subhalo_mass.shape[1] == 0 and not p.vortex_points:
            return alpha_x, alpha_y
        alpha_x, alpha_y = (a.expand(len(p), -1).contiguous() for a in (alpha_x, alpha_y))
        subhalos = [self._tensor(t) for t in (p.subhalo_theta_E * math.sqrt(scale), p.subhalo_x, p.subhalo_y)]
        vortex = self._columns(p.vortex_theta_E * math.sqrt(scale), p.vortex_angle, p.vortex_half_length) \
            if p.vortex_points else []
        # on CPU the point-mass loops run on slices of ~2^17 values, so their buffers stay in cache (1.8x faster for
        # 150x150 images); a GPU takes the whole batch. A shared (1, 1) parameter serves every slice.
        step = len(p) if self.device.type == "cuda" else max(1, CPU_CHUNK_VALUES // self.x.shape[1])
        for start in range(0, len(p), step):
            def part(t: torch.Tensor) -> torch.Tensor:
                return t if len(t) == 1 else t[start:start + step]

            if p.subhalo_mass.shape[1]:
                add_point_mass_deflections(part(alpha_x), part(alpha_y), self.x, self.y, *map(part, subhalos))
            if p.vortex_points:
                add_line_deflections(part(alpha_x), part(alpha_y), self.x, self.y, *map(part, vortex),
                                     p.vortex_points, part(center_x), part(center_y))
        return alpha_x, alpha_y

    @torch.no_grad()
    def render(self, p: LensParams) -> torch.Tensor:
        """Noiseless images (B, 1, n_pix, n_pix) in counts/s per pixel, on the device."""
        side = self.config.instrument.n_pix * self.config.instrument.supersampling
        alpha_x, alpha_y = self.deflection(p)
        source = self._columns(p.source_amp, p.source_R_sersic, p.source_n_sersic, p.source_e1, p.source_e2,
                               p.source_x, p.source_y)
        brightness = sersic_ellipse(alpha_x.neg_().add_(self.x), alpha_y.neg_().add_(self.y), *source)
        inst = self.config.instrument
        return observe(brightness.expand(len(p), -1).view(len(p), side, side), inst.supersampling, self.psf_weights,
                       inst.pixel_scale)

    @torch.no_grad()
    def add_noise(self, images: torch.Tensor, p: LensParams, generator: torch.Generator) -> torch.Tensor:
        """Background + shot noise (Gaussian, as lenstronomy), then Poisson counts when `output_counts` (Model I).
        Works in place on `images`."""
        inst = self.config.instrument
        exposure = self._tensor(p.exposure_time).view(-1, 1, 1, 1)
        if inst.noise:
            if inst.poisson_noise:
                sigma = images.clamp(min=0).div_(exposure).add_(inst.background_rms ** 2).sqrt_()
            else:
                sigma = torch.full_like(images, inst.background_rms)
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            images.addcmul_(noise, sigma)
        if inst.output_counts:
            images.mul_(exposure).clamp_(min=0)
            if inst.noise:
                images = torch.poisson(images, generator=generator)
        return images

    def simulate(self, class_name: str, n: int, param_generator: torch.Generator,
                 noise_generator: torch.Generator) -> tuple[np.ndarray, list[dict]]:
        """`n` images of one class: (float32 numpy (n, 1, H, W), one metadata dict per image)."""
        params = self.sample(class_name, n, param_generator)
        images = self.add_noise(self.render(params), params, noise_generator)
        return images.float().cpu().numpy(), self.metadata(params)

    def metadata(self, p: LensParams) -> list[dict]:
        """JSON-serialisable parameters of every image (units as in LensParams). `subhalo_*` list the cdm point
        masses; a vortex is given by vortex_points / vortex_mass / vortex_angle / vortex_half_length, from which
        `LensParams.vortex_positions` gives its point masses (listing them would add ~6 kB an image)."""
        def values(t: torch.Tensor | None) -> list:
            return [None] * len(p) if t is None else t.tolist()

        vortex_mass = p.vortex_mass if p.vortex_mass is not None else torch.zeros(len(p), dtype=torch.float64)
        columns = {key: values(t) for key, t in {
            "theta_E": p.theta_E, "e1": p.e1, "e2": p.e2, "gamma1": p.gamma1, "gamma2": p.gamma2,
            "center_x": p.center_x, "center_y": p.center_y, "source_x": p.source_x, "source_y": p.source_y,
            "source_amp": p.source_amp, "source_R_sersic": p.source_R_sersic, "source_n_sersic": p.source_n_sersic,
            "source_e1": p.source_e1, "source_e2": p.source_e2, "exposure_time": p.exposure_time,
            "substructure_mass": p.subhalo_mass.sum(1) + vortex_mass, "subhalo_masses": p.subhalo_mass,
            "subhalo_x": p.subhalo_x, "subhalo_y": p.subhalo_y, "axion_mass": p.axion_mass,
            "vortex_mass": p.vortex_mass, "vortex_angle": p.vortex_angle,
            "vortex_half_length": p.vortex_half_length}.items()}
        common = {"class": p.class_name, "preset": self.config.preset, "source_magnitude": self.config.source.magnitude,
                  "deflection_scale": self.deflection_scale, "subhalo_count": int(p.subhalo_mass.shape[1]),
                  "vortex_points": p.vortex_points}
        return [{**common, **{key: column[i] for key, column in columns.items()}} for i in range(len(p))]

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def _columns(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """(B,) tensors -> (B, 1) on the device; all (1, 1) when every image shares every value, so shared work
        (the fixed DeepLense macro lens) is done once per batch."""
        if all(bool((t == t[0]).all()) for t in values):
            values = tuple(t[:1] for t in values)
        return [self._tensor(t).view(-1, 1) for t in values]


def power_law_masses(u: torch.Tensor, mass_range: tuple[float, float], slope: float) -> torch.Tensor:
    """Inverse-CDF draw of dN/dm ~ m^slope on [low, high] from uniforms u."""
    low, high = mass_range
    if slope == -1:
        return low * (high / low) ** u
    a = slope + 1
    return (low ** a + u * (high ** a - low ** a)) ** (1 / a)


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# `dlscale simulate`

def parse_splits(text: str) -> dict[str, float]:
    """'train=0.9,val=0.1' -> {'train': 0.9, 'val': 0.1}; fractions > 0 summing to 1."""
    splits: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SPLITS or name in splits:
            raise ValueError(f"--splits {text!r}: split {name!r} unknown or repeated; expected names from {SPLITS}")
        try:
            splits[name] = float(value)
        except ValueError:
            raise ValueError(f"--splits {text!r}: {value!r} is not a fraction") from None
        if not 0 < splits[name] <= 1:
            raise ValueError(f"--splits {text!r}: fraction of {name} must be in (0, 1]")
    if abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"--splits {text!r}: fractions sum to {sum(splits.values())}, expected 1")
    return splits


def split_counts(n_per_class: int, splits: dict[str, float]) -> dict[str, int]:
    """Images per class in each split; rounding goes to the first split."""
    counts = {name: int(round(n_per_class * frac)) for name, frac in splits.items()}
    first = next(iter(counts))
    counts[first] = n_per_class - sum(c for name, c in counts.items() if name != first)
    if counts[first] < 0:
        raise ValueError(f"--splits {splits}: does not divide {n_per_class} images per class")
    return counts


def simulate_main(argv: list[str] | None = None) -> int:
    """`dlscale simulate`: simulate `--n-per-class` images of every class into a new shard dataset."""
    from dlscale.data.shards import DatasetWriter

    p = argparse.ArgumentParser(prog="dlscale simulate", allow_abbrev=False,
                                description="Simulate lensing images (no_sub, cdm, axion) into WebDataset shards. "
                                            "Any config field can be set with --section.field=value, "
                                            "e.g. --lens.randomize=true; --print-config lists them.")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (or `preset:` in --config)")
    p.add_argument("--n-per-class", type=int, help="images per class, all splits together (required)")
    p.add_argument("--out", type=Path, help="new dataset directory (required)")
    p.add_argument("--splits", default="train=0.9,val=0.1", help="fractions per split, e.g. train=0.8,val=0.1,test=0.1")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="simulation precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="images per batch (default 32 on CPU, 1024 on a GPU)")
    p.add_argument("--workers", type=int, default=1, help="CPU: simulating processes of one thread each (the same "
                                                          "images whatever the number); 1 = this process")
    p.add_argument("--shard-size", type=int, default=2048, help="samples per shard")
    p.add_argument("--samples-per-record", type=int, default=256, help="1 = classic one-sample WebDataset records")
    p.add_argument("--config", type=Path, help="YAML with config sections (instrument, lens, source, ...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args, extra = p.parse_known_args(argv)

    config = load_config(args.preset, args.config, extra)
    if args.print_config:
        print(yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False), end="")
        return 0
    if args.n_per_class is None or args.n_per_class < 1:
        raise ValueError(f"--n-per-class = {args.n_per_class}: expected an integer >= 1")
    if args.out is None:
        raise ValueError("--out: required (a new dataset directory)")
    for name in ("batch_size", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} = {getattr(args, name)}: expected an integer >= 1")
    counts = split_counts(args.n_per_class, parse_splits(args.splits))
    dtype = getattr(torch, args.dtype)
    sim = LensSimulator(config, args.device, dtype)
    if args.workers > 1 and sim.device.type == "cuda":
        raise ValueError("--workers: CPU only; one process drives a GPU (use a larger --batch-size)")
    batch_size = args.batch_size or (1024 if sim.device.type == "cuda" else 32)
    n = config.instrument.n_pix
    source = {"kind": "simulator", "preset": config.preset, "config": plain(dataclasses.asdict(config)),
              "seed": args.seed, "n_per_class": args.n_per_class, "splits": counts, "batch_size": batch_size,
              "device": sim.device.type, "dtype": args.dtype}
    writer = DatasetWriter(args.out, (1, n, n), source, shard_size=args.shard_size,
                           samples_per_record=args.samples_per_record, seed=args.seed)
    jobs = list(enumerate(plan_batches(counts, batch_size)))
    pool = None
    if args.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(args.workers, _start_worker, (config, args.dtype, args.seed))
    try:
        results = pool.imap(_worker_batch, jobs) if pool else (_simulate_batch(sim, args.seed, job) for job in jobs)
        with writer, tqdm(total=len(CLASSES) * args.n_per_class, unit="img", desc="simulate") as bar:
            for (_, (class_name, pieces)), (images, metas) in zip(jobs, results):
                labels = np.full(len(images), CLASSES.index(class_name), dtype=np.int64)
                start = 0
                for split, k in pieces:
                    writer.add_batch(split, images[start:start + k], labels[start:start + k], metas[start:start + k])
                    start += k
                bar.update(len(images))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    log.info("wrote %s: %s per class", args.out, ", ".join(f"{s} {c}" for s, c in counts.items()))
    return 0


def _simulate_batch(sim: LensSimulator, seed: int, job: tuple[int, tuple[str, list[tuple[str, int]]]]
                    ) -> tuple[np.ndarray, list[dict]]:
    index, (class_name, pieces) = job
    return sim.simulate(class_name, sum(k for _, k in pieces), *sim.generators(seed, index))


_worker: dict = {}      # the simulator of a --workers process, made once by _start_worker


def _start_worker(config: SimulatorConfig, dtype: str, seed: int) -> None:
    torch.set_num_threads(1)
    _worker.update(sim=LensSimulator(config, "cpu", getattr(torch, dtype)), seed=seed)


def _worker_batch(job: tuple[int, tuple[str, list[tuple[str, int]]]]) -> tuple[np.ndarray, list[dict]]:
    return _simulate_batch(_worker["sim"], _worker["seed"], job)


def plan_batches(counts: dict[str, int], batch_size: int) -> typing.Iterator[tuple[str, list[tuple[str, int]]]]:
    """Yield (class, [(split, count), ...]) batches taking the classes in turn, so no shard is one class; each
    class's images fill the splits in order."""
    names, bounds = list(counts), np.cumsum(list(counts.values()))
    for start in range(0, int(bounds[-1]), batch_size):
        stop = min(start + batch_size, int(bounds[-1]))
        edges = [start, *(int(b) for b in bounds if start < b < stop), stop]
        pieces = [(names[int(np.searchsorted(bounds, a, side="right"))], b - a) for a, b in zip(edges, edges[1:])]
        for class_name in CLASSES:
            yield class_name, pieces
