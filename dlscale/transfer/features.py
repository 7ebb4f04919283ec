"""The encoders under test and their frozen features.

An encoder is an exported `encoder.pt` or a run directory holding one. Its metadata says what it was trained on
(image shape, normalisation, stage, dataset); the transfer data must reach its input size, through `data.resize`
when the stored images have another size, or the command stops naming the option to set. Features are the pooled
feature map (what `TaskModel.features` and the run's own probe use), computed by `dlscale.collect.collect` over a
whole split in sample-id order.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlscale.collect import collect, gather
from dlscale.data.stream import eval_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import finish_batch
from dlscale.export import encoder_config, load_encoder, read_encoder_file
from dlscale.models import EncoderConfig, backbone_class, build_encoder, global_pool, layer_groups

log = logging.getLogger(__name__)


@dataclass
class EncoderSource:
    """One encoder under test: where it is, its architecture and what its metadata says about its training."""
    label: str
    path: Path
    architecture: EncoderConfig
    image_shape: tuple[int, ...]
    normalize: str
    stage: str
    trained_on: dict = field(default_factory=dict)

    @property
    def arch_label(self) -> str:
        """A short name of the architecture at its input size: scratch and random-init rows are keyed by it."""
        side = "x".join(map(str, self.image_shape[1:]))
        return f"{backbone_class(self.architecture.name).arch_label(self.architecture)}-{side}-{self.normalize}"


def load_sources(paths: list[str]) -> list[EncoderSource]:
    """Read every encoder's metadata (not its weights); labels are unique names taken from the paths."""
    sources, used = [], set()
    for text in paths:
        path = Path(text)
        payload = read_encoder_file(path)
        file = path / "encoder.pt" if path.is_dir() else path
        base = file.parent.name if file.name == "encoder.pt" else file.stem
        label, k = base, 2
        while label in used:
            label, k = f"{base}-{k}", k + 1
        used.add(label)
        shape = tuple(payload.get("image_shape") or ())
        if len(shape) != 3:
            raise ValueError(f"{file}: metadata has no image_shape (C, H, W); re-export it with this dlscale")
        sources.append(EncoderSource(label, file, encoder_config(payload), shape, payload.get("normalize", "minmax"),
                                     payload.get("stage", "?"), trained_on(file, payload)))
    return sources


def trained_on(file: Path, payload: dict) -> dict:
    """What the encoder was trained on: its metadata's `data` record, else its run directory's config.yaml."""
    if isinstance(payload.get("data"), dict):
        return dict(payload["data"])
    config = file.parent / "config.yaml"
    if config.is_file():
        import yaml
        tree = yaml.safe_load(config.read_text()) or {}
        data = tree.get("data") or {}
        return {"dir": tree.get("data_dir"), "resize": data.get("resize"), "from": "config.yaml"}
    return {}


def check_input(source: EncoderSource, data_shape, stream: StreamConfig, data_dir) -> None:
    """The batches of `data_dir` must have the encoder's input shape; say which option fixes it if not."""
    data_shape = tuple(int(s) for s in data_shape)
    seen = stream.output_shape(data_shape)
    if seen == tuple(source.image_shape):
        return
    if data_shape[0] != source.image_shape[0]:
        raise ValueError(f"encoder {source.path} takes {source.image_shape[0]}-channel images "
                         f"{list(source.image_shape)}, {data_dir} holds {list(data_shape)}: channels are not converted")
    side = source.image_shape[1]
    now = f" (data.resize={stream.resize} gives {list(seen)})" if stream.resize is not None else ""
    raise ValueError(f"encoder {source.path} was trained on images {list(source.image_shape)}, {data_dir} holds "
                     f"{list(data_shape)}{now}: set --data.resize={side} (--data.resize_mode=crop to centre-crop "
                     "instead of interpolating)")


def stage_modules(encoder: nn.Module) -> list[str]:
    """Names of the submodules whose outputs are the encoder's stages before its last (each layer group that is
    one module: a CNN stage, a ViT block); the stem, whose group spans several modules, is left out."""
    roots = [os.path.commonprefix([n.split(".")[:-1] for n in group]) for group in layer_groups(encoder)[:-1]]
    return [".".join(root) for root in roots if root]


def pool_any(output: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps and (B, N, D) token sequences to (B, C) / (B, D) means."""
    return global_pool(output) if output.dim() == 4 else output.mean(1)


class FeatureModel(nn.Module):
    """An encoder as `collect` sees a model: pooled features, and the batch's regression targets collected. With
    `stages` (submodule names), the features are every stage's pooled output and then the encoder's, concatenated."""

    def __init__(self, encoder: nn.Module, with_targets: bool, stages: list[str] | None = None) -> None:
        super().__init__()
        self.encoder, self.with_targets, self.stages = encoder, with_targets, list(stages or [])
        self.outputs: dict[str, torch.Tensor] = {}
        self.widths: list[int] = []
        self.hooks = [encoder.get_submodule(s).register_forward_hook(
            lambda module, args, output, s=s: self.outputs.__setitem__(s, output)) for s in self.stages]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        final = global_pool(self.encoder(images))
        parts = [pool_any(self.outputs.pop(s)) for s in self.stages] + [final]
        self.widths = [p.shape[1] for p in parts]
        return {"features": torch.cat(parts, 1)}

    def collect(self, out, images, batch) -> dict[str, torch.Tensor]:
        return {"target": batch["target"]} if self.with_targets else {}

    def examples(self, out, images) -> dict[str, torch.Tensor]:
        return {}


def load_weights(source: EncoderSource) -> nn.Module:
    """The trained encoder (fp32, eval mode)."""
    return load_encoder(source.path)


def random_encoder(source: EncoderSource, seed: int) -> nn.Module:
    """The same architecture at its random initialisation (the control of every probe)."""
    torch.manual_seed(seed)
    return build_encoder(source.architecture, source.image_shape).eval()


def features(encoder: nn.Module, data_dir, stream: StreamConfig, split: str, what: str,
             device: torch.device = torch.device("cpu"), stages: list[str] | None = None) -> dict[str, np.ndarray]:
    """ids, labels, features (and target with `stream.targets`) of every sample of `split`, in id order. With
    `stages` (`stage_modules`): every stage's pooled output and the encoder's, concatenated; `widths` says where
    each ends."""
    loader = eval_loader(data_dir, stream, 0, 1, split)
    bar = tqdm(loader, desc=f"features {what} [{split}]", unit="batch", leave=False)
    model = FeatureModel(encoder, bool(stream.targets), stages).to(device)
    try:
        out = gather(collect(model, bar, device, torch.float32, n_examples=0,
                             finish=lambda batch: finish_batch(batch, stream, device)))
    finally:
        for hook in model.hooks:
            hook.remove()
    if stages:
        out["widths"] = np.array(model.widths)
    log.info("features of %s: %d %s samples x %d", what, len(out["labels"]), split, out["features"].shape[1])
    return out
