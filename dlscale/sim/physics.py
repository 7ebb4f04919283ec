"""The physics of one image, lenstronomy's conventions: flat-LambdaCDM distances, SIE + shear + point-mass
deflections, the elliptical Sersic source, pixel grid, Gaussian PSF (see `dlscale.sim` for the conventions)."""
from __future__ import annotations

import math

import numpy as np
import torch

from dlscale.sim.config import CosmologyConfig, LensConfig

ARCSEC_PER_RAD = 180.0 * 3600.0 / math.pi
SPEED_OF_LIGHT_M_S = 299_792_458.0
G_SI = 6.67430e-11                      # m^3 kg^-1 s^-2 (CODATA 2018, as astropy)
MSUN_KG = 1.988409870698051e30          # IAU 2015 nominal solar mass (as astropy)
MPC_M = 3.0856775814913673e22
SIE_SMOOTHING_ARCSEC = 1e-10            # lenstronomy's SIE is its NIE with this core
SIE_MIN_K = math.sqrt(1.0 - 0.99999999 ** 2)   # lenstronomy caps q at 0.99999999 inside the NIE formulae
SERSIC_SMOOTHING_ARCSEC = 1e-4          # lenstronomy floors Sersic radii at this


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


def power_law_masses(u: torch.Tensor, mass_range: tuple[float, float], slope: float) -> torch.Tensor:
    """Inverse-CDF draw of dN/dm ~ m^slope on [low, high] from uniforms u."""
    low, high = mass_range
    if slope == -1:
        return low * (high / low) ** u
    a = slope + 1
    return (low ** a + u * (high ** a - low ** a)) ** (1 / a)
