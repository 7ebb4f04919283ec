"""The superres task: 2x super-resolution with a light head on the frozen encoder's feature map.

Pairs: the high-resolution image is the stored image (at the encoder's input size, `data.resize` applied),
min-max scaled to [0, 1] per image; its low-resolution version is the 2x2 block average of it (the same lens).
The head sees the bicubic upsampling of the low-resolution image and the frozen encoder's feature map of that
upsampling (normalised as the encoder was trained), bilinearly resized to the image; two convolutions predict a
residual on top of bicubic, zero-initialised so an untrained head is bicubic. It is trained on the subset's N-per-
class images (labels unused) for `superres_steps` Adam steps. PSNR and SSIM (torchmetrics, data range 1, SSIM's
11x11 Gaussian window, sigma 1.5, at every pixel of the
reflect-padded image) per eval image, averaged, with the study's bootstrap CI; bicubic is the baseline
row, the random-init encoder the control. Only the frozen encoder is measured (no fine-tuning).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dlscale.data.stream import normalize
from dlscale.transfer import samples
from dlscale.transfer.bootstrap import weighted_mean
from dlscale.transfer.tasks.base import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize

MIN_SIDE = 16              # halved to 8, and SSIM's 11x11 window fits the high-resolution image
ANCHOR_SOURCE = "DeepLense Model II 2x super-resolution (noiseless), as quoted in the dlscale issue; other data"
BATCH = 16


def pair(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high resolution in [0, 1] per image, its 2x2 block average)."""
    flat = images.flatten(1)
    lo, hi = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
    high = (images - lo) / (hi - lo).clamp_min(1e-12)
    return high, F.avg_pool2d(high, 2)


def bicubic(low: torch.Tensor) -> torch.Tensor:
    return F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of predictions clipped to the data range [0, 1]."""
    pred = pred.clamp(0, 1).double()
    target = target.double()
    return {"psnr": peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none",
                                            dim=(1, 2, 3)).numpy(),
            "ssim": structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none").numpy()}


class UpsampleHead(nn.Module):
    """bicubic + a residual from [bicubic image, feature map resized to it]: conv 3x3, GELU, conv 3x3."""

    def __init__(self, image_channels: int, feature_channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(image_channels + feature_channels, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, image_channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, up: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        fmap = F.interpolate(feature_map, size=up.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.net(torch.cat([up, fmap], 1))


def feature_maps(encoder: nn.Module, up: torch.Tensor, method: str, device) -> torch.Tensor:
    """The frozen encoder's (B, C, h, w) map of the upsampled images, normalised as in its training."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(up), 64):
            x = normalize(up[start:start + 64].to(device), method)
            out = encoder(x)
            if out.dim() != 4:
                raise ValueError("--tasks superres: the encoder gives no spatial feature map (shape "
                                 f"{list(out.shape)}); the task needs a convolutional feature map")
            parts.append(out.float().cpu())
    return torch.cat(parts)


