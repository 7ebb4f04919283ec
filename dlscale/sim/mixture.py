"""Several instruments in one simulation stream (`data.simulator.mixture`) and nuisance parameters redrawn within
physical ranges (`data.simulator.nuisance`): one encoder pretrained for every instrument.

Components. Each is a preset with overrides of its own (pixel scale, PSF, noise, image side) and a `share`, a
relative weight. A component renders at its own pixels with its own `LensSimulator` and adds its noise there; its
images are then brought to the stream's side: `data.resize` by `data.resize_mode` if set (interpolate: bilinear
with antialiasing, an area average when shrinking; crop: the centre, refused for a component smaller than the side),
else the largest component's n_pix by interpolation. Pixel values are resampled as they are (bilinear keeps the
local mean), so each component keeps its own raw scale (counts for a Model I-like one): normalise per image
(`data.normalize`) to train across instruments.

Shares, deterministically (no draw): number the images of the stream in order, global batch i holding positions
i B .. i B + B - 1. The first m positions hold floor(m C_k) images of components 0..k, C_k being the cumulative
share as an exact fraction, so a batch holds each component's share of its B images to within two images, and all
batches from the start to within one. A batch lists its components in order and position p of global batch i has
class (i + p) mod 3: the class counts are exactly those of a single preset (floor(B / 3) each, the remainder
rotating) and each component's classes are balanced to within one image. A single preset is the one-component case
of this rule.

Nuisance parameters (`nuisance.enabled`): once a sub-batch (one component, one class) has drawn its parameters,
every range that is set replaces the component's value or draw, per image: Einstein radius, source size, position
and ellipticity, external shear (uniform, absolute), exposure time and background rms (log-uniform factors on the
component's own). The PSF width is a factor too, drawn once per sub-batch, because one render convolves with one
PSF. These draws come from a generator of their own, so they leave every other parameter draw as it was.

The fixed evaluation set of such a stream (`write_mixture_set`) is drawn by the same rule, one class per batch, with
its own seed key, and stored raw at the stream's side.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlscale.configtree import plain, to_dict
from dlscale.data.classes import CLASSES
from dlscale.data.mixing import add_round
from dlscale.data.shards import DatasetWriter
from dlscale.data.transforms import resize
from dlscale.sim.config import Range, SimulatorConfig, preset_with_overrides
from dlscale.sim.simulator import LensParams, LensSimulator
from dlscale.sim.write import check_batch, plan_batches

EVAL_KEY = 0xE7A1           # first spawn-key word of a mixture evaluation set's batch seeds


@dataclass
class MixtureComponent:
    """One instrument of `data.simulator.mixture`: a preset, its overrides and its share of the images."""
    preset: str = "model_ii"
    """model_i | model_ii | model_iii."""
    share: float = 1.0
    """Relative weight (> 0): the component makes share / (sum of shares) of the images."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Simulator keys over the preset, as `data.simulator.overrides` (e.g. {instrument.psf_fwhm: 0.12})."""

    def simulator_config(self, where: str = "data.simulator.mixture.<name>") -> SimulatorConfig:
        return preset_with_overrides(self.preset, self.overrides, where)

    def validate(self, where: str) -> "MixtureComponent":
        """Raise naming `where`.share, `where`.preset or `where`.overrides.<key>."""
        share = self.share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
            raise ValueError(f"{where}.share = {share!r}: expected a finite number > 0 (the component makes "
                             "share / sum of shares of the images)")
        self.simulator_config(where)
        return self


# Physical bounds of the nuisance ranges: wide enough for any survey, narrow enough that every draw stays physical
# (|e| < 1 for any (e1, e2) drawn from source_e: 0.7 sqrt(2) < 1).
NUISANCE_RANGES: dict[str, Range] = {
    "theta_E": Range(0, 10, "arcsec", open_low=True),
    "source_R_sersic": Range(1e-3, 10, "arcsec"),
    "source_position": Range(-10, 10, "arcsec"),
    "source_e": Range(-0.7, 0.7),
    "shear": Range(-0.5, 0.5),
    "exposure_scale": Range(0, 1e3, "x the exposure time", open_low=True),
    "background_rms_scale": Range(0, 1e3, "x the background rms", open_low=True),
    "psf_fwhm_scale": Range(0, 10, "x the PSF FWHM", open_low=True),
}


