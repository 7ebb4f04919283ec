"""`dlscale pack` / `dlscale shards verify|info`: exact round trips, splits, WebDataset compatibility, bad inputs."""
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from deeplense_fixtures import write_common_test, write_model, write_model_iv
from dlscale.data.classes import class_index
from dlscale.data.stream import eval_loader
from dlscale.data.stream_config import StreamConfig

SOURCES = {
    "common-test": lambda root: write_common_test(root, {"train": 4, "val": 3}),
    "model": lambda root: write_model(root, n_train=10, n_test=2),   # val: 0.1 of train per class
    "model-iv": lambda root: write_model_iv(root, n=3),
}


def source_image(path):
    """The image of one of our fixture files as float32 (C,H,W), read independently of dlscale's reader."""
    arr = np.load(path, allow_pickle=True)   # trusted: written by the fixtures
    image = arr.item() if arr.shape == () else arr[0] if arr.dtype == object else arr
    image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0) if image.shape[-1] == 3 else image
    return image.astype(np.float32)


def source_truth(src):
    """Counter of (label, image bytes) per source split folder ("Model_I" counts as train + val)."""
    truth = {}
    for path in sorted(src.rglob("*.npy")):
        image = source_image(path)
        folder = path.parent.parent.name
        split = "test" if folder.endswith("_test") else "train+val" if folder.startswith("Model_") else folder
        truth.setdefault(split, Counter())[(class_index(path.parent.name), image.tobytes())] += 1
    return truth


def stream_content(data_dir, split):
    cfg = StreamConfig(batch_size=5, num_workers=0, normalize="none", augment=False)
    return Counter((int(label), image.numpy().tobytes())
                   for batch in eval_loader(data_dir, cfg, split=split)
                   for image, label in zip(batch["image"], batch["label"]))


def pack_ok(cli, src, out, *options):
    result = cli("pack", src, "--out", out, *options)
    assert result.code == 0, result.err
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("layout", sorted(SOURCES))
def test_pack_verify_eval_stream_round_trip_is_exact(tmp_path, cli, layout):
    SOURCES[layout](tmp_path / "src")
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--shard-size", "4", "--samples-per-record", "3")
    assert manifest["source"]["layout"] == layout
    assert cli("shards", "verify", tmp_path / "out").code == 0
    truth = source_truth(tmp_path / "src")
    streamed = {split: stream_content(tmp_path / "out", split) for split in manifest["splits"]}
    if layout == "model":
        streamed = {"train+val": streamed["train"] + streamed["val"], "test": streamed["test"]}
    assert streamed == truth


def test_metadata_names_each_samples_source_file(tmp_path, cli, records):
    write_model(tmp_path / "src", n_train=3, n_test=1)
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--shard-size", "5")
    for split in manifest["splits"]:
        for s in records(tmp_path / "out", split):
            np.testing.assert_array_equal(s.image, source_image(tmp_path / "src" / s.meta["source_file"]))


def test_val_split_is_cut_stratified_when_source_has_none(tmp_path, cli):
    write_model(tmp_path / "src", n_train=8, n_test=2)
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--val-fraction", "0.25")
    counts = {split: info["class_counts"] for split, info in manifest["splits"].items()}
    assert counts == {"train": {"no_sub": 6, "cdm": 6, "axion": 6}, "val": {"no_sub": 2, "cdm": 2, "axion": 2},
                      "test": {"no_sub": 2, "cdm": 2, "axion": 2}}


def val_files(cli, records, src, out, seed):
    pack_ok(cli, src, out, "--val-fraction", "0.25", "--seed", seed)
    return sorted(s.meta["source_file"] for s in records(out, "val"))


def test_val_split_is_the_same_for_the_same_seed(tmp_path, cli, records):
    write_model(tmp_path / "src", n_train=8, n_test=1)
    first = val_files(cli, records, tmp_path / "src", tmp_path / "a", 3)
    assert all(f.startswith("Model_I/") for f in first)
    assert val_files(cli, records, tmp_path / "src", tmp_path / "b", 3) == first


def test_val_split_differs_for_another_seed(tmp_path, cli, records):
    write_model(tmp_path / "src", n_train=8, n_test=1)
    assert (val_files(cli, records, tmp_path / "src", tmp_path / "a", 3) !=
            val_files(cli, records, tmp_path / "src", tmp_path / "b", 4))


