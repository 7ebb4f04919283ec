"""DeepLense layouts: detection, reading, canonical class indices, and safe .npy loading."""
import json
from collections import Counter

import numpy as np
import pytest

from deeplense_fixtures import write_common_test, write_malicious_npy, write_model, write_model_iv
from dlscale.data.classes import ALIASES, CLASSES, canonical_class, class_index
from dlscale.data.deeplense import BadFileError, discover, load_npy, read_sample


def read_all(src, layout="auto"):
    """{path relative to the layout root: (image, meta, split)} for every file `discover` finds."""
    layout, files, _ = discover(src, layout)
    root = files[0].path.parents[2]   # <root>/<split or Model_X>/<class>/<file>.npy
    return layout, {str(f.path.relative_to(root)): (*read_sample(f, root), f.split) for f in files}


def test_common_test_layout_is_detected_and_read_as_float32_chw(tmp_path):
    write_common_test(tmp_path, {"train": 3, "val": 2})
    layout, samples = read_all(tmp_path)   # the folder above dataset/, as the zip unpacks
    assert layout == "common-test"
    assert len(samples) == 3 * (3 + 2)
    for rel, (image, meta, split) in samples.items():
        src = np.load(tmp_path / "dataset" / rel, allow_pickle=False)
        assert src.shape == (1, 20, 20) and src.dtype == np.float64
        assert image.dtype == np.float32 and image.shape == (1, 20, 20)
        np.testing.assert_array_equal(image, src.astype(np.float32))
        assert split == rel.split("/")[0]
        assert meta["class"] == canonical_class(rel.split("/")[1])


def test_common_test_dataset_folder_can_be_passed_directly(tmp_path):
    dataset = write_common_test(tmp_path, {"train": 1, "val": 1})
    layout, files, _ = discover(dataset)
    assert layout == "common-test" and len(files) == 6


def test_model_layout_is_detected_with_train_and_test_splits(tmp_path):
    write_model(tmp_path, "Model_II", n_train=3, n_test=2)
    layout, samples = read_all(tmp_path)
    assert layout == "model"
    splits = {rel: split for rel, (_, _, split) in samples.items()}
    assert Counter(splits.values()) == {"train": 9, "test": 6}
    assert all(split == ("test" if rel.startswith("Model_II_test/") else "train") for rel, split in splits.items())


def test_model_folder_itself_is_read_with_its_test_folder_beside_it(tmp_path):
    write_model(tmp_path, "Model_II", n_train=3, n_test=2, size=8)
    layout, files, _ = discover(tmp_path / "Model_II")
    assert layout == "model"
    assert Counter(f.split for f in files) == {"train": 9, "test": 6}
    test_file = next(f for f in files if f.split == "test")
    _, meta = read_sample(test_file, tmp_path / "Model_II")
    assert meta["source_file"].startswith("Model_II_test/")


def test_folder_with_several_models_asks_for_one(tmp_path):
    write_model(tmp_path, "Model_I", n_train=2, n_test=1, size=8)
    write_model(tmp_path, "Model_II", n_train=2, n_test=1, size=8)
    with pytest.raises(ValueError, match="several models.*Model_I, Model_II"):
        discover(tmp_path)


def test_model_int64_counts_are_read_exactly_as_1hw_float32(tmp_path):
    write_model(tmp_path, n_train=2, n_test=1, dtype=np.int64)
    _, samples = read_all(tmp_path)
    for rel in ("Model_I/cdm/cdm_sim_0.npy", "Model_I_test/no_sub/no_sub_sim_0.npy"):
        src = np.load(tmp_path / rel, allow_pickle=False)
        assert src.dtype == np.int64 and src.ndim == 2
        image, meta, _ = samples[rel]
        assert image.shape == (1, *src.shape) and image.dtype == np.float32
        np.testing.assert_array_equal(image[0], src.astype(np.float32))
        assert "axion_mass" not in meta


def test_axion_pair_image_is_read_and_mass_lands_in_metadata(tmp_path):
    write_model(tmp_path, n_train=3, n_test=1, wrapped_axion=1)
    _, samples = read_all(tmp_path)
    rel = "Model_I/axion/axion_sim_2.npy"
    pair = np.load(tmp_path / rel, allow_pickle=True)   # our own fixture file
    image, meta, _ = samples[rel]
    np.testing.assert_array_equal(image[0], pair[0].astype(np.float32))
    assert meta["axion_mass"] == pair[1]
    assert 1e-24 <= meta["axion_mass"] <= 1e-22


def test_zero_d_wrapped_axion_array_is_read_without_mass(tmp_path):
    write_model(tmp_path, n_train=2, n_test=1, wrapped_axion=1)
    _, samples = read_all(tmp_path)
    rel = "Model_I/axion/axion_sim_0.npy"
    wrapped = np.load(tmp_path / rel, allow_pickle=True)
    assert wrapped.shape == () and wrapped.dtype == object
    image, meta, _ = samples[rel]
    np.testing.assert_array_equal(image[0], wrapped.item().astype(np.float32))
    assert "axion_mass" not in meta


