"""Simulator configuration: one typed dataclass tree per preset; preset < YAML file < CLI overrides; validated once
(every field named with its expected range when it is outside it)."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dlscale.configtree import flatten, from_dict, load_dataclass, set_dotted, to_dict

@dataclass
class InstrumentConfig:
    n_pix: int = 150
    """image side (pixels)"""
    pixel_scale: float = 0.05
    """arcsec per pixel"""
    supersampling: int = 1
    """sub-pixels per pixel side for the surface brightness"""
    psf_fwhm: float = 0.087
    """Gaussian PSF FWHM (arcsec); 0 = no PSF"""
    psf_truncation: float = 3.0
    """kernel radius in PSF sigmas (lenstronomy's `truncation`)"""
    exposure_time: tuple[float, float] = (1e3, 10 ** 3.5)
    """s, log-uniform between the bounds (equal = fixed)"""
    background_rms: float = 0.01
    """Gaussian background per pixel (counts/s)"""
    noise: bool = True
    """False = noiseless model images"""
    poisson_noise: bool = True
    """source shot noise, Gaussian approximation (lenstronomy)"""
    output_counts: bool = True
    """images = Poisson(exposure_time * flux) counts, as Model I"""
    zero_point: float = 25.0
    """magnitude of 1 count/s; used when source.magnitude is set"""


@dataclass
class LensConfig:
    theta_E: float = 1.2815
    """SIE Einstein radius (arcsec, product-averaged)"""
    e1: float = 0.1
    e2: float = 0.0
    gamma1: float = 0.05
    """external shear"""
    gamma2: float = 0.0
    center_x: float = 0.0
    """arcsec"""
    center_y: float = 0.0
    z_lens: float = 0.5
    z_source: float = 1.0
    z_source_convention: float | None = None
    """lenstronomy: lens parameters quoted for a source here; all deflections scale by
    beta(z_source)/beta(convention)"""
    randomize: bool = False
    """draw theta_E, e1, e2, gamma1, gamma2 from the ranges below"""
    theta_E_range: tuple[float, float] = (0.8, 1.8)
    """arcsec"""
    e_range: tuple[float, float] = (-0.2, 0.2)
    """for e1 and e2 independently"""
    gamma_range: tuple[float, float] = (-0.1, 0.1)
    """for gamma1 and gamma2 independently"""


@dataclass
class SourceConfig:
    amplitude: float = 20.0
    """Sersic surface brightness at R_sersic (counts/s/arcsec^2)"""
    magnitude: float | None = None
    """if set, overrides amplitude via instrument.zero_point"""
    R_sersic: float = 0.25
    """arcsec, product-averaged half-light radius"""
    n_sersic: float = 1.0
    e1: float = -0.1
    e2: float = 0.1
    position_range: tuple[float, float] = (-0.35, 0.35)
    """source centre x and y, uniform (arcsec)"""


@dataclass
class SubstructureConfig:
    cdm_count: int = 25
    """subhalos per cdm image (DeepLenseSim: always 25)"""
    cdm_mass_range: tuple[float, float] = (1e6, 1e10)
    """Msun"""
    cdm_mass_slope: float = -0.9
    """dN/dm ~ m^slope"""
    cdm_radius_range: tuple[float, float] = (0.25, 2.0)
    """arcsec from the lens centre, uniform in radius"""
    vortex_mass: float = 3e10
    """Msun, total"""
    vortex_points: int = 100
    """point masses the vortex line is made of"""
    axion_mass_range: tuple[float, float] = (1e-24, 1e-22)
    """eV, log-uniform"""
    vortex_half_length_ref: float = 0.03
    """arcsec at m = 1e-22 eV; scales as 1/m"""


@dataclass
class CosmologyConfig:
    H0: float = 70.0
    """km/s/Mpc"""
    Om0: float = 0.3
    """flat: Ode0 = 1 - Om0"""
    distances: str = "deeplensesim"
    """point-mass theta_E: "deeplensesim" | "angular" (see top)"""


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


def preset_with_overrides(preset: str, overrides: dict[str, typing.Any], where: str) -> SimulatorConfig:
    """Preset `preset` with `overrides` (dotted keys, or sections as nested mappings) over it, validated; an error
    names the config key `where`.preset or `where`.overrides and the offending simulator key."""
    try:
        tree = to_dict(preset_config(preset))
    except ValueError as err:
        raise ValueError(f"{where}.preset: {err}") from None
    try:
        for key, value in flatten(overrides).items():
            if key == "preset":
                raise ValueError(f"'preset' is not an override; set {where}.preset")
            set_dotted(tree, key, value)
        return from_dict(SimulatorConfig, tree, f"{where}.overrides.").validate()
    except ValueError as err:
        raise ValueError(f"{where}.overrides (preset {preset}): {err}") from None


def load_config(preset: str | None = None, yaml_path: Path | str | None = None,
                overrides: list[str] | None = None) -> SimulatorConfig:
    """Preset defaults < YAML file (config sections; may name the preset) < `--section.field=value` overrides;
    validated. The same typed-config machinery as training (`dlscale.configtree`)."""
    if preset is None and yaml_path is not None and Path(yaml_path).is_file():
        loaded = yaml.safe_load(Path(yaml_path).read_text())
        preset = loaded.get("preset") if isinstance(loaded, dict) else None
    if preset is None:
        raise ValueError(f"preset: none given; expected one of {', '.join(PRESETS)}")
    config = load_dataclass(preset_config(str(preset)), yaml_path, overrides)
    if config.preset != preset:
        raise ValueError(f"preset {config.preset!r} in {yaml_path} differs from --preset {preset!r}")
    return config.validate()


class Range(typing.NamedTuple):
    low: float
    high: float
    unit: str = ""
    open_low: bool = False
    """low itself excluded"""

    def holds(self, value: object) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (value > self.low if self.open_low else value >= self.low) and value <= self.high)

    def __str__(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}]{' ' + self.unit if self.unit else ''}"


