"""The exported encoder: `encoder.pt` holds weights + architecture + classes + normalisation, and
`load_encoder(path)` returns a ready `nn.Module` in one call for downstream tasks. Beside it, the portable pair
`encoder.safetensors` (weights) + `encoder.json` (the same metadata, readable by anything) loads without pickle.

    >>> encoder = dlscale.load_encoder("runs/multitask/encoder.pt")
    >>> features = dlscale.models.global_pool(encoder(images))   # images normalised as encoder.dlscale["normalize"]
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from torch import nn

from dlscale import io
from dlscale.compat import FORMAT_VERSION, format_version, upgrade_encoder_config
from dlscale.configtree import from_dict
from dlscale.models import EncoderConfig, backbone_class, build_encoder
from dlscale.version import __version__

FORMAT = "dlscale-encoder/1"


def save_encoder(path: Path, encoder: nn.Module, encoder_cfg: EncoderConfig, info: dict) -> None:
    """Write encoder.pt atomically (a crash never leaves a half-written file)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "encoder_config": dataclasses.asdict(encoder_cfg), "state_dict": cpu_state_dict(encoder), **info}
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
    format_version(payload, str(path))    # absent: written before versions were recorded (still loads)
    return payload


def encoder_config(payload: dict) -> EncoderConfig:
    """The architecture of an exported encoder (encoder.pt's or encoder.json's; older formats translated)."""
    return from_dict(EncoderConfig, upgrade_encoder_config(payload["encoder_config"], format_version(payload)),
                     "encoder_config.")


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the exported encoder, load its weights, put it in eval mode; its metadata is in `.dlscale`
    (classes, image_shape, normalize, stage). Accepts encoder.pt, encoder.safetensors / encoder.json or the run
    directory that holds them (the portable pair first: loading it runs no pickle at all)."""
    path = Path(path)
    portable = path.suffix in (".safetensors", ".json") or path.is_dir() and (path / METADATA).is_file()
    if portable:
        meta, state = read_portable(path)
        meta_path = metadata_path(path)
        where = f"the architecture in {meta_path} does not fit the weights in {weights_path(meta_path, meta)}"
    else:
        payload = read_encoder_file(path)
        state, meta = payload["state_dict"], {k: v for k, v in payload.items() if k != "state_dict"}
        where = f"the architecture in {path / 'encoder.pt' if path.is_dir() else path} does not fit its weights"
    shape = meta.get("image_shape")
    encoder = build_encoder(encoder_config(meta), tuple(shape) if shape else None)
    check_weights_fit(encoder, state, where)
    encoder.load_state_dict(state)
    encoder.dlscale = meta
    return encoder.to(device).eval()


def check_weights_fit(model: nn.Module, state: dict, where: str) -> None:
    """Refuse weights that `model` (built from the metadata stored beside them) cannot load, naming the first tensor
    that differs (`where` names the files), instead of PyTorch's size-mismatch traceback. Entries that are not
    tensors (a module's extra state) are its own to read."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        found = state.get(name)
        if found is None:
            problem = f"tensor {name!r} of shape {tuple(tensor.shape)} is missing from the weights"
        elif torch.is_tensor(tensor) and tuple(getattr(found, "shape", ())) != tuple(tensor.shape):
            problem = f"tensor {name!r}: shape {tuple(tensor.shape)} expected, {tuple(found.shape)} found"
        else:
            continue
        break
    else:
        extra = next((name for name in state if name not in expected), None)
        if extra is None:
            return
        problem = f"the weights hold tensor {extra!r}, which the architecture has no place for"
    raise ValueError(f"{where}: {problem} (an architecture edited after export, or files of two exports?)")


# ---- Portable encoders: encoder.safetensors + encoder.json, read without any pickle --------------------------------

WEIGHTS = "encoder.safetensors"
METADATA = "encoder.json"


def save_portable_encoder(run_dir: Path, encoder: nn.Module, encoder_cfg: EncoderConfig, info: dict) -> Path:
    """encoder.safetensors (the weights) and encoder.json (everything encoder.pt holds besides them, plus the dlscale
    version, the weights' sha256 and how a timm backbone loads into `timm.create_model`). The weights are written
    first: a crash between the two leaves a json whose sha256 does not match, which `load_encoder` refuses."""
    from safetensors.torch import save
    state = {k: v.contiguous() for k, v in cpu_state_dict(encoder).items()}
    blob = save(state, metadata={"format": FORMAT})
    io.write_bytes(run_dir / WEIGHTS, blob)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dlscale_version": __version__,
            "encoder_config": dataclasses.asdict(encoder_cfg),
            **info, "weights": WEIGHTS, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    timm = backbone_class(encoder_cfg.name).timm_recipe(encoder_cfg, info.get("image_shape"))
    if timm is not None:
        meta["timm"] = timm
    io.write_json(run_dir / METADATA, meta)
    return run_dir / METADATA


def read_portable(path: str | Path) -> tuple[dict, dict]:
    """(metadata, state dict) of encoder.json + encoder.safetensors (`path`: either file or their directory).
    safetensors holds raw tensors only, so nothing in the files can run code."""
    from safetensors.torch import load
    meta_path = metadata_path(path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no encoder.json (runs of dlscale >= 0.1 write it beside encoder.pt)")
    meta = io.read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    format_version(meta, str(meta_path))
    weights = weights_path(meta_path, meta)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the weights {meta_path} names are missing")
    blob = weights.read_bytes()
    if "weights_sha256" in meta and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights}: sha256 differs from the one in {meta_path} (files of two different exports?)")
    return meta, load(blob)


def metadata_path(path: str | Path) -> Path:
    """encoder.json of a portable encoder given as either file or their directory."""
    path = Path(path)
    return path / METADATA if path.is_dir() else path.with_name(METADATA) if path.suffix == ".safetensors" else path


def weights_path(meta_path: Path, meta: dict) -> Path:
    """The weights file that encoder.json names, beside it."""
    return meta_path.with_name(meta.get("weights", WEIGHTS))


def rename_for_timm(state: dict, rename: list) -> dict:
    """Our encoder's state dict with timm's key names: each key starting with a `rename` prefix gets timm's."""
    def new_key(key: str) -> str:
        for old, new in rename:
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return {new_key(k): v for k, v in state.items()}