@dataclass
class NuisanceConfig:
    """Nuisance parameters redrawn for every image (`data.simulator.nuisance`), so the encoder meets the spread of
    lenses, exposures and seeing it will see in real surveys; a range set to null keeps the component's own."""
    enabled: bool = False
    """Redraw the ranges below (false: every component as its preset and overrides say)."""
    theta_E: tuple[float, float] | None = (0.8, 1.8)
    """Einstein radius (arcsec), uniform, in the component's lens convention (model_ii/iii deflections x0.634)."""
    source_R_sersic: tuple[float, float] | None = (0.15, 0.4)
    """Source half-light radius (arcsec), uniform; a component with source.magnitude keeps its total flux, one with
    source.amplitude its surface brightness at R_sersic."""
    source_position: tuple[float, float] | None = (-0.35, 0.35)
    """Source centre x and y (arcsec), uniform each."""
    source_e: tuple[float, float] | None = (-0.2, 0.2)
    """Source e1 and e2, uniform each."""
    shear: tuple[float, float] | None = (-0.1, 0.1)
    """External shear gamma1 and gamma2, uniform each."""
    exposure_scale: tuple[float, float] | None = (0.5, 2.0)
    """Factor on each image's exposure time, log-uniform: its shot noise, and its counts with output_counts (noise
    only where instrument.noise is on: model_ii/iii are noiseless unless overridden)."""
    background_rms_scale: tuple[float, float] | None = (0.5, 2.0)
    """Factor on the component's background rms, log-uniform, per image (where instrument.noise is on)."""
    psf_fwhm_scale: tuple[float, float] | None = (0.8, 1.25)
    """Factor on the component's PSF FWHM, log-uniform, one draw per sub-batch (one component, one class): a
    render convolves with one PSF."""

    def validate(self, where: str = "data.simulator.nuisance") -> "NuisanceConfig":
        """Raise naming the first range outside its physical bounds (`NUISANCE_RANGES`)."""
        for name, bounds in NUISANCE_RANGES.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, tuple) and len(value) == 2
                                          and all(map(bounds.holds, value)) and value[0] <= value[1]):
                raise ValueError(f"{where}.{name} = {value!r}: expected (low, high) with low <= high, both finite "
                                 f"in {bounds}, or null (the component's own)")
        return self


def share_counts(shares: Sequence[float], start: int, n: int) -> list[int]:
    """Images of each component among positions start .. start + n - 1 (the module docstring's rule)."""
    total = sum(map(Fraction, shares))
    cumulative = [c / total for c in itertools.accumulate(map(Fraction, shares))]
    held = [math.floor((start + n) * c) - math.floor(start * c) for c in cumulative]
    return [b - a for a, b in zip([0, *held], held)]


def class_split(first: int, n: int) -> list[int]:
    """Images of each class among n consecutive positions, classes in turn from class `first` mod 3."""
    base, extra = divmod(n, len(CLASSES))
    return [base + ((j - first) % len(CLASSES) < extra) for j in range(len(CLASSES))]


def common_side(components: Sequence[tuple[str, float, SimulatorConfig]], resize_to: int | None,
                resize_mode: str) -> tuple[int, str]:
    """(side, resampling mode) every component's images are brought to: `data.resize` by `data.resize_mode`, else
    the largest n_pix by interpolation. Refuses a crop larger than a component's images."""
    if resize_to is None:
        return max(config.instrument.n_pix for _, _, config in components), "interpolate"
    for name, _, config in components:
        n = config.instrument.n_pix
        if resize_mode == "crop" and n < resize_to:
            raise ValueError(f"data.resize={resize_to} with resize_mode=crop: images of {name} are [1, {n}, {n}], "
                             "smaller than the crop; use data.resize_mode=interpolate")
    return resize_to, resize_mode


