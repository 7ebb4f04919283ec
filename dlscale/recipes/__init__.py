"""Recipes that ship inside the package (YAML): training configs under `train/` (`full`: the GPU settings,
`dlscale train --config full`) and the quickstart's scales (`quickstart.yaml`). A training `--config` argument
names a file, or a packaged training recipe by its name."""
from __future__ import annotations

from pathlib import Path

RECIPES = Path(__file__).resolve().parent
TRAIN = RECIPES / "train"
QUICKSTART = RECIPES / "quickstart.yaml"


def train_recipes() -> list[str]:
    return sorted(p.stem for p in TRAIN.glob("*.yaml"))


def config_path(text: str | Path) -> Path:
    """A training `--config` argument: an existing file, else the packaged training recipe of that name; anything
    else is refused naming both readings."""
    path = Path(text)
    if path.is_file():
        return path
    if str(text) in train_recipes():
        return TRAIN / f"{text}.yaml"
    raise FileNotFoundError(f"config {text}: no such file, and no packaged training recipe of that name (recipes: "
                            f"{', '.join(train_recipes())})")