def test_source_val_split_is_kept(tmp_path, cli, records):
    write_common_test(tmp_path / "src", {"train": 4, "val": 2})
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--val-fraction", "0.5")
    assert manifest["splits"]["val"]["samples"] == 6
    assert all(s.meta["source_file"].startswith("dataset/val/") for s in records(tmp_path / "out", "val"))


def test_samples_inside_a_shard_mix_classes(tmp_path, cli, records):
    write_common_test(tmp_path / "src", {"train": 8, "val": 1})
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--shard-size", "6", "--samples-per-record", "2")
    assert len(manifest["splits"]["train"]["shards"]) == 4
    classes_per_shard = Counter()
    for s in records(tmp_path / "out", "train"):
        classes_per_shard[s.id[0], s.label] += 1
    for shard in range(4):
        assert sum(1 for (sh, _) in classes_per_shard if sh == shard) >= 2


def test_single_sample_records_are_classic_webdataset_samples(tmp_path, cli, records):
    write_common_test(tmp_path / "src", {"train": 2, "val": 1})
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--samples-per-record", "1", "--shard-size", "4")
    assert manifest["record_layout"]["kind"] == "sample"
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode())
    expected = records(tmp_path / "out", "train")
    assert len(read) == len(expected) == 6
    for sample, truth in zip(read, expected):
        assert "." not in sample["__key__"]
        np.testing.assert_array_equal(sample["image.npy"], truth.image)
        assert sample["cls"] == truth.label
        assert sample["json"] == truth.meta


def test_stacked_records_are_readable_by_webdataset(tmp_path, cli, records):
    write_common_test(tmp_path / "src", {"train": 3, "val": 1})
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--samples-per-record", "4")
    assert manifest["record_layout"]["kind"] == "stacked"
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode())
    expected = records(tmp_path / "out", "train")
    assert [len(r["labels.npy"]) for r in read] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([r["images.npy"] for r in read]), [s.image for s in expected])
    np.testing.assert_array_equal(np.concatenate([r["labels.npy"] for r in read]), [s.label for s in expected])
    assert [m for r in read for m in r["meta.json"]] == [s.meta for s in expected]


def _truncated(path):
    path.write_bytes(path.read_bytes()[:300])


def _garbage(path):
    path.write_bytes(b"this is not a numpy file" * 20)


def _nan(path):
    image = np.load(path)
    image[0, 3, 4] = np.nan
    np.save(path, image)


def _inf(path):
    image = np.load(path)
    image[0, 0, 0] = -np.inf
    np.save(path, image)


def _other_shape(path):
    np.save(path, np.zeros((1, 21, 20)))


# Each bad file sits in val/, which is written after every train shard, so a pack that stops at it has already
# written shards into its partial directory: the test checks that nothing of it survives.
BAD_FILES = {"truncated": (_truncated, "cannot read .npy"), "garbage": (_garbage, "cannot read .npy"),
             "nan": (_nan, "NaN/Inf"), "inf": (_inf, "NaN/Inf"), "shape": (_other_shape, "image shape (1, 21, 20)")}


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_stops_pack_naming_it_and_leaves_nothing(tmp_path, cli, case):
    spoil, reason = BAD_FILES[case]
    write_common_test(tmp_path / "src", {"train": 3, "val": 2})
    bad = tmp_path / "src/dataset/val/sphere/1.npy"
    spoil(bad)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--shard-size", "1")
    assert result.code != 0
    assert str(bad) in result.err and reason in result.err
    assert_nothing_written(tmp_path)


def test_unknown_class_folder_stops_pack_naming_it(tmp_path, cli):
    write_common_test(tmp_path / "src", {"train": 1, "val": 1})
    lens = tmp_path / "src/dataset/val/lens"
    lens.mkdir()
    np.save(lens / "0.npy", np.zeros((1, 20, 20)))
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out")
    assert result.code != 0
    assert "val/lens" in result.err and "unknown class folder 'lens'" in result.err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("class_folders", [False, True])
def test_empty_source_stops_pack(tmp_path, cli, class_folders):
    for name in ("no_sub", "cdm", "axion") if class_folders else ():
        (tmp_path / "src/train" / name).mkdir(parents=True)
    (tmp_path / "src").mkdir(exist_ok=True)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out")
    assert result.code != 0
    assert str(tmp_path / "src") in result.err
    assert ("no .npy files" if class_folders else "cannot tell the layout") in result.err
    assert_nothing_written(tmp_path)