def batch_generators(entropy: np.random.SeedSequence, device: torch.device | str
                     ) -> tuple[torch.Generator, torch.Generator, torch.Generator, torch.Generator]:
    """(parameters on the CPU, noise on `device`, order on the CPU, nuisance on the CPU) of one batch. The first
    words of `generate_state` do not depend on how many are asked for: the nuisance generator leaves the others as
    they were without it."""
    params, noise, order, nuisance = (int(s) >> 1 for s in entropy.generate_state(4, np.uint64))
    return (torch.Generator().manual_seed(params), torch.Generator(device=device).manual_seed(noise),
            torch.Generator().manual_seed(order), torch.Generator().manual_seed(nuisance))


def redraw_nuisance(p: LensParams, config: SimulatorConfig, nuisance: NuisanceConfig,
                    generator: torch.Generator) -> LensParams:
    """`p` with every range of `nuisance` that is set redrawn around `config` (the module docstring), in a fixed
    order of draws."""
    n = len(p)

    def uniform(bounds: tuple[float, float], size: int = n) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(size, generator=generator, dtype=torch.float64)

    def log_uniform(bounds: tuple[float, float], size: int = n) -> torch.Tensor:
        return 10 ** uniform((math.log10(bounds[0]), math.log10(bounds[1])), size)

    new: dict[str, Any] = {}
    if nuisance.theta_E is not None:
        new["theta_E"] = uniform(nuisance.theta_E)
    if nuisance.source_R_sersic is not None:
        new["source_R_sersic"] = uniform(nuisance.source_R_sersic)
        if config.source.magnitude is not None:     # a magnitude fixes the total flux, ~ amp R^2
            new["source_amp"] = p.source_amp * (p.source_R_sersic / new["source_R_sersic"]) ** 2
    if nuisance.source_position is not None:
        new["source_x"], new["source_y"] = uniform(nuisance.source_position), uniform(nuisance.source_position)
    if nuisance.source_e is not None:
        new["source_e1"], new["source_e2"] = uniform(nuisance.source_e), uniform(nuisance.source_e)
    if nuisance.shear is not None:
        new["gamma1"], new["gamma2"] = uniform(nuisance.shear), uniform(nuisance.shear)
    if nuisance.exposure_scale is not None:
        new["exposure_time"] = p.exposure_time * log_uniform(nuisance.exposure_scale)
    if nuisance.background_rms_scale is not None:
        new["background_rms"] = config.instrument.background_rms * log_uniform(nuisance.background_rms_scale)
    if nuisance.psf_fwhm_scale is not None:
        new["psf_fwhm"] = config.instrument.psf_fwhm * float(log_uniform(nuisance.psf_fwhm_scale, 1))
    return dataclasses.replace(p, **new)


