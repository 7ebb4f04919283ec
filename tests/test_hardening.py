"""Hostile or broken input: crafted manifests, huge claimed allocations, inconsistent counts, unphysical simulator
settings, a full disk and the leftovers of a killed run. Each must end in a clear error naming the culprit."""
import contextlib
import errno
import io
import json
import logging
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from deeplense_fixtures import write_common_test, write_model
from dlscale.data import deeplense, shards as shards_module
from dlscale.data.deeplense import BadFileError, load_npy
from dlscale.data.partial import OWNER, DiskFullError
from dlscale.data.shards import MANIFEST, DatasetWriter, load_manifest, verify
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.tario import CorruptShardError, iter_members
from dlscale.sim import LensSimulator, load_config, simulate_main

PETA = 2 ** 50      # elements no machine has: asking numpy for them fails at once, never really allocates


def edit_manifest(data_dir, edit) -> None:
    path = data_dir / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def small_set(make_shards):
    """10 train / 4 val samples in shards of 4 (train: 3 shards, val: 1), records of 3."""
    return make_shards({"train": 10, "val": 4}, shard_size=4, samples_per_record=3)


# ---- 6: shard names in the manifest ------------------------------------------------------------------------------

BAD_NAMES = ["../../outside.tar", "/etc/passwd", "sub/train-000000.tar", "train-000000.tar; touch pwned",
             "$(touch pwned)", "val-000000.tar", "train-0.tar", "train-000000.tar.gz", ""]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_manifest_shard_name_that_is_not_a_plain_shard_file_name_is_refused(small_set, bad):
    edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][1].update(name=bad))
    with pytest.raises(ValueError) as err:
        load_manifest(small_set)
    assert str(small_set / MANIFEST) in str(err.value)
    assert f"splits.train.shards[1] name {bad!r}" in str(err.value)


def test_manifest_listing_a_shard_twice_is_refused(small_set):
    edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][2].update(name="train-000000.tar"))
    with pytest.raises(ValueError, match=r"shards\[2\] name 'train-000000.tar': listed twice"):
        load_manifest(small_set)


def test_verify_of_a_manifest_pointing_outside_the_dataset_fails_naming_the_entry(small_set, cli, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((small_set / "train-000001.tar").read_bytes())
    edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][1].update(name=str(outside)))
    result = cli("shards", "verify", small_set)
    assert result.code == 2
    assert str(small_set / MANIFEST) in result.err and repr(str(outside)) in result.err


def test_crafted_name_never_reaches_a_pipe_command(small_set, tmp_path):
    pwned = tmp_path / "pwned"
    edit_manifest(small_set, lambda m: m["splits"]["val"]["shards"][0].update(name=f"x.tar; touch {pwned}"))
    with pytest.raises(ValueError, match="expected a plain file name"):
        ShardSet(small_set, "val", StreamConfig(url_template=f"pipe:cat {small_set}/{{name}}", allow_pipe=True))
    assert not pwned.exists()


def test_name_in_a_pipe_template_is_one_quoted_shell_word(small_set, tmp_path):
    """Below the manifest check: whatever a name holds, the shell sees it as one argument and runs nothing else."""
    pwned = tmp_path / "pwned"
    shards = ShardSet(small_set, "val", StreamConfig(url_template=f"pipe:cat {small_set}/{{name}}", allow_pipe=True))
    assert shards.urls == [f"pipe:cat {small_set}/val-000000.tar"]    # a plain name is unchanged
    shards.urls = [shards._url(f"x.tar; touch {pwned}")]
    with contextlib.suppress(Exception), shards.open(0) as f:           # cat fails: no such file
        f.read(512)
    assert not pwned.exists()


# ---- 7: sizes claimed by files are checked before anything is allocated ----------------------------------------

def write_npy_header(path, descr: str, shape: tuple, payload: bytes = b"") -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)


class _Reduce:
    """Pickles as the call `func(*args)` (plus a BUILD with `state`): what a crafted object .npy can ask for."""

    def __init__(self, func, args, state=None):
        self.value = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.value


