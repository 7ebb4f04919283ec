"""Format versions of what dlscale writes for later reading (config.yaml, encoder.pt, manifest.json): the version
written now, and the check of a file's (how each older format is read: `dlscale.compat`)."""
from __future__ import annotations

from typing import Any

FORMAT_0_1 = 1
"""Format version of files that carry none (dlscale 0.1 / 0.2)."""
FORMAT_VERSION = 3
"""Format version written now (config.yaml, encoder.pt, manifest.json)."""


def format_version(tree: Any, what: str = "file") -> int:
    """The format version `tree` (a loaded config / payload / manifest) was written with; refuses newer ones."""
    version = tree.get("format_version", FORMAT_0_1) if isinstance(tree, dict) else FORMAT_0_1
    if not isinstance(version, int) or isinstance(version, bool) or version < FORMAT_0_1:
        raise ValueError(f"{what}: format_version={version!r}: expected an integer >= {FORMAT_0_1}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{what}: format_version={version} is newer than this dlscale reads ({FORMAT_VERSION}); "
                         "upgrade dlscale")
    return version
