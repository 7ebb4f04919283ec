"""What needs the data or the machine, checked before the run directory exists, so a refused run leaves nothing
behind: the datasets (classes, splits, channels, the target domain's fit, the linear probe's share of every class),
the DeepSpeed-side settings and the optimizer's numbers. What the config alone decides is `Config.validate`'s."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.train.deepspeed_setup import make_optimizer, resolve_engine_settings
from dlscale.train.probe_set import check_probe_set
from dlscale.train.sources import TwoStreamSource, training_source
from dlscale.train.sources.two_stream import describe_data, target_config


def check_manifest(where: str, manifest: dict, splits: Sequence[str] = ()) -> None:
    """A dataset's canonical classes and the `splits` a step needs, or an error naming `where` and what it has."""
    if tuple(manifest["classes"]) != CLASSES:
        raise ValueError(f"{where}: classes {manifest['classes']}, the models use {list(CLASSES)}")
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:
        raise ValueError(f"{where}: needs the split(s) {', '.join(map(repr, splits))}; has "
                         f"{', '.join(manifest['splits'])} (no {', '.join(map(repr, missing))})")


def check_dataset(cfg, manifest: dict) -> tuple[int, ...]:
    """The manifest must match the model: canonical classes, the splits the run reads and the encoder's input
    channels. Returns the image shape the model sees (after `data.resize`)."""
    shape = tuple(manifest["image_shape"])
    needs_train = training_source(cfg).reads_train_split or cfg.eval.probe_samples > 0   # training, or the probe
    check_manifest(cfg.data_dir, manifest, (("train",) if needs_train else ()) + (cfg.eval.split,))
    check_probe_data(cfg, manifest, cfg.data_dir)
    if shape[0] != cfg.model.encoder.in_channels:
        raise ValueError(f"{cfg.data_dir}: images have {shape[0]} channel(s) {shape}; set "
                         f"--model.encoder.in_channels={shape[0]}")
    calibration = cfg.eval.calibration_split
    if calibration is not None and calibration not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: eval.calibration_split={calibration!r} is not a split of the dataset "
                         f"(has {', '.join(manifest['splits'])})")
    return cfg.data.output_shape(shape)   # the model's input: the stored images after data.resize


def check_target(cfg, image_shape: tuple[int, ...]) -> None:
    """The target domain's dataset must fit the run: the same classes, the same image shape after `data.resize` as
    the labelled data's `image_shape`, a train split when the run adapts to it, the eval split when it is scored on
    it. Raises naming both datasets and what differs."""
    target, tcfg = cfg.data.target, target_config(cfg)
    if not target.source or (target.source == "simulate" and not Path(tcfg.data_dir).is_dir()):
        return   # no target, or a simulated one whose evaluation set is still to make (checked once it exists)
    manifest = load_manifest(tcfg.data_dir)
    where = describe_data(cfg)
    if tuple(manifest["classes"]) != CLASSES:
        raise ValueError(f"the target domain's classes {manifest['classes']} differ from the labelled data's "
                         f"{list(CLASSES)} ({where})")
    shape = tuple(manifest["image_shape"])
    if shape[0] != image_shape[0] or cfg.data.output_shape(shape) != tuple(image_shape):
        raise ValueError(f"the target domain's images are {list(shape)}, the labelled data's become "
                         f"{list(image_shape)} ({where}): set data.resize to bring both to one side")
    if isinstance(training_source(cfg), TwoStreamSource) and target.source == "shards":
        check_manifest(f"{tcfg.data_dir} (the target domain to adapt to)", manifest, ("train",))
    if target.evaluate and cfg.eval.split not in manifest["splits"]:
        raise ValueError(f"{tcfg.data_dir}: the target domain has no {cfg.eval.split!r} split to be scored on (has "
                         f"{', '.join(manifest['splits'])}); add one or set --data.target.evaluate=false")
    if target.evaluate:
        check_probe_data(cfg, manifest, f"{tcfg.data_dir} (the target domain)")


def check_probe_data(cfg, manifest: dict, where: str) -> None:
    """The train split of a dataset the linear probe reads (if it has one) holds every class's share of
    `eval.probe_samples` (`probe_set.check_probe_set`)."""
    if "train" in manifest["splits"]:
        counts = manifest["splits"]["train"]["class_counts"]
        check_probe_set(cfg.eval.probe_samples, {c: counts.get(c, 0) for c in manifest["classes"]}, where)


def check_engine_settings(cfg, model: torch.nn.Module, world: int, device: torch.device) -> None:
    """Precision on this device, the ds_config (a given `deepspeed.config_file` must exist and agree with `data.*`;
    its precision, ZeRO stage and accumulation become `cfg.deepspeed`'s) and the optimizer's numbers, as the engine
    will use them; raises naming the key."""
    resolve_engine_settings(cfg, world, device)
    try:
        make_optimizer(model, cfg)
    except (ValueError, TypeError) as err:
        raise ValueError(f"optim: {err} (optim.lr={cfg.optim.lr}, optim.betas={cfg.optim.betas}, "
                         f"optim.weight_decay={cfg.optim.weight_decay}, "
                         f"optim.encoder_lr_scale={cfg.optim.encoder_lr_scale})") from None
