"""Reading what earlier dlscale versions wrote, in one place, keyed by the format version.

Every file dlscale writes for later reading carries `format_version` (config.yaml at the top level, encoder.pt and
manifest.json beside their `format` string; model.pt, a plain state dict, has its run's config.yaml's). Files without it were written before versions were recorded
(dlscale 0.1 and 0.2: `FORMAT_0_1`); their translation is detected from the keys present, as before, and is a
no-op on trees that have none of 0.1's keys. A file of a newer version than this code reads is refused.

Shims (format 1 -> 2):
- config.yaml: `loss.weights` -> `loss.fixed.weights`, `loss.temperature` -> `loss.dwa.temperature`,
  `model.encoder.weights_path` -> `init_from`, and a resolved 0.1 config.yaml (all three present) selects 0.1's
  heads (`model.task_options.classification.standardize=false`, `model.task_options.recon.decoder=wide`) so its
  model.pt loads (`upgrade_config`);
- model.pt of 0.1 (attributes decoder/classifier/regressor, not heads.<task>): its keys are renamed when it is
  loaded (`upgrade_model_state`). model.pt stays a plain state dict; its version is its run's config.yaml's.

Shims (format 2 -> 3): `model.encoder` (config.yaml) and `encoder_config` (encoder.pt, encoder.json) held every
backbone's options (`FLAT_ENCODER_FIELDS`); each backbone now takes its own only. A field the named backbone does
not take is dropped where it holds the value format 2 wrote by default (the backbone never read it); set to another
value it stays, and the backbone refuses it naming the key (`upgrade_config`, `upgrade_encoder_config`).
"""
from __future__ import annotations

import dataclasses

from dlscale.formats import FORMAT_0_1, FORMAT_VERSION, format_version
from dlscale.models.backbone import BACKBONES, EncoderConfig

__all__ = ["FORMAT_0_1", "FORMAT_VERSION", "format_version", "upgrade_config", "upgrade_encoder_config",
           "upgrade_model_state"]
FLAT_ENCODER_FIELDS = {"small_input_stem": False, "width": 32, "patch_size": None}
"""The backbone options format 2 wrote into every encoder config, whatever the backbone, with their defaults."""


def upgrade_config(tree: dict, version: int | None = None, overrides: bool = False) -> dict:
    """A training config tree (config.yaml, a YAML file or dotted overrides) in today's form. `version`: the
    tree's format version (None: read from the tree, absent = 0.1). Only keys present are moved. `overrides`:
    command-line settings, where only 0.1's renamed keys are translated (a flat backbone option there is the
    user's own setting, not a value format 2 wrote by default)."""
    version = format_version(tree, "config") if version is None else version
    if version < 2:
        _config_0_1(tree)
    model = tree.get("model")
    if version < 3 and not overrides and isinstance(model, dict) and isinstance(model.get("encoder"), dict):
        _flat_encoder(model["encoder"])
    tree.pop("format_version", None)
    return tree


def upgrade_encoder_config(encoder: dict, version: int) -> dict:
    """The `encoder_config` of an exported encoder (encoder.pt, encoder.json) of format `version` in today's form:
    0.1's `weights_path` (how the run started, not the architecture) dropped, format 2's flat options translated."""
    encoder = dict(encoder)
    if version < 2:
        encoder.pop("weights_path", None)
    if version < 3:
        _flat_encoder(encoder)
    return encoder


def _flat_encoder(encoder: dict) -> None:
    backbone = BACKBONES.get(encoder.get("name", EncoderConfig.name))
    if backbone is None:
        return                              # an unknown name: the config is refused naming it
    takes = {f.name for f in dataclasses.fields(backbone.Config)}
    for key, default in FLAT_ENCODER_FIELDS.items():
        if key in encoder and key not in takes and type(encoder[key]) is type(default) and encoder[key] == default:
            del encoder[key]


def _config_0_1(tree: dict) -> None:
    loss, model = tree.get("loss"), tree.get("model") or {}
    encoder = model.get("encoder")
    if (isinstance(loss, dict) and {"weights", "temperature"} <= set(loss) and isinstance(encoder, dict)
            and "weights_path" in encoder and "task_options" not in model):
        model["task_options"] = {task: options for task, options in (("classification", {"standardize": False}),
                                                                     ("recon", {"decoder": "wide"}))
                                 if _trained_in_01(tree, task)}
    if isinstance(loss, dict):
        if "weights" in loss:
            loss.setdefault("fixed", {})["weights"] = loss.pop("weights")
        if "temperature" in loss:
            loss.setdefault("dwa", {})["temperature"] = loss.pop("temperature")
    if isinstance(encoder, dict) and "weights_path" in encoder:   # 0.1's second way to start an encoder
        path = encoder.pop("weights_path")
        if path and not tree.get("init_from"):
            tree["init_from"] = path


def _trained_in_01(tree: dict, task: str) -> bool:
    """Whether a dlscale 0.1 config trains `task` (0.1's stages: autoencoder, supervised, multitask)."""
    stage, tasks = tree.get("stage"), (tree.get("model") or {}).get("tasks")
    return stage == {"recon": "autoencoder", "classification": "supervised"}[task] or (
        stage == "multitask" and (tasks is None or task in tasks))


LEGACY_HEADS = {"decoder.": "heads.recon.", "classifier.": "heads.classification.", "regressor.": "heads.regression."}
"""model.pt key prefixes of dlscale 0.1 -> today's."""


def upgrade_model_state(state: dict, version: int) -> dict:
    """A model.pt state dict in today's form. model.pt is a plain state dict (so any PyTorch code loads it); its
    format is that of the run's config.yaml, written with it: `version`. Before format 2 (dlscale 0.1 / 0.2) the
    heads of 0.1 (attributes decoder/classifier/regressor) are renamed to heads.<task>."""
    if version >= 2:
        return state
    out = {}
    for key, value in state.items():
        old = next((prefix for prefix in LEGACY_HEADS if key.startswith(prefix)), None)
        out[LEGACY_HEADS[old] + key[len(old):] if old else key] = value
    return out
