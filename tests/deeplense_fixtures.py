"""Small folders written in the real DeepLense layouts, with class-dependent images."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASS_LEVEL = {"no_sub": 0.0, "cdm": 1.0, "axion": 2.0}


def image(rng: np.random.Generator, class_name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """Random image whose mean encodes the class, so streams can be checked against the source."""
    x = rng.random(shape) + CLASS_LEVEL[class_name]
    return (x * 10).astype(np.int64) if dtype == np.int64 else x.astype(dtype)


def save_axion_pair(path: Path, img: np.ndarray, mass: float) -> None:
    """Axion file as DeepLense Models I-III ship it: a pickled object array [image, axion_mass_eV]."""
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = img, mass
    np.save(path, arr, allow_pickle=True)


def save_wrapped(path: Path, img: np.ndarray) -> None:
    """A 0-d object array wrapping the image (seen in some copies of the axion files)."""
    arr = np.empty((), dtype=object)
    arr[()] = img
    np.save(path, arr, allow_pickle=True)


def write_common_test(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 20) -> Path:
    """dataset/{train,val}/{no,sphere,vort}/<N>.npy, each (1,size,size) float64 in [0,1]-ish."""
    rng = np.random.default_rng(seed)
    folders = {"no": "no_sub", "sphere": "cdm", "vort": "axion"}
    for split, n in per_class.items():
        for folder, name in folders.items():
            d = root / "dataset" / split / folder
            d.mkdir(parents=True)
            for i in range(n):
                np.save(d / f"{i}.npy", image(rng, name, (1, size, size)))
    return root / "dataset"


def write_model(root: Path, model: str = "Model_I", n_train: int = 6, n_test: int = 2, size: int = 20,
                seed: int = 0, dtype=np.int64, wrapped_axion: int = 1) -> Path:
    """Model_X/{axion,cdm,no_sub}/<class>_sim_<i>.npy (+ Model_X_test): 2-D arrays, axion as [image, mass] pairs."""
    rng = np.random.default_rng(seed)
    for folder, n in ((model, n_train), (f"{model}_test", n_test)):
        for name in ("axion", "cdm", "no_sub"):
            d = root / folder / name
            d.mkdir(parents=True)
            for i in range(n):
                img = image(rng, name, (size, size), dtype)
                path = d / f"{name}_sim_{i}.npy"
                if name != "axion":
                    np.save(path, img)
                elif i < wrapped_axion:
                    save_wrapped(path, img)
                else:
                    save_axion_pair(path, img, float(10 ** rng.uniform(-24, -22)))
    return root


def write_model_iv(root: Path, n: int = 4, size: int = 16, seed: int = 0, hwc: bool = True) -> Path:
    """{train,val}/{no_sub,cdm,axion}/sim_<i>.npy with (size,size,3) HWC float64 (or (1,size,size))."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name in ("no_sub", "cdm", "axion"):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                np.save(d / f"sim_{i}.npy", image(rng, name, (size, size, 3) if hwc else (1, size, size)))
    return root


class _Evil:
    """Unpickling this calls os.system: the restricted unpickler must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def write_malicious_npy(path: Path, marker: Path) -> None:
    """A .npy object array whose pickle payload would run `touch marker`."""
    header = {"descr": "|O", "fortran_order": False, "shape": (2,)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        pickle.dump([_Evil(marker), 1e-23], f, protocol=3)
