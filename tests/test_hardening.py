"""Hostile or broken input: crafted manifests, huge claimed allocations, inconsistent counts, unphysical simulator
settings, a full disk and the leftovers of a killed run. Each must end in a clear error naming the culprit."""
import contextlib
import json

import pytest

from dlscale.data.shards import MANIFEST, load_manifest
from dlscale.data.stream import ShardSet, StreamConfig


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
