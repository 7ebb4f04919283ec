"""`LensParams` (what defines a batch of images) and `LensSimulator` (draws, renders and adds noise to batches)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dlscale.data.classes import CLASSES
from dlscale.sim.config import SimulatorConfig
from dlscale.sim.physics import (add_line_deflections, add_point_mass_deflections, add_shear_deflection,
                                 deflection_scale, einstein_radius_arcsec, observe, pixel_grid, power_law_masses,
                                 psf_weights, sersic_ellipse, sersic_total_flux, sie_deflection)

CPU_CHUNK_VALUES = 2 ** 17              # pixels x images per point-mass loop on CPU (cache-sized buffers)


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
    psf_fwhm: float | None = None                   # arcsec, one for the batch (one PSF a render); None: instrument's
    background_rms: torch.Tensor | None = None      # counts/s per pixel, per image; None: the instrument's

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
        weights = self.psf_weights if p.psf_fwhm is None else \
            psf_weights(p.psf_fwhm, inst.pixel_scale, inst.psf_truncation).tolist()
        return observe(brightness.expand(len(p), -1).view(len(p), side, side), inst.supersampling, weights,
                       inst.pixel_scale)

    @torch.no_grad()
    def add_noise(self, images: torch.Tensor, p: LensParams, generator: torch.Generator) -> torch.Tensor:
        """Background + shot noise (Gaussian, as lenstronomy), then Poisson counts when `output_counts` (Model I).
        Works in place on `images`."""
        inst = self.config.instrument
        exposure = self._tensor(p.exposure_time).view(-1, 1, 1, 1)
        rms = inst.background_rms if p.background_rms is None else self._tensor(p.background_rms).view(-1, 1, 1, 1)
        if inst.noise:
            if inst.poisson_noise:
                sigma = images.clamp(min=0).div_(exposure).add_(rms ** 2).sqrt_()
            else:
                sigma = torch.full_like(images, rms) if p.background_rms is None else rms.expand_as(images)
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
        `LensParams.vortex_positions` gives its point masses (listing them would add ~6 kB an image). `psf_fwhm` and
        `background_rms` appear only where they were redrawn (`dlscale.sim.mixture` nuisance)."""
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
            "vortex_half_length": p.vortex_half_length,
            **({} if p.background_rms is None else {"background_rms": p.background_rms})}.items()}
        common = {"class": p.class_name, "preset": self.config.preset, "source_magnitude": self.config.source.magnitude,
                  "deflection_scale": self.deflection_scale, "subhalo_count": int(p.subhalo_mass.shape[1]),
                  "vortex_points": p.vortex_points, **({} if p.psf_fwhm is None else {"psf_fwhm": p.psf_fwhm})}
        return [{**common, **{key: column[i] for key, column in columns.items()}} for i in range(len(p))]

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def _columns(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """(B,) tensors -> (B, 1) on the device; all (1, 1) when every image shares every value, so shared work
        (the fixed DeepLense macro lens) is done once per batch."""
        if all(bool((t == t[0]).all()) for t in values):
            values = tuple(t[:1] for t in values)
        return [self._tensor(t).view(-1, 1) for t in values]


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
    return torch.device(device)
