"""`dlscale.sim`: batched strong-lensing simulator in torch: the DeepLense Model I/II/III physics, fast enough for 10^5-10^7 images.

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

Training streams (`dlscale.sim.stream`) draw fresh batches from one preset or, with `dlscale.sim.mixture`, from
several instruments at once, with nuisance parameters redrawn within physical ranges.

Speed: parameters the whole batch shares (the fixed DeepLense macro lens) are computed once per batch; the rest is
in-place elementwise torch, so CPU batches of 16-64 and GPU batches of 1024+ work well. On CPU, glibc handing freed
memory back to the OS costs up to a third of the time (64x64 images); MALLOC_TRIM_THRESHOLD_=1000000000
MALLOC_MMAP_THRESHOLD_=100000000 in the environment avoids it.

    dlscale simulate --preset model_ii --n-per-class 10000 --out data/sim_ii --splits train=0.9,val=0.1
    dlscale simulate --preset model_i --n-per-class 1000 --out data/reg --lens.randomize=true --device cuda
    dlscale simulate --config sim.yaml --n-per-class 100 --out data/x --instrument.supersampling=2 --instrument.noise=true
    dlscale simulate --preset model_iii --n-per-class 100000 --out data/sim_iii --workers 16     # CPU node
"""
from dlscale.sim.config import PRESETS, SimulatorConfig, load_config, preset_config
from dlscale.sim.simulator import LensParams, LensSimulator
from dlscale.sim.write import simulate, simulate_main

__all__ = ["LensParams", "LensSimulator", "PRESETS", "SimulatorConfig", "load_config", "preset_config",
           "simulate", "simulate_main"]
