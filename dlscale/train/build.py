"""Typed training configs for library callers (the quickstart, a transfer study's runs): no argv in between.

`settings` are dotted keys with Python values, e.g. {"schedule.epochs": 6, "data.targets": ["theta_E"]}: what a
`--schedule.epochs=6` command-line override says, without the string. Each is set into the config tree the way an
override is (sections merge), so a config built here equals `load_config(base, [the same overrides], **top)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dlscale.compat import upgrade_config
from dlscale.configtree import merge, read_yaml, set_dotted


def settings_tree(settings: dict[str, Any] | None) -> dict:
    """Dotted settings as one nested dict (sections as nested mappings)."""
    tree: dict = {}
    for key, value in (settings or {}).items():
        set_dotted(tree, key, value)
    return tree


def build_config(base: str | Path | None = None, settings: dict[str, Any] | None = None, **top: Any):
    """The training config: defaults < the stage's defaults < the YAML file `base` < `settings` < keyword fields
    (None: not given); unknown keys and wrong types raise naming the dotted key (all through `load_config`)."""
    from dlscale.train.config import Config, load_config
    if not settings:
        return load_config(base, None, **top)
    given = upgrade_config(read_yaml(base)) if base else {}      # as load_config reads its YAML file
    given = merge(given, settings_tree(settings), Config)
    given.update({k: v for k, v in top.items() if v is not None})
    return load_config(None, None, **given)
