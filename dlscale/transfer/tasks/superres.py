"""The superres task: does the pretrained encoder help super-resolution where high-resolution images are scarce?

Pairs: the high-resolution image is the stored image (at the encoder's input size, `data.resize` applied), min-max
scaled to [0, 1] per image; its low-resolution version is its antialiased bicubic downsampling by
`superres.network.scale` (`dlscale.models.sr`). The SR network (`SRNet`: residual on bicubic, a conv path from the
low-resolution pixels, PixelShuffle) is trained on the subset's N-per-class images (labels unused) for
`superres.steps` Adam steps (cosine decay), by each of `superres.methods`, all at the same budget:

    scratch   the network alone, no encoder (one cell per N, model "-")
    frozen    guided by the pretrained encoder's feature map of the bicubic upsample, encoder frozen
    finetune  the same, the encoder trained too (at `encoder_lr_scale` x the learning rate; BatchNorm statistics
              kept)

PSNR and SSIM (torchmetrics, data range 1, 11x11 Gaussian window) per eval image of the clamped output, on a
class-stratified set of `superres.eval_images` eval images (the first of each class by id), averaged overall and per
class (`psnr_cdm`, `psnr_axion`, ...), with the study's two-level bootstrap CI; bicubic is the baseline row. Each
fit runs with `superres.threads` torch threads (one: on a small shared CPU, more threads spend their time in the
kernel waiting for each other) and logs its progress and time.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlscale.data.classes import CLASSES
from dlscale.data.transforms import normalize
from dlscale.figures import grid_figure
from dlscale.models.sr import (MIN_LOW_SIDE, SSIM_WINDOW, SRConfig, SRNet, bicubic_down, bicubic_up, example_grid,
                               sr_loss, sr_scores, unit_range)
from dlscale.transfer import samples
from dlscale.transfer.bootstrap import weighted_mean
from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize

log = logging.getLogger(__name__)
ANCHOR_SOURCE = ("DeepLense Model II 2x super-resolution (noiseless, antialiased bicubic), Lens-FM-DeepLense "
                 "repository (Lens-LeJEPA); other data")


@dataclass(frozen=True)
class Guidance:
    """How a method uses the pretrained encoder."""
    encoder: bool
    """Whether the encoder's feature map guides the network."""
    train_encoder: bool
    """Whether the encoder is trained with the network."""


GUIDANCE = {"scratch": Guidance(False, False), "frozen": Guidance(True, False), "finetune": Guidance(True, True)}