class Mixture:
    """The components' simulators on one device, the side their images are brought to and the nuisance ranges:
    draws the images of a batch given how many of each (component, class)."""

    def __init__(self, components: Sequence[tuple[str, float, SimulatorConfig]], nuisance: NuisanceConfig,
                 device: torch.device | str, side: int, mode: str = "interpolate"):
        self.names = [name for name, _, _ in components]
        self.shares = [share for _, share, _ in components]
        self.device = torch.device(device)
        self.sims = [LensSimulator(config, str(self.device)) for _, _, config in components]
        self.nuisance, self.side, self.mode = nuisance, side, mode

    def batch_cells(self, index: int, batch_size: int) -> list[list[int]]:
        """[component][class] image counts of global batch `index` of a stream (the module docstring's rule)."""
        cells, first = [], 0
        for n in share_counts(self.shares, index * batch_size, batch_size):
            cells.append(class_split(index + first, n))
            first += n
        return cells

    def class_cells(self, label: int, start: int, n: int) -> list[list[int]]:
        """[component][class] image counts of a batch of n images of class `label`, its images start .. start+n-1."""
        return [[count if j == label else 0 for j in range(len(CLASSES))]
                for count in share_counts(self.shares, start, n)]

    def sample(self, k: int, class_name: str, n: int, params: torch.Generator,
               nuisance: torch.Generator) -> LensParams:
        """Parameters of n images of one class from component k, nuisances redrawn when enabled."""
        drawn = self.sims[k].sample(class_name, n, params)
        return redraw_nuisance(drawn, self.sims[k].config, self.nuisance, nuisance) if self.nuisance.enabled \
            else drawn

    def draw(self, cells: list[list[int]], params: torch.Generator, noise: torch.Generator,
             nuisance: torch.Generator, metadata: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Raw images (N, 1, side, side) on the device, their labels (N,) on the CPU and, with `metadata`, one dict
        per image (its parameters and `component`), for cells[k][j] images of class j from component k, in that
        order."""
        images, labels, metas = [], [], []
        for k, (sim, row) in enumerate(zip(self.sims, cells)):
            for label, (class_name, n) in enumerate(zip(CLASSES, row)):
                if n:
                    p = self.sample(k, class_name, n, params, nuisance)
                    images.append(resize(sim.add_noise(sim.render(p), p, noise), self.side, self.mode))
                    labels.append(torch.full((n,), label, dtype=torch.int64))
                    if metadata:
                        metas += [{**m, "component": self.names[k]} for m in sim.metadata(p)]
        return torch.cat(images), torch.cat(labels), metas

    def describe(self) -> dict:
        """The components as resolved (normalised share, full simulator config), the side and the nuisances."""
        total = sum(self.shares)
        return {"components": {name: {"share": share / total, "simulator": plain(to_dict(sim.config))}
                               for name, share, sim in zip(self.names, self.shares, self.sims)},
                "side": self.side, "resize_mode": self.mode, "nuisance": plain(to_dict(self.nuisance))}


def write_mixture_set(mixture: Mixture, counts: dict[str, int], out: Path | str, source: dict, seed: int,
                      batch_size: int, shard_size: int = 2048, samples_per_record: int = 256) -> Path:
    """A new shard dataset of `counts[split]` raw images per class, drawn from `mixture` at its side (in this
    process): split by split, in rounds of one batch per class (`plan_batches`) written with their classes spread
    over the shards (`add_round`), each class's images in a split shared among the components by the share rule
    over its running count there; batch j (over all splits) seeded by (seed, EVAL_KEY, j)."""
    batches = ((split, class_name, k) for split, n in counts.items()
               for class_name, [(_, k)] in plan_batches({split: n}, batch_size))
    with DatasetWriter(out, (1, mixture.side, mixture.side), source, shard_size=shard_size,
                       samples_per_record=samples_per_record, seed=seed) as writer:
        drawn: dict[tuple[str, str], int] = {}
        held: list[tuple[np.ndarray, np.ndarray, list[dict]]] = []
        for index, (split, class_name, n) in enumerate(batches):
            start = drawn.get((split, class_name), 0)
            drawn[split, class_name] = start + n
            cells = mixture.class_cells(CLASSES.index(class_name), start, n)
            params, noise, _, nuisance = batch_generators(np.random.SeedSequence(seed, spawn_key=(EVAL_KEY, index)),
                                                          mixture.device)
            images, labels, metas = mixture.draw(cells, params, noise, nuisance, metadata=True)
            images, at = images.float().cpu().numpy(), 0
            for sim, row in zip(mixture.sims, cells):      # each component's images, named by its own settings
                check_batch(images[at:at + sum(row)], class_name, index, sim.config, "float32")
                at += sum(row)
            held.append((images, labels.numpy(), metas))
            if len(held) == len(CLASSES):      # a round: one batch of each class, spread over the split together
                add_round(writer, [(split, n)], held)
                held = []
    return Path(out)