def write_object_npy(path, obj) -> None:
    """An object-array .npy file whose pickle is `obj`'s (np.save would pickle it the same way)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (2,)})
        pickle.dump(obj, f, protocol=3)


_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]     # numpy's own array rebuild function (numpy 1 and 2)
HOSTILE = {
    "header-shape": lambda p: write_npy_header(p, "<f8", (2 ** 25, 2 ** 25), b"\0" * 64),
    "header-void": lambda p: write_npy_header(p, "|V1000000000", (1,), b"\0" * 64),
    "pickle-reconstruct": lambda p: write_object_npy(p, _Reduce(_reconstruct, (np.ndarray, (PETA,), np.dtype("f8")))),
    "pickle-ndarray": lambda p: write_object_npy(p, _Reduce(np.ndarray, ((PETA,), np.dtype("f8")))),
    "pickle-setstate": lambda p: write_object_npy(p, _Reduce(_reconstruct, (np.ndarray, (0,), np.dtype("O")),
                                                             (1, (PETA,), np.dtype("O"), False, [0]))),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_file_claiming_a_huge_array_is_a_bad_file_naming_it(tmp_path, case):
    path = tmp_path / "axion_sim_0.npy"
    HOSTILE[case](path)
    with pytest.raises(BadFileError) as err:
        load_npy(path)
    assert str(path) in str(err.value) and ("larger than an image may be" in str(err.value)
                                            or "the file holds 64 after its header" in str(err.value))


def test_header_claiming_more_bytes_than_the_file_holds_is_refused_before_reading(tmp_path):
    path = tmp_path / "0.npy"
    write_npy_header(path, "<f8", (100, 100), b"\0" * 64)
    with pytest.raises(BadFileError, match=r"0\.npy.*claims 80,000 bytes of float64 \(100, 100\), the file holds 64"):
        load_npy(path)


def test_image_above_the_element_limit_is_refused_naming_the_limit(tmp_path, monkeypatch):
    plain, pair = tmp_path / "0.npy", tmp_path / "1.npy"
    np.save(plain, np.zeros((20, 20)))
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = np.zeros((20, 20)), 1e-23
    np.save(pair, arr, allow_pickle=True)
    assert load_npy(plain).shape == (20, 20) and load_npy(pair)[0].shape == (20, 20)
    monkeypatch.setattr(deeplense, "MAX_IMAGE_ELEMENTS", 399)
    for path in (plain, pair):
        with pytest.raises(BadFileError, match=r"shape \(20, 20\).*larger than an image may be \(399 elements\)"):
            load_npy(path)


def test_unpickled_arrays_are_plain_numpy_arrays_with_their_values(tmp_path):
    image = np.arange(12.0).reshape(3, 4)
    for order in ("C", "F"):
        arr = np.empty(2, dtype=object)
        arr[0], arr[1] = np.asarray(image, order=order), 2.5e-23
        np.save(tmp_path / "pair.npy", arr, allow_pickle=True)
        loaded = load_npy(tmp_path / "pair.npy")
        assert type(loaded) is np.ndarray and loaded[1] == 2.5e-23
        np.testing.assert_array_equal(loaded[0], image)


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_stops_at_a_hostile_file_naming_it_and_skip_bad_lists_it(tmp_path, cli, workers):
    write_model(tmp_path / "src", n_train=3, n_test=1)
    bad = {case: tmp_path / f"src/Model_I/{folder}/{folder}_sim_{i}.npy" for case, folder, i in
           [("header-shape", "cdm", 1), ("pickle-reconstruct", "axion", 2), ("pickle-setstate", "no_sub", 0)]}
    for case, path in bad.items():
        HOSTILE[case](path)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--workers", workers)
    assert result.code == 2 and "larger than an image may be" in result.err
    assert any(str(path) in result.err for path in bad.values())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--workers", workers, "--skip-bad")
    assert result.code == 0, result.err
    rejected = json.loads((tmp_path / "out/rejected.json").read_text())
    assert sorted(r["file"] for r in rejected) == sorted(str(p) for p in bad.values())
    assert all("larger than an image may be" in r["reason"] for r in rejected)


def test_tar_member_claiming_a_petabyte_is_a_truncated_shard(tmp_path):
    info = tarfile.TarInfo("k.images.npy")
    info.size = PETA
    stream = io.BytesIO(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1000)
    with pytest.raises(CorruptShardError, match=f"shard: truncated \\(wanted {PETA} bytes, got 1000\\)"):
        list(iter_members(stream, "shard"))


def test_verify_reports_a_shard_whose_member_claims_a_petabyte(small_set):
    shard = small_set / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    info = tarfile.TarInfo.frombuf(bytes(data[:512]), "utf-8", "surrogateescape")
    info.size = PETA
    data[:512] = info.tobuf(tarfile.GNU_FORMAT)
    shard.write_bytes(bytes(data))
    problems = verify(small_set)
    assert any(p.startswith(f"{shard}: truncated") for p in problems), problems


# ---- 8: verify checks the manifest's counts against the shards' contents ----------------------------------------

def test_verify_detects_a_split_total_that_disagrees_with_its_shards(small_set, cli):
    edit_manifest(small_set, lambda m: m["splits"]["train"].update(samples=11))
    result = cli("shards", "verify", small_set)
    assert result.code == 1
    assert (f"FAIL {small_set / MANIFEST}: split 'train': 11 samples, but its shard entries add up to 10"
            in result.out)
    assert result.out.count("FAIL") == 1


def test_verify_detects_class_counts_that_disagree_with_the_shards_labels(small_set, cli, records):
    truth = {c: n for c, n in json.loads((small_set / MANIFEST).read_text())["splits"]["val"]["class_counts"].items()}
    labels = [s.label for s in records(small_set, "val")]
    assert truth == {"no_sub": labels.count(0), "cdm": labels.count(1), "axion": labels.count(2)}
    swapped = {**truth, "no_sub": truth["cdm"], "cdm": truth["no_sub"]}     # same total, wrong classes
    assert swapped != truth
    edit_manifest(small_set, lambda m: m["splits"]["val"].update(class_counts=swapped))
    result = cli("shards", "verify", small_set)
    assert result.code == 1
    assert f"FAIL {small_set / MANIFEST}: split 'val': its shards hold per class {truth}, the manifest says {swapped}" \
        in result.out


def test_verify_detects_a_record_count_that_disagrees_naming_the_shard(small_set, cli):
    edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][0].update(records=1))
    result = cli("shards", "verify", small_set)
    assert result.code == 1
    assert f"FAIL {small_set / 'train-000000.tar'}: 4 samples in 2 records, manifest says 4 in 1" in result.out


def test_verify_of_an_unreadable_split_still_checks_its_class_counts_add_up(small_set):
    def edit(m):
        m["splits"]["val"]["class_counts"]["axion"] += 1
    edit_manifest(small_set, edit)
    (small_set / "val-000000.tar").unlink()
    problems = verify(small_set)
    assert f"{small_set / 'val-000000.tar'}: missing" in problems
    assert f"{small_set / MANIFEST}: split 'val': class_counts add up to 5, not to its 4 samples" in problems


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["splits"]["train"]["shards"][1].update(samples="4"),
     "splits.train.shards[1] (train-000001.tar): samples = '4': expected an integer >= 0"),
    (lambda m: m["splits"]["val"].update(samples=-1), "splits.val: samples = -1: expected an integer >= 0"),
    (lambda m: m["splits"]["val"].pop("class_counts"), "splits.val.class_counts: expected an object"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "shards[0] (train-000000.tar) sha256 None"),
])
def test_manifest_with_a_malformed_count_is_refused_naming_the_field(small_set, edit, message):
    edit_manifest(small_set, edit)
    with pytest.raises(ValueError) as err:
        load_manifest(small_set)
    assert str(small_set / MANIFEST) in str(err.value) and message in str(err.value)


# ---- 9: the simulator refuses unphysical settings and never writes a non-finite image -----------------------------

def simulate(out, *extra):
    return simulate_main(["--preset", "model_i", "--n-per-class", "4", "--out", str(out), "--batch-size", "2",
                          "--instrument.n_pix=9", *extra])


@pytest.mark.parametrize("override,key,expected", [
    ("--source.magnitude=-80", "source.magnitude", "[0, 40] mag"),
    ("--lens.theta_E=.inf", "lens.theta_E", "(0, 100] arcsec"),
    ("--instrument.pixel_scale=.nan", "instrument.pixel_scale", "(0, 10] arcsec"),
    ("--source.R_sersic=1e-300", "source.R_sersic", "[0.0001, 100] arcsec"),
    ("--instrument.exposure_time=[1000, .inf]", "instrument.exposure_time", "both finite in (0, 1e+08] s"),
    ("--cosmology.H0=-70", "cosmology.H0", "[10, 500] km/s/Mpc"),
    ("--lens.z_source=1e9", "lens.z_source", "(0, 20]"),
    ("--substructure.vortex_points=0", "substructure.vortex_points", "[1, 100000]"),
])
def test_unphysical_override_is_refused_naming_key_and_range(tmp_path, override, key, expected):
    with pytest.raises(ValueError) as err:
        simulate(tmp_path / "sim", override)
    assert str(err.value).startswith(f"{key} = ") and expected in str(err.value)
    assert list(tmp_path.iterdir()) == []


README_SETTINGS = ["--lens.randomize=true", "--instrument.supersampling=2", "--instrument.noise=true"]


@pytest.mark.parametrize("preset", ["model_i", "model_ii", "model_iii"])
def test_every_preset_and_the_readme_settings_pass_validation(preset):
    config = load_config(preset, None, README_SETTINGS)
    assert config.preset == preset
    assert (config.lens.randomize, config.instrument.supersampling, config.instrument.noise) == (True, 2, True)
    plain = load_config(preset)
    assert config.instrument.n_pix == plain.instrument.n_pix and config.lens.theta_E == plain.lens.theta_E


@pytest.mark.parametrize("override,key", [
    ("--instrument.supersampling=0", "instrument.supersampling"),
    ("--instrument.supersampling=1.5", "instrument.supersampling"),
    ("--instrument.noise=maybe", "instrument.noise"),
    ("--lens.randomize=3", "lens.randomize"),
])
def test_an_invalid_readme_setting_is_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config("model_i", None, [s for s in README_SETTINGS if not s.startswith(override.split("=")[0])]
                    + [override])


@pytest.mark.parametrize("spoil,what", [("nan", "NaN/Inf pixels"), ("negative", "negative counts")])
def test_batch_with_non_finite_pixels_stops_the_run_naming_class_batch_and_keys(tmp_path, monkeypatch, spoil, what):
    real = LensSimulator.add_noise

    def add_noise(self, images, p, generator):
        images = real(self, images, p, generator)
        if p.class_name == "axion":
            images[-1, 0, 4, 4] = float("nan") if spoil == "nan" else -5.0
        return images
    monkeypatch.setattr(LensSimulator, "add_noise", add_noise)
    with pytest.raises(ValueError) as err:
        simulate(tmp_path / "sim")
    message = str(err.value)
    assert message.startswith(f"class axion, batch 2: 1 {what}") and "of 162 pixels in float32" in message
    assert "source.magnitude=None" in message and "lens.theta_E=1.2815" in message and "nothing was written" in message
    assert list(tmp_path.iterdir()) == []


def test_poisson_overflow_of_an_extreme_but_in_range_source_is_caught(tmp_path):
    """Each value in range, together far too bright: the counts pass int64 and torch's Poisson draw wraps."""
    extreme = ["--source.magnitude=0", "--instrument.zero_point=50", "--source.R_sersic=1e-4", "--source.n_sersic=10",
               "--instrument.exposure_time=[1e8, 1e8]", "--source.position_range=[0, 0]"]
    with pytest.raises(ValueError, match=r"class no_sub, batch 0: .*(NaN/Inf pixels|negative counts)"):
        simulate(tmp_path / "sim", *extreme)
    assert list(tmp_path.iterdir()) == []


