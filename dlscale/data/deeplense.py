"""Readers for the real DeepLense dataset layouts (common test set, Models I-III, Model IV).

Plain arrays are read with ``allow_pickle=False``. The axion files of Models I-III are pickled object arrays
(``[image, axion_mass_eV]``, or a 0-d array wrapping the image); they go through `RestrictedUnpickler`, which admits
numpy arrays, dtypes and plain numbers only, so a crafted file cannot run code.

Nothing is allocated on a file's say-so: a .npy header's claimed size is checked against the file's size and
`MAX_IMAGE_ELEMENTS` before numpy reads it, and every array a pickle asks numpy to build is checked the same way
before it exists, so a crafted or damaged file is a `BadFileError` naming it (``--skip-bad`` lists it), never a
multi-GiB allocation that kills the pack.
"""
from __future__ import annotations

import functools
import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlscale.data.classes import ALIASES, SPLITS, canonical_class
from dlscale.data.tario import read_npy_header

LAYOUTS = ("common-test", "model", "model-iv")
_MODEL_DIR = re.compile(r"^Model_[A-Za-z0-9]+(_test)?$")
MAX_IMAGE_ELEMENTS = 2 ** 26    # elements of one source array (an 8192 x 8192 image); float64 at most 8 bytes each
PICKLE_OVERHEAD_BYTES = 1 << 20   # what an object-array file may hold beyond its arrays' bytes


class BadFileError(ValueError):
    """A source file that cannot become a sample; the message names the file and the reason."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    split: str          # "train", "val" or "test" as found on disk ("train" when the source has no split)
    class_name: str     # canonical class name


def check_array_size(shape: tuple[int, ...], dtype: np.dtype) -> None:
    """ValueError unless an array of `shape` and `dtype` fits `MAX_IMAGE_ELEMENTS` (elements and float64 bytes)."""
    count = math.prod(shape)
    if count > MAX_IMAGE_ELEMENTS or count * dtype.itemsize > 8 * MAX_IMAGE_ELEMENTS:
        raise ValueError(f"an array of shape {shape} and dtype {dtype} ({count:,} elements, {count * dtype.itemsize:,} "
                         f"bytes) is larger than an image may be ({MAX_IMAGE_ELEMENTS:,} elements)")


def _shape(value) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"array shape {value!r}: expected non-negative integers")
    return shape


class _CheckedArray(np.ndarray):
    """What pickled arrays are built as: `__new__` and `__setstate__` (the pickle's BUILD, which sets the real shape
    after `_reconstruct` made an empty array) check the size before numpy allocates it."""

    def __new__(cls, shape, dtype=float, *args, **kwargs):   # a pickle calling ndarray(shape, dtype) directly
        check_array_size(_shape(shape), np.dtype(dtype))
        return super().__new__(cls, shape, dtype, *args, **kwargs)

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError(f"array state {type(state).__name__}: expected numpy's 4/5-tuple")
        check_array_size(_shape(state[-4]), np.dtype(state[-3]))
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    if subtype is not _CheckedArray:
        raise pickle.UnpicklingError(f"_reconstruct of {subtype!r}: only numpy arrays are allowed")
    check_array_size(_shape(shape), np.dtype(dtype))
    return np.ndarray.__new__(_CheckedArray, _shape(shape), np.dtype(dtype))


def _checked_scalar(scalar, dtype, *args):
    check_array_size((1,), np.dtype(dtype))
    return scalar(dtype, *args)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for DeepLense object arrays: numpy arrays, dtypes and scalars only, each array size-checked before
    numpy allocates it (see `_CheckedArray`)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays and numbers are allowed)")
        found = super().find_class(module, name)
        if name == "scalar":
            return functools.partial(_checked_scalar, found)
        # _frombuffer only views bytes the file holds, so it stays as it is
        return {"ndarray": _CheckedArray, "_reconstruct": _reconstruct}.get(name, found)


def load_npy(path: Path) -> np.ndarray:
    """Load a .npy file; object arrays through `RestrictedUnpickler`, plain arrays never unpickled. Every size is
    checked before anything is allocated (see the module docstring)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = read_npy_header(f)
            check_array_size(header.shape, header.dtype)
            payload = size - header.offset
            if not header.dtype.hasobject:
                if header.nbytes > payload:
                    raise ValueError(f"header claims {header.nbytes:,} bytes of {header.dtype} {header.shape}, "
                                     f"the file holds {payload:,} after its header")
                f.seek(0)
                return np.load(f, allow_pickle=False)
            if payload > 8 * MAX_IMAGE_ELEMENTS + PICKLE_OVERHEAD_BYTES:
                raise ValueError(f"object array of {payload:,} bytes is larger than an image may be "
                                 f"({MAX_IMAGE_ELEMENTS:,} elements)")
            pickled = f.read()
        obj = RestrictedUnpickler(io.BytesIO(pickled)).load()
    except MemoryError:
        raise BadFileError(f"{path}: cannot read .npy (MemoryError: it asks for more memory than there is)") from None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, IndexError) as err:
        raise BadFileError(f"{path}: cannot read .npy ({type(err).__name__}: {err})") from None
    if not isinstance(obj, np.ndarray):
        raise BadFileError(f"{path}: object .npy holds a {type(obj).__name__}, expected a numpy array")
    return np.asarray(obj)