# Every number of the config (pairs: both bounds, low <= high). Wide enough for any real survey, lens or source;
# narrow enough that the physics stays finite in float32, so a typo such as source.magnitude=-80 or an infinite
# Einstein radius fails here, naming the key, instead of becoming a dataset of NaN images.
RANGES: dict[str, Range] = {
    "instrument.n_pix": Range(1, 8192, "pixels"),
    "instrument.pixel_scale": Range(0, 10, "arcsec", open_low=True),
    "instrument.supersampling": Range(1, 16),
    "instrument.psf_fwhm": Range(0, 10, "arcsec (0 = no PSF)"),
    "instrument.psf_truncation": Range(0, 20, "PSF sigmas", open_low=True),
    "instrument.exposure_time": Range(0, 1e8, "s", open_low=True),
    "instrument.background_rms": Range(0, 1e6, "counts/s"),
    "instrument.zero_point": Range(0, 50, "mag"),
    "lens.theta_E": Range(0, 100, "arcsec", open_low=True),
    "lens.e1": Range(-1, 1), "lens.e2": Range(-1, 1),
    "lens.gamma1": Range(-1, 1), "lens.gamma2": Range(-1, 1),
    "lens.center_x": Range(-100, 100, "arcsec"), "lens.center_y": Range(-100, 100, "arcsec"),
    "lens.z_lens": Range(0, 20, open_low=True), "lens.z_source": Range(0, 20, open_low=True),
    "lens.z_source_convention": Range(0, 20, "(or None)", open_low=True),
    "lens.theta_E_range": Range(0, 100, "arcsec", open_low=True),
    "lens.e_range": Range(-1, 1), "lens.gamma_range": Range(-1, 1),
    "source.amplitude": Range(0, 1e10, "counts/s/arcsec^2"),
    "source.magnitude": Range(0, 40, "mag (or None)"),
    "source.R_sersic": Range(1e-4, 100, "arcsec"),
    "source.n_sersic": Range(0.2, 10),
    "source.e1": Range(-1, 1), "source.e2": Range(-1, 1),
    "source.position_range": Range(-100, 100, "arcsec"),
    "substructure.cdm_count": Range(0, 10_000),
    "substructure.cdm_mass_range": Range(0, 1e15, "Msun", open_low=True),
    "substructure.cdm_mass_slope": Range(-10, 10),
    "substructure.cdm_radius_range": Range(0, 100, "arcsec"),
    "substructure.vortex_mass": Range(0, 1e15, "Msun"),
    "substructure.vortex_points": Range(1, 100_000),
    "substructure.axion_mass_range": Range(0, 1, "eV", open_low=True),
    "substructure.vortex_half_length_ref": Range(0, 100, "arcsec"),
    "cosmology.H0": Range(10, 500, "km/s/Mpc"),
    "cosmology.Om0": Range(0, 1),
}
OPTIONAL = {"lens.z_source_convention", "source.magnitude"}     # None = not used


def validate_config(c: SimulatorConfig) -> None:
    """Raise ValueError naming the first field outside its range (`RANGES`) or combination that is unphysical."""
    def need(ok: bool, key: str, expected: str, value: object) -> None:
        if not ok:
            raise ValueError(f"{key} = {value!r}: expected {expected}")

    def need_ellipticity(key: str, e1: float, e2: float) -> None:
        need(math.hypot(e1, e2) < 1, key, "|e| = sqrt(e1^2 + e2^2) < 1 (axis ratio q > 0)", (e1, e2))

    need(c.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}", c.preset)
    for key, bounds in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        if value is None and key in OPTIONAL:
            continue
        if isinstance(value, tuple):
            need(len(value) == 2 and all(map(bounds.holds, value)) and value[0] <= value[1], key,
                 f"(low, high) with low <= high, both finite in {bounds}", value)
        else:
            need(bounds.holds(value), key, f"a finite number in {bounds}", value)
    i, lens, s, cos = c.instrument, c.lens, c.source, c.cosmology
    need((i.n_pix * i.supersampling) ** 2 <= 2 ** 26, "instrument.(n_pix, supersampling)",
         "(n_pix * supersampling)^2 <= 2^26 sub-pixels per image", (i.n_pix, i.supersampling))
    need_ellipticity("lens.(e1, e2)", lens.e1, lens.e2)
    need(lens.z_lens < lens.z_source, "lens.(z_lens, z_source)", "0 < z_lens < z_source", (lens.z_lens, lens.z_source))
    need(lens.z_source_convention is None or lens.z_source_convention > lens.z_lens, "lens.z_source_convention",
         "None or > z_lens", lens.z_source_convention)
    need(max(map(abs, lens.e_range)) * math.sqrt(2) < 1, "lens.e_range",
         "|e| < 1 for every (e1, e2) drawn, i.e. max |bound| < 1/sqrt(2)", lens.e_range)
    need_ellipticity("source.(e1, e2)", s.e1, s.e2)
    need(cos.distances in ("deeplensesim", "angular"), "cosmology.distances", "'deeplensesim' or 'angular'",
         cos.distances)