# ---- 10: a full disk and the leftovers of a killed run --------------------------------------------------------

def fail_after(calls: int):
    """A stand-in for a write that succeeds `calls` times, then finds the disk full."""
    count = {"n": 0}

    def write(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
    return write


def assert_nothing_left(parent):
    assert sorted(p.name for p in parent.iterdir() if p.name != "src") == []


def test_full_disk_while_packing_a_shard_is_one_clear_error_naming_the_directory(tmp_path, cli, monkeypatch):
    write_common_test(tmp_path / "src", {"train": 3, "val": 2})
    real = shards_module.add_member
    budget = fail_after(9)      # three one-sample shards of 3 members each, then the disk is full

    def add_member(*args):
        budget()
        real(*args)
    monkeypatch.setattr("dlscale.data.shards.add_member", add_member)
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out", "--shard-size", "1", "--samples-per-record", "1")
    assert result.code == 2 and "Traceback" not in result.err
    assert (f"{tmp_path}: no space left on device while writing shard train-000003.tar of {tmp_path / 'out'}"
            in result.err)
    assert "needed" in result.err and "KiB written so far" in result.err and "free" in result.err
    assert_nothing_left(tmp_path)


def test_full_disk_at_the_manifest_names_it(tmp_path, cli, monkeypatch):
    write_common_test(tmp_path / "src", {"train": 2, "val": 1})
    monkeypatch.setattr("dlscale.data.shards.write_json", lambda *a: fail_after(0)())
    result = cli("pack", tmp_path / "src", "--out", tmp_path / "out")
    assert result.code == 2
    assert f"{tmp_path}: no space left on device while writing the manifest of {tmp_path / 'out'}" in result.err
    assert_nothing_left(tmp_path)


def test_full_disk_while_simulating_is_a_disk_full_error(tmp_path, monkeypatch):
    monkeypatch.setattr("dlscale.data.shards.add_member", lambda *a: fail_after(0)())
    with pytest.raises(DiskFullError) as err:
        simulate(tmp_path / "sim")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert f"{tmp_path}: no space left on device while writing shard train-000000.tar" in str(err.value)
    assert_nothing_left(tmp_path)


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from dlscale.data.shards import DatasetWriter
with DatasetWriter(sys.argv[1], (1, 4, 4), {"kind": "test"}, shard_size=2) as writer:
    for i in range(5):
        writer.add("train", np.zeros((1, 4, 4), np.float32), 0, {})
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_next_writer_removes_what_a_killed_one_left_but_keeps_live_and_foreign_ones(tmp_path, caplog):
    with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")]) as killed:
        assert killed.wait(timeout=120) == -9
    stale = tmp_path / f".out.partial-{killed.pid}"
    assert sorted(p.name for p in stale.iterdir()) == [OWNER, "train-000000.tar", "train-000001.tar"]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as live_process:
        try:
            live = tmp_path / f".other.partial-{live_process.pid}"
            live.mkdir()
            foreign = tmp_path / f".third.partial-{killed.pid}"     # a dead pid here, but another node's run
            foreign.mkdir()
            (foreign / OWNER).write_text(json.dumps({"host": "another-node", "pid": killed.pid}))
            with caplog.at_level(logging.WARNING, logger="dlscale.data.partial"):
                with DatasetWriter(tmp_path / "next", (1, 4, 4), {"kind": "test"}) as writer:
                    writer.add("train", np.zeros((1, 4, 4), np.float32), 0, {})
            assert not stale.exists() and live.is_dir() and foreign.is_dir()
            assert f"removed {stale}: left by process {killed.pid}, which no longer runs" in caplog.text
            assert caplog.text.count("removed") == 1
            assert sorted(p.name for p in (tmp_path / "next").iterdir()) == [MANIFEST, "train-000000.tar"]
        finally:
            live_process.kill()