def test_out_dir_holding_shards_is_refused_and_left_untouched(tmp_path, cli):
    write_common_test(tmp_path / "src", {"train": 1, "val": 1})
    pack_ok(cli, tmp_path / "src", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out")
    assert result.code != 0
    assert str(tmp_path / "out") in result.err and "already holds a dataset" in result.err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not list(tmp_path.glob(".out.partial-*"))


def test_skip_bad_leaves_bad_files_out_and_lists_them_with_reasons(tmp_path, cli):
    write_common_test(tmp_path / "src", {"train": 3, "val": 2})
    bad = {case: tmp_path / f"src/dataset/{split}/{folder}/{i}.npy" for case, split, folder, i in
           [("truncated", "train", "no", 0), ("nan", "train", "vort", 2), ("shape", "val", "sphere", 1)]}
    for case, path in bad.items():
        BAD_FILES[case][0](path)
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--skip-bad")
    rejected = json.loads((tmp_path / "out/rejected.json").read_text())
    assert sorted(r["file"] for r in rejected) == sorted(str(p) for p in bad.values())
    for r in rejected:
        case = next(c for c, p in bad.items() if str(p) == r["file"])
        assert BAD_FILES[case][1] in r["reason"]
    assert manifest["rejected"] == 3
    assert manifest["splits"]["train"]["class_counts"] == {"no_sub": 2, "cdm": 3, "axion": 2}
    assert manifest["splits"]["val"]["class_counts"] == {"no_sub": 2, "cdm": 1, "axion": 2}
    assert manifest["splits"]["train"]["samples"] == 7 and manifest["splits"]["val"]["samples"] == 5


@pytest.fixture
def packed(tmp_path, cli):
    write_common_test(tmp_path / "src", {"train": 4, "val": 2})
    manifest = pack_ok(cli, tmp_path / "src", tmp_path / "out", "--shard-size", "5", "--samples-per-record", "2")
    return tmp_path / "out", manifest


def test_verify_passes_an_intact_dataset(cli, packed):
    out, _ = packed
    result = cli("shards", "verify", out)
    assert result.code == 0 and "OK" in result.out and "FAIL" not in result.out


def test_verify_detects_a_flipped_byte_naming_the_shard(cli, packed):
    out, _ = packed
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[512 + 200] ^= 0x40   # inside the first record's image data: the record still decodes
    shard.write_bytes(bytes(data))
    result = cli("shards", "verify", out)
    assert result.code == 1
    assert f"FAIL {shard}: sha256 differs" in result.out
    assert result.out.count("FAIL") == 1


def test_verify_detects_a_deleted_shard_naming_it(cli, packed):
    out, _ = packed
    (out / "val-000001.tar").unlink()
    result = cli("shards", "verify", out)
    assert result.code == 1
    assert f"FAIL {out / 'val-000001.tar'}: missing" in result.out


def test_verify_detects_a_count_mismatch_naming_the_shard(cli, packed):
    out, manifest = packed
    manifest["splits"]["train"]["shards"][2]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("shards", "verify", out)
    assert result.code == 1
    assert f"FAIL {out / 'train-000002.tar'}: 2 samples in 1 records, manifest says 3 in 1" in result.out


def test_info_prints_per_class_counts(cli, packed):
    out, _ = packed
    result = cli("shards", "info", out)
    assert result.code == 0
    rows = [line.split() for line in result.out.splitlines()]
    assert ["split", "shards", "no_sub", "cdm", "axion", "total"] in rows
    assert ["train", "3", "4", "4", "4", "12"] in rows
    assert ["val", "2", "2", "2", "2", "6"] in rows


def test_two_reader_workers_give_the_same_dataset_as_one(tmp_path, cli, records):
    write_model(tmp_path / "src", n_train=4, n_test=2)
    one = pack_ok(cli, tmp_path / "src", tmp_path / "one", "--shard-size", "5", "--workers", "1")
    two = pack_ok(cli, tmp_path / "src", tmp_path / "two", "--shard-size", "5", "--workers", "2")
    assert one["splits"].keys() == two["splits"].keys()
    for split in one["splits"]:
        a, b = records(tmp_path / "one", split), records(tmp_path / "two", split)
        assert [(s.label, s.meta, s.id) for s in a] == [(s.label, s.meta, s.id) for s in b]
        np.testing.assert_array_equal([s.image for s in a], [s.image for s in b])
