"""Canonical substructure classes (and the folder names every known DeepLense layout uses for them) and split
names.

Class indices are explicit and never inferred from folder sort order: public repositories disagree on them.
"""

CLASSES: tuple[str, ...] = ("no_sub", "cdm", "axion")

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Dataset splits, in the order they are written and listed (also the split folders of the DeepLense layouts)."""

ALIASES: dict[str, str] = {
    "no": "no_sub", "no_sub": "no_sub", "nosub": "no_sub",
    "sphere": "cdm", "cdm": "cdm", "subhalo": "cdm",
    "vort": "axion", "vortex": "axion", "axion": "axion",
}


def canonical_class(name: str) -> str:
    """Map a folder or class name (any known alias, any case) to its canonical name."""
    key = name.strip().lower()
    if key not in ALIASES:
        known = ", ".join(sorted(ALIASES))
        raise ValueError(f"unknown class {name!r}: expected one of {known}")
    return ALIASES[key]


def class_index(name: str) -> int:
    """Canonical index (0 no_sub, 1 cdm, 2 axion) of a class name or alias."""
    return CLASSES.index(canonical_class(name))
