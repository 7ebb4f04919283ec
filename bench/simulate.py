"""Simulator throughput (images/s) per preset and class: dlscale's torch simulator against lenstronomy on the same
physics and the same CPU cores, in one run; prints JSON.

    OMP_WAIT_POLICY=PASSIVE python bench/simulate.py                   # CPU, all cores, both engines
    python bench/simulate.py --processes 1 --seconds 5
    python bench/simulate.py --device cuda                             # GPU figures (lenstronomy still on CPU)

On CPU both engines run in `--processes` processes of one thread each (what `dlscale simulate --workers N` does;
one process with N intra-op threads scales poorly on 64x64 batches), and a figure is the sum of their rates.
torch: `LensSimulator.simulate` end to end (parameters, rendering, noise, float32 numpy, metadata), batches of
`--batch-size`. `torch_randomized` draws theta_E, e1, e2 and shear per image (regression sets); the DeepLense presets
keep the macro lens fixed, which the simulator computes once per batch. On CUDA, torch runs in this process and
`torch_render` also gives images/s without the copy to the host and the metadata.
lenstronomy: one ImageModel per class reused for every image (SIE + SHEAR + one POINT_MASS per subhalo, Sersic
source, Gaussian PSF, the same noise recipe) on parameters drawn by our sampler; Model II/III's z_source_convention
scaling is applied to the parameters.
Each figure is the best of `--repeats` interleaved rounds: other load on a shared machine only ever slows one down.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")        # one thread per worker process, for both engines

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dlscale.data.classes import CLASSES  # noqa: E402
from dlscale.sim import LensSimulator, preset_config  # noqa: E402

PRESETS = ("model_i", "model_ii", "model_iii")


def torch_rate(preset: str, class_name: str, device: str, batch_size: int, seconds: float, randomize: bool,
               render_only: bool = False) -> float:
    config = preset_config(preset)
    config.lens.randomize = randomize
    sim = LensSimulator(config, device)
    params_gen, noise_gen = sim.generators(0)

    def step() -> None:
        if render_only:
            params = sim.sample(class_name, batch_size, params_gen)
            sim.add_noise(sim.render(params), params, noise_gen)
        else:
            sim.simulate(class_name, batch_size, params_gen, noise_gen)

    step()
    sync = torch.cuda.synchronize if sim.device.type == "cuda" else (lambda: None)
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch_size
    sync()
    return done / (time.perf_counter() - start)


def _torch_worker(job: tuple) -> float:
    return torch_rate(*job)


def _lenstronomy_worker(job: tuple[str, str, float]) -> float:
    """Render images of one class with lenstronomy for `seconds`; return images/s."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    preset, class_name, seconds = job
    seed = os.getpid()
    sim = LensSimulator(preset_config(preset), "cpu", torch.float64)
    inst, scale = sim.config.instrument, sim.deflection_scale
    params = sim.sample(class_name, 256, sim.generators(seed)[0])
    if params.vortex_points:
        xs, ys = params.vortex_positions()
        theta_Es = params.vortex_theta_E[:, None].expand_as(xs)
    else:
        xs, ys, theta_Es = params.subhalo_x, params.subhalo_y, params.subhalo_theta_E
    n, d = inst.n_pix, inst.pixel_scale
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=-(n - 1) / 2 * d, dec_at_xy_0=-(n - 1) / 2 * d,
                     transform_pix2angle=np.diag([d, d]))
    psf = PSF(psf_type="GAUSSIAN", fwhm=inst.psf_fwhm, pixel_size=d, truncation=inst.psf_truncation)
    model = ImageModel(data, psf, lens_model_class=LensModel(["SIE", "SHEAR"] + ["POINT_MASS"] * xs.shape[1]),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics={"supersampling_factor": inst.supersampling})
    rng = np.random.default_rng(seed)
    kwargs = []
    for b in range(len(params)):
        lens = [dict(theta_E=params.theta_E[b].item() * scale, e1=params.e1[b].item(), e2=params.e2[b].item()),
                dict(gamma1=params.gamma1[b].item() * scale, gamma2=params.gamma2[b].item() * scale)]
        lens += [dict(theta_E=t * math.sqrt(scale), center_x=x, center_y=y)
                 for t, x, y in zip(theta_Es[b].tolist(), xs[b].tolist(), ys[b].tolist())]
        source = [dict(amp=params.source_amp[b].item(), R_sersic=params.source_R_sersic[b].item(),
                       n_sersic=params.source_n_sersic[b].item(), e1=params.source_e1[b].item(),
                       e2=params.source_e2[b].item(), center_x=params.source_x[b].item(),
                       center_y=params.source_y[b].item())]
        kwargs.append((lens, source, params.exposure_time[b].item()))

    def one(b: int) -> np.ndarray:
        lens, source, exposure = kwargs[b % len(kwargs)]
        image = model.image(lens, source)
        if inst.noise:      # the same recipe as LensSimulator.add_noise (DeepLenseSim's for Model I)
            sigma = np.sqrt(inst.background_rms ** 2 + (np.clip(image, 0, None) / exposure if inst.poisson_noise
                                                        else 0))
            image = image + rng.standard_normal(image.shape) * sigma
        if inst.output_counts:
            image = np.clip(image * exposure, 0, None)
            if inst.noise:
                image = rng.poisson(image).astype(np.float64)
        return image.astype(np.float32)

    one(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one(done)
        done += 1
    return done / (time.perf_counter() - start)


def _start_worker() -> None:
    torch.set_num_threads(1)
    import lenstronomy.ImSim.image_model  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--processes", type=int, default=os.cpu_count(), help="CPU processes per engine, one thread each")
    p.add_argument("--batch-size", type=int, help="default 32 on CPU, 1024 on CUDA")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure and round")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is reported")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--no-lenstronomy", action="store_true", help="torch figures only")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (1024 if cuda else 32)
    pool = multiprocessing.get_context("spawn").Pool(args.processes, _start_worker)
    pool.map(abs, range(args.processes))          # every worker started before anything is timed

    def on_cpu(worker, job: tuple) -> float:
        return sum(pool.map(worker, [job] * args.processes))

    rows = []
    try:
        for preset in args.presets.split(","):
            for name in CLASSES:
                figures = {}
                for key, randomize in (("torch", False), ("torch_randomized", True)):
                    job = (preset, name, args.device, batch, args.seconds, randomize)
                    figures[key] = (lambda job=job: torch_rate(*job)) if cuda else (
                        lambda job=job: on_cpu(_torch_worker, job))
                if cuda:
                    figures["torch_render"] = lambda: torch_rate(preset, name, args.device, batch, args.seconds,
                                                                 False, True)
                if not args.no_lenstronomy:
                    figures["lenstronomy"] = lambda: on_cpu(_lenstronomy_worker, (preset, name, args.seconds))
                row = {"preset": preset, "class": name, **{key: 0.0 for key in figures}}
                for _ in range(args.repeats):
                    for key, measure in figures.items():
                        row[key] = max(row[key], measure())
                if not args.no_lenstronomy:
                    row["ratio"] = row["torch"] / row["lenstronomy"]
                    row["ratio_randomized"] = row["torch_randomized"] / row["lenstronomy"]
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    finally:
        pool.terminate()
        pool.join()
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(json.dumps({"unit": "images/s", "device": args.device, "device_name": device,
                      "cpu_processes": args.processes, "batch_size": batch, "best_of": args.repeats,
                      "float": "float32", "torch_version": torch.__version__, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