def test_model_iv_hwc_is_detected_and_read_as_chw(tmp_path):
    write_model_iv(tmp_path, n=2, size=16, hwc=True)
    layout, samples = read_all(tmp_path)
    assert layout == "model-iv" and len(samples) == 2 * 3 * 2
    src = np.load(tmp_path / "val/cdm/sim_1.npy", allow_pickle=False)
    assert src.shape == (16, 16, 3)
    image, meta, split = samples["val/cdm/sim_1.npy"]
    assert image.shape == (3, 16, 16) and split == "val" and meta["class"] == "cdm"
    np.testing.assert_array_equal(image, np.moveaxis(src, -1, 0).astype(np.float32))


def test_model_iv_1hw_is_read_unchanged(tmp_path):
    write_model_iv(tmp_path, n=2, size=16, hwc=False)
    _, samples = read_all(tmp_path)
    src = np.load(tmp_path / "train/axion/sim_0.npy", allow_pickle=False)
    image, _, _ = samples["train/axion/sim_0.npy"]
    assert image.shape == (1, 16, 16)
    np.testing.assert_array_equal(image, src.astype(np.float32))


def test_model_iv_with_no_folder_is_detected_as_model_iv(tmp_path):
    write_model_iv(tmp_path, n=1)
    for split in ("train", "val"):
        (tmp_path / split / "no_sub").rename(tmp_path / split / "no")
    layout, files, _ = discover(tmp_path)
    assert layout == "model-iv"
    assert {f.class_name for f in files} == set(CLASSES)


def test_forced_layout_is_used_instead_of_detection(tmp_path):
    write_model_iv(tmp_path, n=1)
    layout, files, _ = discover(tmp_path, "common-test")
    assert layout == "common-test" and len(files) == 6


def test_forced_layout_that_does_not_fit_fails_instead_of_falling_back(tmp_path):
    write_common_test(tmp_path, {"train": 1, "val": 1})
    with pytest.raises(ValueError, match="unknown class folder 'train'"):
        discover(tmp_path / "dataset", "model")


def test_pack_records_forced_layout_in_manifest(tmp_path, cli):
    write_model_iv(tmp_path / "src", n=1, hwc=False)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--layout", "common-test")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["layout"] == "common-test"


def test_unrecognised_layout_asks_for_layout_option(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="--layout"):
        discover(tmp_path)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_class_alias_maps_to_canonical_index(alias):
    expected = {"no_sub": 0, "cdm": 1, "axion": 2}[ALIASES[alias]]
    assert class_index(alias) == expected
    assert class_index(alias.upper()) == expected


def test_unknown_class_name_is_refused():
    with pytest.raises(ValueError, match="unknown class 'halo'"):
        class_index("halo")


def test_packed_labels_follow_canonical_indices_not_folder_sort_order(tmp_path, cli, records):
    # Model folders sort as axion, cdm, no_sub: sort order would make axion 0.
    write_model(tmp_path / "src", n_train=3, n_test=1)
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--val-fraction", "0").code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == ["no_sub", "cdm", "axion"]
    samples = records(tmp_path / "out", "train") + records(tmp_path / "out", "test")
    assert len(samples) == 12
    for s in samples:
        folder = s.meta["source_file"].split("/")[1]
        assert s.label == {"no_sub": 0, "cdm": 1, "axion": 2}[folder]
        assert s.label == int(s.image.mean() // 10)   # fixture images: class level x 10 + [0, 10) counts


def test_malicious_pickle_is_refused_with_its_path_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_npy(tmp_path / "axion_sim_0.npy", marker)
    with pytest.raises(BadFileError, match=r"axion_sim_0\.npy.*refused to load posix\.system"):
        load_npy(tmp_path / "axion_sim_0.npy")
    assert not marker.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_refuses_malicious_pickle_and_runs_nothing(tmp_path, cli, workers):
    write_model(tmp_path / "src", n_train=2, n_test=1)
    marker = tmp_path / "pwned"
    write_malicious_npy(tmp_path / "src/Model_I/axion/axion_sim_1.npy", marker)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--workers", workers)
    assert result.code == 2
    assert "Model_I/axion/axion_sim_1.npy" in result.err and "refused" in result.err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_object_array_in_a_plain_class_folder_goes_through_restricted_unpickler(tmp_path):
    write_model(tmp_path, n_train=2, n_test=1)
    marker = tmp_path / "pwned"
    write_malicious_npy(tmp_path / "Model_I/cdm/cdm_sim_1.npy", marker)
    _, files, _ = discover(tmp_path)
    bad = next(f for f in files if f.path.name == "cdm_sim_1.npy" and f.split == "train")
    with pytest.raises(BadFileError, match="refused"):
        read_sample(bad, tmp_path)
    assert not marker.exists()


def test_plain_arrays_are_loaded_with_allow_pickle_false(tmp_path, monkeypatch):
    write_model(tmp_path, n_train=2, n_test=1)
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(np, "load", spy)
    _, files, _ = discover(tmp_path)
    plain = [f for f in files if f.class_name != "axion"]
    for f in plain:
        read_sample(f, tmp_path)
    assert calls == [False] * len(plain)
