"""The exported encoder: `encoder.pt` holds weights + architecture + classes + normalisation, and
`load_encoder(path)` returns a ready `nn.Module` in one call for downstream tasks.

    >>> encoder = dlscale.load_encoder("runs/multitask/encoder.pt")
    >>> features = dlscale.models.global_pool(encoder(images))   # images normalised as encoder.dlscale["normalize"]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dlscale import io
from dlscale.models import EncoderConfig, build_encoder

FORMAT = "dlscale-encoder/1"


def save_encoder(path: Path, encoder: nn.Module, encoder_cfg: EncoderConfig, info: dict) -> None:
    """Write encoder.pt atomically (a crash never leaves a half-written file)."""
    payload = {"format": FORMAT, "encoder_config": dataclasses.asdict(encoder_cfg),
               "state_dict": cpu_state_dict(encoder), **info}
    io.save_torch(path, payload)


def cpu_state_dict(module: nn.Module) -> dict:
    """State dict on CPU with floating tensors in fp32 (bf16 training still exports fp32 weights)."""
    return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()) if torch.is_tensor(v) else v
            for k, v in module.state_dict().items()}


def read_encoder_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported encoder (runs write encoder.pt when they finish)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a dlscale encoder file (expected format {FORMAT!r})")
    return payload


def encoder_config(payload: dict) -> EncoderConfig:
    """The architecture of an exported encoder (fields of older dlscale versions that no longer exist dropped)."""
    known = {f.name for f in dataclasses.fields(EncoderConfig)}
    return EncoderConfig(**{k: v for k, v in payload["encoder_config"].items() if k in known})


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the exported encoder, load its weights, put it in eval mode; its metadata is in `.dlscale`
    (classes, image_shape, normalize, stage). Accepts the file or the run directory that holds it."""
    payload = read_encoder_file(path)
    shape = payload.get("image_shape")
    encoder = build_encoder(encoder_config(payload), tuple(shape) if shape else None)
    encoder.load_state_dict(payload["state_dict"])
    encoder.dlscale = {k: v for k, v in payload.items() if k not in ("state_dict",)}
    return encoder.to(device).eval()