def split_image_and_mass(arr: np.ndarray, path: Path) -> tuple[np.ndarray, float | None]:
    """Return (image, axion_mass_eV or None) from a plain image array or a DeepLense object array."""
    if arr.dtype != object:
        return arr, None
    items = [arr.item()] if arr.ndim == 0 else list(arr.ravel())
    images = [x for x in items if isinstance(x, np.ndarray) and x.dtype != object and x.ndim >= 2]
    numbers = [float(x) for x in items if isinstance(x, (int, float, np.number)) or
               (isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype != object)]
    if len(images) != 1:
        raise BadFileError(f"{path}: object array holds {len(images)} images, expected exactly 1 "
                           "(DeepLense axion files are [image, axion_mass_eV])")
    return images[0], (numbers[0] if numbers else None)


def to_chw(image: np.ndarray, path: Path) -> np.ndarray:
    """Convert a 2-D, CHW or HWC (channels 1 or 3) array to float32 (C, H, W)."""
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[0] not in (1, 3) and image.shape[-1] in (1, 3):
        image = np.moveaxis(image, -1, 0)
    elif not (image.ndim == 3 and image.shape[0] in (1, 3)):
        raise BadFileError(f"{path}: image shape {image.shape}, expected (H,W), (C,H,W) or (H,W,C) with C in (1, 3)")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise BadFileError(f"{path}: dtype {image.dtype}, expected a real numeric array")
    out = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(out).all():
        raise BadFileError(f"{path}: {int((~np.isfinite(out)).sum())} NaN/Inf pixels")
    return out


def read_sample(source: SourceFile, root: Path) -> tuple[np.ndarray, dict]:
    """Read one source file: float32 (C,H,W) image and its metadata. Raises BadFileError."""
    image, mass = split_image_and_mass(load_npy(source.path), source.path)
    # relative to the packed folder; Model_X_test sits beside Model_X, so fall back to their parent
    relative = source.path.relative_to(root if source.path.is_relative_to(root) else root.parent)
    meta = {"class": source.class_name, "source_file": str(relative)}
    if mass is not None:
        meta["axion_mass"] = mass
    return to_chw(image, source.path), meta


def _class_dirs(folder: Path) -> list[tuple[Path, str]]:
    """Subfolders of `folder` as (path, canonical class); an unknown folder name is an error."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name.lower() not in ALIASES:
            raise ValueError(f"{sub}: unknown class folder {sub.name!r}; expected one of {sorted(ALIASES)}")
        out.append((sub, canonical_class(sub.name)))
    if not out:
        raise ValueError(f"{folder}: no class folders (expected e.g. no_sub/, cdm/, axion/ or no/, sphere/, vort/)")
    return out


def detect_layout(src: Path) -> str:
    """Guess the layout of a DeepLense folder from its directory names."""
    names = {p.name for p in src.iterdir() if p.is_dir()}
    if _MODEL_DIR.match(src.name) or any(_MODEL_DIR.match(n) for n in names):
        return "model"
    if names & set(SPLITS):
        split = src / sorted(names & set(SPLITS))[0]
        classes = {p.name.lower() for p in split.iterdir() if p.is_dir()}
        return "common-test" if classes & {"sphere", "vort"} else "model-iv"   # Model IV: no_sub|no, cdm, axion
    if names and all(n.lower() in ALIASES for n in names):
        return "model"
    raise ValueError(f"{src}: cannot tell the layout (expected train/ val/ folders, Model_X/ Model_X_test/ "
                     "folders or class folders); pass --layout explicitly")


def discover(src: Path, layout: str = "auto") -> tuple[str, list[SourceFile], int]:
    """List the .npy files of a DeepLense folder: (layout, files, count of ignored non-.npy files)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    if src.name == "dataset" or (src / "dataset").is_dir() and not any((src / s).is_dir() for s in SPLITS):
        src = src if src.name == "dataset" else src / "dataset"
    layout = detect_layout(src) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if layout == "model":
        if _MODEL_DIR.match(src.name) and not src.name.endswith("_test"):   # pointed at Model_X itself
            model_dirs = [src] + [p for p in [src.parent / f"{src.name}_test"] if p.is_dir()]
        else:
            model_dirs = [p for p in sorted(src.iterdir()) if p.is_dir() and _MODEL_DIR.match(p.name)]
        models = sorted({p.name.removesuffix("_test") for p in model_dirs})
        if len(models) > 1:
            raise ValueError(f"{src}: holds several models ({', '.join(models)}); pack one at a time, e.g. "
                             f"dlscale pack {src / models[0]} --out ...")
        groups = [(p, "test" if p.name.endswith("_test") else "train") for p in model_dirs] or [(src, "train")]
    else:
        groups = [(src / s, s) for s in SPLITS if (src / s).is_dir()]
        if not groups:
            raise ValueError(f"{src}: layout {layout} needs train/ (and val/) folders")
    files, ignored = [], 0
    for folder, split in groups:
        for class_dir, class_name in _class_dirs(folder):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and path.suffix == ".npy":
                    files.append(SourceFile(path, split, class_name))
                elif path.is_file():
                    ignored += 1
    if not files:
        raise ValueError(f"{src}: no .npy files found (layout {layout})")
    return layout, files, ignored