@dataclass
class SuperresOptions:
    """The superres downstream task (`dlscale transfer --tasks superres`)."""
    steps: int = 300
    """Adam steps of every SR fit (every method and N the same budget)."""
    batch_size: int = 16
    """High-resolution images per step."""
    lr: float = 1e-3
    """Adam learning rate, decayed to zero over `steps` (cosine)."""
    encoder_lr_scale: float = 0.1
    """finetune: the encoder's learning rate as a multiple of `lr`."""
    eval_images: int = 300
    """Eval images scored: the first eval_images / 3 of each class by id."""
    methods: list[str] = field(default_factory=lambda: list(GUIDANCE))
    """Some of scratch | frozen | finetune."""
    threads: int = 1
    """torch threads of each fit (restored after)."""
    network: SRConfig = field(default_factory=SRConfig)
    """The SR network (scale 2 or 4, width, blocks, block type)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.threads < 1 or self.eval_images < len(CLASSES):
            raise ValueError(f"superres: steps, batch_size and threads must be >= 1 and eval_images >= {len(CLASSES)} "
                             f"(got {self.steps}, {self.batch_size}, {self.threads}, {self.eval_images})")
        if self.lr <= 0 or self.encoder_lr_scale <= 0:
            raise ValueError(f"superres: lr and encoder_lr_scale must be > 0 (got {self.lr}, {self.encoder_lr_scale})")
        unknown = sorted(set(self.methods) - set(GUIDANCE))
        if unknown or not self.methods:
            raise ValueError(f"superres.methods {self.methods}: expected some of {', '.join(GUIDANCE)}")


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Guide(nn.Module):
    """The encoder's feature map of bicubic upsamples, normalised as the encoder was trained; BatchNorm statistics
    stay those of pretraining (eval mode) even when the encoder is trained."""

    def __init__(self, encoder: nn.Module, method: str) -> None:
        super().__init__()
        self.encoder, self.method = encoder.eval(), method

    def forward(self, up: torch.Tensor) -> torch.Tensor:
        return self.encoder(normalize(up, self.method))

    def train(self, mode: bool = True):
        return self     # the encoder stays in eval mode


def fit_sr(high: torch.Tensor, opts: SuperresOptions, seed: int, guide: Guide | None = None,
           train_encoder: bool = False, device: torch.device | str = "cpu", every: int = 0,
           on_progress=None) -> SRNet:
    """Train an SRNet on `high` (N, C, H, W) images in [0, 1] for `opts.steps` steps of L1 on seeded random batches.
    `guide`: the encoder (frozen unless `train_encoder`; a frozen encoder's maps are computed once). `on_progress(
    step, net)` is called every `every` steps (the net in eval mode for it)."""
    torch.manual_seed(seed)
    scale = opts.network.scale
    low = bicubic_down(high, scale).to(device)
    high = high.to(device)
    net = SRNet(opts.network, high.shape[1], guide.encoder.out_channels if guide is not None else 0).to(device)
    groups = [{"params": net.parameters(), "lr": opts.lr}]
    maps = None
    if guide is not None and train_encoder:
        groups.append({"params": guide.parameters(), "lr": opts.lr * opts.encoder_lr_scale})
    elif guide is not None:
        guide.requires_grad_(False)
        with torch.no_grad():
            maps = torch.cat([guide(bicubic_up(low[s:s + 64], scale)) for s in range(0, len(low), 64)])
    optimiser = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, opts.steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, opts.steps + 1):
        batch = torch.randint(0, len(high), (min(opts.batch_size, len(high)),), generator=generator).to(device)
        feature_map = None if guide is None else maps[batch] if maps is not None else \
            guide(bicubic_up(low[batch], scale))
        loss = sr_loss(net(low[batch], feature_map), high[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if on_progress is not None and every and (step % every == 0 or step == opts.steps):
            net.eval()
            on_progress(step, net)
            net.train()
    return net.eval()


def super_resolve(net: SRNet, low: torch.Tensor, guide: Guide | None = None, device="cpu",
                  batch: int = 64) -> torch.Tensor:
    """The network's output (unclamped) for `low` images, on the CPU."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(low), batch):
            part = low[start:start + batch].to(device)
            feature_map = guide(bicubic_up(part, net.cfg.scale)) if guide is not None else None
            parts.append(net(part, feature_map).cpu())
    return torch.cat(parts)


def stratified(labels: np.ndarray, total: int) -> np.ndarray:
    """Indices of the first total / K samples of each class (id order kept)."""
    per_class = max(total // len(CLASSES), 1)
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASSES))])
    return np.sort(keep)


def per_image(pred: torch.Tensor, high: torch.Tensor) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sr_scores(pred, high).items()}


@DOWNSTREAM.register
class SuperResolution(DownstreamTask):
    name = "superres"
    needs = (f"images whose side the scale divides, with a low-resolution side >= {MIN_LOW_SIDE} and a "
             f"high-resolution side >= {SSIM_WINDOW} (after data.resize)")
    metrics = ("psnr", "ssim", "psnr_cdm", "psnr_axion", "ssim_cdm", "ssim_axion")
    anchors = (Anchor("psnr", 41.07, "bicubic", ANCHOR_SOURCE), Anchor("psnr", 65.12, "RCAN from scratch",
                                                                       ANCHOR_SOURCE),
               Anchor("psnr", 48.32, "LeJEPA ViT-S + LoRA", ANCHOR_SOURCE))
    in_default = False
    Config = SuperresOptions
    note = ("low resolution = antialiased bicubic downsampling of the [0,1]-scaled image; an SR network (residual on "
            "bicubic) trained on the subset's images (labels unused) from scratch, guided by the frozen encoder, or "
            "with the encoder fine-tuned, same steps; PSNR / SSIM per eval image (overall and per class), bicubic "
            "as the baseline row")

    def unmet(self, study) -> str | None:
        scale = study.cfg.options(self.name).network.scale
        for source in study.sources:
            height, width = source.image_shape[1:]
            if height % scale or width % scale or min(height, width) // scale < MIN_LOW_SIDE or \
                    min(height, width) < SSIM_WINDOW:
                return f"the encoders take {height}x{width} images, which {scale}x super-resolution cannot halve"
        return None

    def run(self, study) -> list[dict]:
        cfg, opts = study.cfg, study.cfg.options(self.name)
        scale, stream = opts.network.scale, study.stream(study.sources[0])
        train = samples.images(cfg.data_dir, "train", stream)
        evald = samples.images(cfg.eval_dir, cfg.split, stream)
        keep = stratified(evald["labels"], opts.eval_images)
        train_high = unit_range(torch.from_numpy(train["images"]))[0]
        self.eval_high = unit_range(torch.from_numpy(evald["images"][keep]))[0]
        self.eval_low = bicubic_down(self.eval_high, scale)
        self.labels = evald["labels"][keep]
        base = per_image(bicubic_up(self.eval_low, scale), self.eval_high)
        cells = [cell(self.name, "bicubic", "-", n, 0, summarize(self.draw([base]), 1, len(keep), study))
                 for n in cfg.labels_per_class]
        jobs = [(m, None) for m in opts.methods if not GUIDANCE[m].encoder] + \
            [(m, s) for m in opts.methods if GUIDANCE[m].encoder for s in study.sources]
        fits = [(m, s, n, r) for m, s in jobs for n in cfg.labels_per_class for r in range(cfg.repeats)]
        per: dict[tuple, list[dict]] = {}
        self.examples: dict = {}
        start = time.perf_counter()
        bar = tqdm(fits, desc=f"superres ({opts.steps} steps per fit)", unit="fit")
        with torch_threads(opts.threads):
            for method, source, n, r in bar:
                index = torch.from_numpy(study.subsets[r][n])
                guide = None if source is None else Guide(study.encoder(source, None), source.normalize)
                if guide is not None:
                    guide.to(study.device)
                net = fit_sr(train_high[index], opts, cfg.seed + r, guide, GUIDANCE[method].train_encoder,
                             study.device)
                pred = super_resolve(net, self.eval_low, guide, study.device)
                model = "-" if source is None else source.label
                per.setdefault((method, model, n), []).append(per_image(pred, self.eval_high))
                self.examples.setdefault((method, model), pred[:2])
                bar.set_postfix(psnr=f"{per[(method, model, n)][-1]['psnr'].mean():.2f}")
        log.info("superres: %d fits of %d steps in %.0f s", len(fits), opts.steps, time.perf_counter() - start)
        cells += [cell(self.name, method, model, n, study.n_train(n),
                       summarize(self.draw(values), len(values), len(keep), study))
                  for (method, model, n), values in per.items()]
        return cells

    def draw(self, values: list[dict]):
        """Overall and per-class means of each repeat's per-image PSNR / SSIM under the bootstrap's counts."""
        masks = {name: self.labels == k for k, name in enumerate(CLASSES)}

        def one(r: int, counts: np.ndarray) -> dict:
            out = {}
            for key, v in values[r].items():
                out[key] = weighted_mean(v, counts)
                out.update({f"{key}_{name}": weighted_mean(v[mask], counts[:, mask]) for name, mask in masks.items()})
            return out
        return one

    def figures(self, study, cells: list[dict]) -> dict:
        """HR / LR / bicubic / SR / |SR - HR| of the first two eval images, one row per method (its first fit)."""
        scale, rows, labels = study.cfg.options(self.name).network.scale, [], []
        for (method, model), pred in self.examples.items():
            rows.append(example_grid(self.eval_high[:2], self.eval_low[:2], pred[:2], scale).numpy())
            labels += [f"{method} {model}".strip(" -")] * len(rows[-1])
        return {"superres_examples.png": grid_figure(np.concatenate(rows), row_labels=labels)} if rows else {}