def fit_head(up: torch.Tensor, fmap: torch.Tensor, high: torch.Tensor, steps: int, seed: int) -> UpsampleHead:
    """Adam (lr 2e-3) on the mean squared error, `steps` batches of 16 pairs drawn with a seeded generator."""
    torch.manual_seed(seed)
    head = UpsampleHead(up.shape[1], fmap.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(up), (min(BATCH, len(up)),), generator=generator)
        loss = F.mse_loss(head(up[batch], fmap[batch]), high[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head.eval()


@dataclass
class SuperresOptions:
    steps: int = 200
    """Adam steps of the super-resolution head"""
    eval_images: int = 512
    """eval images scored (the first by id)"""

    def validate(self) -> None:
        if self.steps < 1 or self.eval_images < 1:
            raise ValueError("task_options.superres.steps and eval_images must be >= 1")


@DOWNSTREAM.register
class SuperResolution(DownstreamTask):
    name = "superres"
    needs = f"images of even side >= {MIN_SIDE} (after data.resize) to halve and score with SSIM's 11x11 window"
    metrics = ("psnr", "ssim")
    Config = SuperresOptions
    anchors = (Anchor("psnr", 41.1, "bicubic", ANCHOR_SOURCE), Anchor("psnr", 65.1, "RCAN", ANCHOR_SOURCE),
               Anchor("psnr", 48.3, "Lens-LeJEPA + LoRA", ANCHOR_SOURCE))
    note = ("2x: low resolution = 2x2 block average of the [0,1]-scaled image; a 2-conv head on the frozen feature "
            "map predicts a residual on bicubic, trained on the subset's images; PSNR / SSIM per eval image, "
            "bicubic as the baseline row; frozen encoder only (no fine-tuning)")

    def unmet(self, study) -> str | None:
        side = study.sources[0].image_shape[1:] if study.sources else ()
        if any(s % 2 or s < MIN_SIDE for src in study.sources for s in src.image_shape[1:]):
            return f"the encoders take {list(side)} images, too small (or odd) to halve"
        return None

    def run(self, study) -> list[dict]:
        cfg, cells, options = study.cfg, [], study.cfg.options(self.name)
        source0 = study.sources[0]
        stream = study.stream(source0)
        train = samples.images(cfg.data_dir, "train", stream)
        evald = samples.images(cfg.eval_dir, cfg.split, stream, options.eval_images)
        train_high, train_low = pair(torch.from_numpy(train["images"]))
        self.eval_high, eval_low = pair(torch.from_numpy(evald["images"]))
        train_up, self.eval_up = bicubic(train_low), bicubic(eval_low)
        base = image_metrics(self.eval_up, self.eval_high)
        n_eval = len(self.eval_high)
        self.examples: dict = {}
        for n in cfg.labels_per_class:
            cells.append(cell(self.name, "bicubic", "-", n, 0, summarize(self.draw([base]), 1, n_eval, study)))
        per: dict[tuple, list[dict]] = {}
        for method, model, source, init_seed in study.frozen_jobs():
            encoder = study.encoder(source, init_seed).to(study.device).eval()
            train_maps = feature_maps(encoder, train_up, source.normalize, study.device)
            eval_maps = feature_maps(encoder, self.eval_up, source.normalize, study.device)
            for n in cfg.labels_per_class:
                for r in study.frozen_repeats(method, n, init_seed):
                    index = torch.from_numpy(study.subsets[r][n])
                    head = fit_head(train_up[index], train_maps[index], train_high[index], options.steps,
                                    cfg.seed + r)
                    with torch.no_grad():
                        pred = torch.cat([head(self.eval_up[s:s + 64], eval_maps[s:s + 64])
                                          for s in range(0, n_eval, 64)])
                    per.setdefault((method, model, n), []).append(image_metrics(pred, self.eval_high))
                    self.examples.setdefault((method, model), pred[:4].clamp(0, 1))
        cells += [cell(self.name, method, model, n, study.n_train(n),
                       summarize(self.draw(values), len(values), n_eval, study))
                  for (method, model, n), values in per.items()]
        return cells

    @staticmethod
    def draw(values: list[dict]):
        return lambda r, counts: {k: weighted_mean(v, counts) for k, v in values[r].items()}

    def figures(self, study, cells: list[dict]) -> dict:
        """Example grid: low resolution (bicubic), each head's output (first N's first repeat), the truth."""
        columns = [("bicubic", self.eval_up), *((f"{m} {k}", p) for (k, m), p in self.examples.items()),
                   ("high resolution", self.eval_high)]
        rows = min(4, len(self.eval_high))
        figure = Figure(figsize=(2.0 * len(columns), 2.0 * rows), layout="constrained")
        FigureCanvasAgg(figure)
        for i in range(rows):
            for j, (title, images) in enumerate(columns):
                axes = figure.add_subplot(rows, len(columns), i * len(columns) + j + 1)
                axes.imshow(images[i, 0].numpy(), cmap="magma", vmin=0, vmax=1)
                axes.set_axis_off()
                if i == 0:
                    axes.set_title(title, fontsize="x-small")
        return {"superres_examples.png": figure}
