"""Build the model of a stage from the task and stage tables, and start its encoder from an exported one.

`init_encoder` is the one way to initialise an encoder (`init_from`): an exported `encoder.pt` or a run directory
(its architecture, image shape and classes are checked against this run), or a plain state dict file (an
encoder's own, or a whole model's with `encoder.*` keys); every key and shape is checked before loading.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dlscale.data.classes import CLASSES
from dlscale.export import FORMAT, encoder_config, read_encoder_file
from dlscale.models import EncoderConfig, TaskModel, build_encoder, load_encoder_weights
from dlscale.train.stages import stage_tasks
from dlscale.train.tasks import TaskContext, task_class, task_options
from dlscale.train.weighting import build_weighting


def build_model(stage: str, encoder_cfg: EncoderConfig, image_shape: Sequence[int], n_classes: int = 3,
                n_reg_targets: int = 0, tasks: Sequence[str] | None = None, classifier_dropout: float = 0.0,
                target_names: Sequence[str] | None = None, target_stats: dict | None = None,
                options: Mapping[str, dict] | None = None, total_steps: int = 0) -> TaskModel:
    """The encoder plus the heads of the tasks `stage` trains (`tasks` chooses them for stages that let the run
    choose, e.g. multitask). `options` are the tasks' `model.task_options`; `total_steps` the run's training
    batches (schedules such as dann's ramp); the weighting is set by the caller."""
    image_shape = tuple(image_shape)
    if image_shape[0] != encoder_cfg.in_channels:
        raise ValueError(f"image_shape {image_shape} has {image_shape[0]} channels, encoder in_channels is "
                         f"{encoder_cfg.in_channels}")
    names = stage_tasks(stage, tasks, n_reg_targets)
    unknown = sorted(set(options or {}) - set(names))
    if unknown:
        raise ValueError(f"model.task_options.{unknown[0]}: this run trains tasks {list(names)}")
    encoder = build_encoder(encoder_cfg, image_shape)
    targets = tuple(target_names) if target_names is not None else tuple(f"target_{i}" for i in range(n_reg_targets))
    specs = {}
    for name in names:
        ctx = TaskContext(image_shape, encoder.out_channels, encoder.downsample, n_classes, targets, target_stats,
                          classifier_dropout, task_options(name, (options or {}).get(name)), encoder, total_steps)
        specs[name] = task_class(name)(ctx)
    return TaskModel(encoder, specs)


def init_encoder(encoder: torch.nn.Module, path: str | Path, encoder_cfg: EncoderConfig,
                 image_shape: Sequence[int], classes: Sequence[str]) -> None:
    """Load `init_from` into `encoder` after every check (architecture and data of an exported encoder; keys and
    shapes of every state dict). The file is read once."""
    path = Path(path)
    if path.is_dir():
        payload = read_encoder_file(path)
    elif path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"init_from {path}: no such encoder.pt, run directory or state dict file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        check_init(path, payload, encoder_cfg, image_shape, classes)
        payload = payload["state_dict"]
    load_encoder_weights(encoder, payload, str(path))


def check_init(path: str | Path, payload: dict, encoder_cfg: EncoderConfig, image_shape: Sequence[int],
               classes: Sequence[str]) -> None:
    """An exported encoder must have this run's architecture, image shape and classes; raise naming the key."""
    theirs, ours = dataclasses.asdict(encoder_config(payload)), dataclasses.asdict(encoder_cfg)
    for key in dict.fromkeys([*theirs, *ours]):     # the name first: other backbones have other options
        if theirs.get(key) != ours.get(key):
            raise ValueError(f"init_from {path}: encoder {key}={theirs.get(key)!r}, this run has {ours.get(key)!r}; "
                             f"set --model.encoder.{key}={theirs.get(key)!r}")
    shape = tuple(payload.get("image_shape", image_shape))
    if shape != tuple(image_shape) or tuple(payload.get("classes", classes)) != tuple(classes):
        hint = f"; set --data.resize={shape[1]} to bring the images to its size" \
            if shape[0] == image_shape[0] and shape[1] == shape[2] and shape != tuple(image_shape) else ""
        raise ValueError(f"init_from {path}: trained on images {payload.get('image_shape')} / classes "
                         f"{payload.get('classes')}, this data has {list(image_shape)} / {list(classes)}{hint}")


def build_run_model(cfg, image_shape: tuple[int, ...], stats: dict | None, total_steps: int = 0) -> torch.nn.Module:
    """The model (encoder, heads, loss weighting) a run of `cfg` trains: the one function training and
    `dlscale eval` both build it with (`total_steps`: the run's training batches, known to training only)."""
    model = build_model(cfg.stage, cfg.model.encoder, image_shape, len(CLASSES), len(cfg.data.targets),
                        cfg.model.tasks, cfg.model.classifier_dropout, cfg.data.targets, stats,
                        cfg.model.task_options, total_steps)
    model.weighting = build_weighting(cfg.loss.method, model.tasks, cfg.loss.method_options())
    model.separate_domains = cfg.model.domain_batchnorm == "separate"
    return model
