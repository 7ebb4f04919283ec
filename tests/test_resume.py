"""Losing no run: `--resume auto` on another number of ranks (2 -> 1 and 1 -> 2, ZeRO 1 through DeepSpeed universal
checkpoints), past a damaged newest checkpoint, a corrupt training shard, a failure after training, refused runs,
and ranks whose launcher is killed.

One uninterrupted run per layout (torchrun with 2 ranks, and 1 rank in this process) is copied and cut back to a
mid-epoch checkpoint, then resumed on the other layout and compared with the uninterrupted run of that layout:
its schedule position (epoch, batch, optimizer step, learning rate) must be the same, its final metrics close. The
data order of a resumed run necessarily differs (every rank draws its own shards), so its parameters differ: the
tolerance (macro AUC within 0.05, accuracy within 0.15 on the 61 val images) is what two runs of the toy set that
differ only in data order stay within.
"""
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import children, command_line, running
from dlscale.cli import main
from dlscale.train import checkpoint
from dlscale.train.trainer import Trainer
from runs import own_logging

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 420
TRAIN, BATCH = 256, 16
BATCHES = {1: TRAIN // BATCH, 2: TRAIN // (BATCH * 2)}   # per rank and epoch
EPOCHS = 4   # fewer leave the 2-rank run (half the steps) short of separating the middle class by argmax
SCHEDULE = [f"--schedule.epochs={EPOCHS}", "--schedule.checkpoint_every=3", "--schedule.keep_checkpoints=20",
            "--optim.warmup_steps=5", "--optim.lr=3e-3"]
AUC_TOLERANCE, ACCURACY_TOLERANCE = 0.05, 0.15




def train(data: Path, run_dir: Path, *extra: str) -> dict:
    """A supervised run in this process; metrics.json."""
    with own_logging():
        assert main(["train", "--stage", "supervised", "--data", str(data), "--run-dir", str(run_dir), *extra]) == 0
    return json.loads((run_dir / "metrics.json").read_text())


def cut_back(run_dir: Path, copy: Path, tag: str) -> Path:
    """A copy of the finished run `run_dir` as it was right after writing checkpoint `tag`."""
    shutil.copytree(run_dir, copy)
    for name in ("model.pt", "encoder.pt", "metrics.json", "log.txt"):
        (copy / name).unlink()
    shutil.rmtree(copy / "tb")
    for later in (copy / "checkpoints").glob("step*"):
        if later.name > tag:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(tag)
    return copy


def learning_rates(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return {e.step: e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/lr")}


def truncate(path: Path) -> int:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return size // 2


def within_tolerance(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["step"] == uninterrupted["step"]
    assert resumed["val/n_samples"] == uninterrupted["val/n_samples"]
    assert abs(resumed["val/auc_macro"] - uninterrupted["val/auc_macro"]) <= AUC_TOLERANCE
    assert abs(resumed["val/accuracy"] - uninterrupted["val/accuracy"]) <= ACCURACY_TOLERANCE


# ---- the runs (launches start first, so their start-up overlaps the runs in this process) --------------------

@pytest.fixture(scope="module")
def data(make_separable) -> Path:
    return make_separable(train=TRAIN, val=61)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def torchrun(launch, venv_bin, data, tiny_args, root):
    def start(name: str, run_dir: Path, *extra: str):
        return launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage",
                       "supervised", "--data", data, "--run-dir", run_dir, *tiny_args, *extra], root / f"{name}.log",
                      root)
    return start


@pytest.fixture(scope="module")
def two_rank_launch(torchrun, root):
    return torchrun("two", root / "two", *SCHEDULE)


@pytest.fixture(scope="module")
def orphan_launch(torchrun, root, two_rank_launch):
    """A 2-rank training far longer than the test, which kills its launcher (the first test: it stops hogging the
    CPUs early)."""
    return torchrun("orphans", root / "orphans", "--schedule.epochs=100000", "--schedule.checkpoint_every=0")


@pytest.fixture(scope="module")
def one_rank_run(two_rank_launch, data, tiny_args, root) -> Path:
    train(data, root / "one", *tiny_args, *SCHEDULE)
    return root / "one"


@pytest.fixture(scope="module")
def resumed_on_two(one_rank_run, torchrun, root):
    """1 -> 2 ranks, from a copy of the 1-rank run stopped after step 21 whose step-21 tag is then damaged
    (its optimizer file truncated): the resume must fall back to step 18 and convert that."""
    run_dir = cut_back(one_rank_run, root / "one_to_two", checkpoint.tag_for(21))
    truncate(run_dir / "checkpoints" / checkpoint.tag_for(21) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return torchrun("one_to_two", run_dir, *SCHEDULE, "--resume", "auto"), run_dir


@pytest.fixture(scope="module")
def two_rank_run(two_rank_launch, root) -> Path:
    code = two_rank_launch.wait(TIMEOUT_S)
    assert code == 0, two_rank_launch.output()[-4000:]
    return root / "two"


@pytest.fixture(scope="module")
def resumed_on_one(two_rank_run, resumed_on_two, data, tiny_args, root):
    """2 -> 1 rank in this process, from a copy of the 2-rank run stopped after step 12 (epoch 1, batch 4); the
    trainer's state right after the load is recorded."""
    from deepspeed.utils import safe_get_full_optimizer_state
    run_dir = cut_back(two_rank_run, root / "two_to_one", checkpoint.tag_for(12))
    loaded, original = {}, Trainer.resume

    def resume(self):
        original(self)
        loaded.update(state={k: v.clone() if torch.is_tensor(v) else v for k, v in self.module.state_dict().items()},
                      exp_avg={n: safe_get_full_optimizer_state(p, "exp_avg").clone()
                               for n, p in self.module.named_parameters()},
                      lr=self.engine.get_lr()[0], step=self.engine.global_steps, epoch=self.epoch,
                      batch=self.batch_in_epoch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "resume", resume)
        metrics = train(data, run_dir, *tiny_args, *SCHEDULE, "--resume", "auto")
    return run_dir, metrics, loaded


# ---- 5. ranks exit with their launcher --------------------------------------------------------------------------

def test_ranks_exit_when_their_launcher_is_killed(orphan_launch):
    deadline = time.monotonic() + TIMEOUT_S
    while "exits when its launcher" not in orphan_launch.output() or "stage supervised" not in orphan_launch.output():
        assert orphan_launch.proc.poll() is None, orphan_launch.output()[-3000:]
        assert time.monotonic() < deadline, orphan_launch.output()[-3000:]
        time.sleep(0.5)
    ranks = [pid for pid in children(orphan_launch.proc.pid) if "train.py" in command_line(pid)]
    assert len(ranks) == 2, ranks
    os.kill(orphan_launch.proc.pid, signal.SIGKILL)
    orphan_launch.proc.wait()
    try:
        gone_by = time.monotonic() + 15
        while any(running(pid) for pid in ranks) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not any(running(pid) for pid in ranks), f"ranks {ranks} outlived their launcher"
        assert "stops: its launcher" in orphan_launch.output()
    finally:
        for pid in ranks:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


# ---- 1. another number of ranks ---------------------------------------------------------------------------------

def partitions_joined(tag_dir: Path, state: str) -> dict[str, torch.Tensor]:
    """Each parameter's optimizer `state`, joined from the ZeRO partitions of every rank's file (read directly)."""
    pieces: dict[str, list] = {}
    for path in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flat = optim["base_optimizer_state"]["state"][0][state]
        for name, fragment in optim["param_slice_mappings"][0].items():
            pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def test_two_rank_checkpoint_resumes_on_one_rank_at_the_same_schedule_position(resumed_on_one, one_rank_run):
    run_dir, _, loaded = resumed_on_one
    samples_in_epoch = (12 - BATCHES[2]) * BATCH * 2
    epoch, batch = 1, samples_in_epoch // BATCH
    step = epoch * BATCHES[1] + batch
    assert (loaded["epoch"], loaded["batch"], loaded["step"]) == (epoch, batch, step)
    assert (f"resumed from step00000012 (epoch {epoch}, batch {batch}, step {step}), written by 2 rank(s)"
            in (run_dir / "log.txt").read_text())
    uninterrupted = learning_rates(one_rank_run)
    resumed = learning_rates(run_dir)
    assert resumed and min(resumed) > step
    assert resumed == pytest.approx({s: uninterrupted[s] for s in resumed}, rel=1e-6)


def test_two_rank_checkpoint_loads_on_one_rank_with_its_weights_buffers_and_optimizer_state(resumed_on_one):
    run_dir, _, loaded = resumed_on_one
    tag_dir = run_dir / "checkpoints" / "step00000012"
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert saved.keys() == loaded["state"].keys()
    for key, value in saved.items():   # parameters, BatchNorm statistics
        assert torch.equal(value, loaded["state"][key]) if torch.is_tensor(value) else value == loaded["state"][key]
    moments = partitions_joined(tag_dir, "exp_avg")
    assert moments.keys() == loaded["exp_avg"].keys()
    for name, joined in moments.items():
        assert joined.abs().sum() > 0
        assert torch.equal(joined.reshape(loaded["exp_avg"][name].shape), loaded["exp_avg"][name]), name


def test_two_rank_checkpoint_resumed_on_one_rank_ends_like_an_uninterrupted_one_rank_run(resumed_on_one,
                                                                                         one_rank_run):
    _, metrics, _ = resumed_on_one
    within_tolerance(metrics, json.loads((one_rank_run / "metrics.json").read_text()))
    assert metrics["step"] == EPOCHS * BATCHES[1]


def test_one_rank_checkpoint_resumes_on_two_ranks_at_the_same_schedule_position(resumed_on_two, two_rank_run):
    launched, run_dir = resumed_on_two
    assert launched.wait(TIMEOUT_S) == 0, launched.output()[-4000:]
    samples_in_epoch = (18 - BATCHES[1]) * BATCH
    epoch, batch = 1, samples_in_epoch // (BATCH * 2)
    step = epoch * BATCHES[2] + batch
    assert (f"resumed from step00000018 (epoch {epoch}, batch {batch}, step {step}), written by 1 rank(s)"
            in (run_dir / "log.txt").read_text())
    uninterrupted, resumed = learning_rates(two_rank_run), learning_rates(run_dir)
    assert resumed and min(resumed) > step
    assert resumed == pytest.approx({s: uninterrupted[s] for s in resumed}, rel=1e-6)
    within_tolerance(json.loads((run_dir / "metrics.json").read_text()),
                     json.loads((two_rank_run / "metrics.json").read_text()))


# ---- 2. a damaged newest checkpoint -----------------------------------------------------------------------------

def test_two_ranks_resume_past_a_truncated_latest_checkpoint_naming_it(resumed_on_two):
    launched, run_dir = resumed_on_two
    assert launched.wait(TIMEOUT_S) == 0, launched.output()[-4000:]
    log = (run_dir / "log.txt").read_text()
    assert ("step00000021 (named in `latest`) is incomplete: zero_pp_rank_0_mp_rank_00_optim_states.pt has" in log
            and "resuming from step00000018, the newest complete one" in log)
    assert "removing incomplete checkpoint" in log and "step00000021: zero_pp_rank_0" in log
    for tag in ("step00000018", "step00000021"):   # the tags of those steps at 2 ranks, written anew
        record, _ = checkpoint.check_complete(run_dir / "checkpoints" / tag)
        assert record is not None and record["world"] == 2, tag


def fake_tag(ckpt_dir: Path, step: int, samples: int, world: int = 1) -> Path:
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for rank in range(world):
        (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 200)
    checkpoint.mark_complete(tag_dir, {"world": world, "step": step, "samples_seen": samples})
    (ckpt_dir / "latest").write_text(tag_dir.name)
    return tag_dir


@pytest.mark.parametrize("damage", ["truncated", "removed", "never_marked"])
def test_the_newest_complete_tag_is_chosen_and_the_damaged_one_named(tmp_path, caplog, damage):
    fake_tag(tmp_path, 4, 64, world=2)
    newest = fake_tag(tmp_path, 8, 128, world=2)
    rank1 = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        truncate(rank1)
    elif damage == "removed":
        rank1.unlink()
    else:
        (newest / checkpoint.COMPLETE).unlink()
    tag, record = checkpoint.newest_complete(tmp_path)
    assert tag == "step00000004" and record["world"] == 2
    expected = {"truncated": "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes, complete.json recorded 200",
                "removed": "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
                "never_marked": "no complete.json"}[damage]
    assert f"step00000008 (named in `latest`) is incomplete: {expected}" in caplog.text


def test_no_complete_tag_at_all_stops_the_resume_naming_every_tag(tmp_path):
    for step in (4, 8):
        (fake_tag(tmp_path, step, 16 * step) / checkpoint.COMPLETE).unlink()
    with pytest.raises(RuntimeError, match="no complete checkpoint.*step00000004: no complete.json.*step00000008"):
        checkpoint.newest_complete(tmp_path)


def test_tags_are_ordered_by_samples_seen_so_pruning_keeps_those_written_after_a_resume_on_more_ranks(tmp_path):
    fake_tag(tmp_path, 20, 320)      # 1 rank: step 20 is 320 samples
    fake_tag(tmp_path, 21, 336)
    fake_tag(tmp_path, 12, 384, world=2)   # resumed on 2 ranks at step 10: fewer steps, more samples
    fake_tag(tmp_path, 14, 448, world=2)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in checkpoint.tag_dirs(tmp_path)) == ["step00000012", "step00000014"]
    assert checkpoint.newest_complete(tmp_path)[0] == "step00000014"


def test_a_complete_tag_of_the_step_about_to_be_written_is_kept_aside_until_the_new_one_is_complete(tmp_path):
    fake_tag(tmp_path, 15, 240)
    fake_tag(tmp_path, 18, 288)                 # written at 1 rank; a resume on 2 ranks reaches "step 18" later
    checkpoint.set_aside(tmp_path, "step00000018")
    (tmp_path / "step00000018").mkdir()         # the 2-rank write of step 18, killed half-way
    (tmp_path / "step00000018" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
    tag, record = checkpoint.newest_complete(tmp_path)
    assert tag == "step00000018.replaced" and record["samples_seen"] == 288
    checkpoint.set_aside(tmp_path, "step00000018")   # the retry: the unfinished one goes, the kept one stays
    assert not (tmp_path / "step00000018").exists() and (tmp_path / "step00000018.replaced").is_dir()


def test_a_saved_tag_lists_every_file_with_its_size_and_latest_names_it(one_rank_run):
    ckpt_dir = one_rank_run / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
    record, problem = checkpoint.check_complete(ckpt_dir / tag)
    assert problem == "" and record["world"] == 1 and record["samples_seen"] == EPOCHS * TRAIN
    on_disk = {p.name: p.stat().st_size for p in (ckpt_dir / tag).iterdir() if p.name != checkpoint.COMPLETE}
    assert record["files"] == on_disk and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in on_disk


@pytest.mark.parametrize("same_layout", [True, False])
def test_position_keeps_each_rank_s_epoch_loss_sums_or_their_mean_on_another_layout(same_layout):
    client = {"epoch": 1, "batch_in_epoch": 3, "step": 11, "epoch_batches": 3, "world": 2, "batch_size": 16,
              "samples_seen": 352, "samples_in_epoch": 96, "epoch_loss_sums": {"a": 3.0},
              "epoch_loss_sums_per_rank": [{"a": 3.0}, {"a": 6.0}]}
    if same_layout:
        at = checkpoint.position(client, world=2, rank=1, batch_size=16, batches=8, grad_accum=1)
        assert (at.epoch, at.batch_in_epoch, at.step, at.sums, at.count, at.converted) == (1, 3, 11, {"a": 6.0}, 3,
                                                                                          False)
    else:
        at = checkpoint.position(client, world=1, rank=0, batch_size=16, batches=16, grad_accum=1)
        assert (at.epoch, at.batch_in_epoch, at.step, at.count, at.converted) == (1, 6, 22, 6, True)
        assert at.sums["a"] / at.count == pytest.approx((3.0 + 6.0) / 6)   # the mean over both ranks' batches
    assert at.samples_seen == 352


# ---- 3. corrupt training data, failures after training ----------------------------------------------------------

@pytest.fixture(scope="module")
def damaged_data(separable_data, tmp_path_factory):
    """Copies of the toy set: one with a train shard cut in half, one with a val shard cut in half."""
    out = {}
    for split in ("train", "val"):
        copy = shutil.copytree(separable_data, tmp_path_factory.mktemp(f"bad_{split}") / "data")
        truncate(copy / f"{split}-000001.tar")
        out[split] = copy
    return out


@pytest.fixture(scope="module")
def corrupt_train_run(damaged_data, tiny_args, root, one_rank_run) -> Path:
    run_dir = root / "corrupt_train"
    train(damaged_data["train"], run_dir, *tiny_args, "--schedule.epochs=2", "--data.num_workers=2")
    return run_dir


def test_a_truncated_train_shard_is_skipped_counted_and_the_run_finishes(corrupt_train_run):
    metrics = json.loads((corrupt_train_run / "metrics.json").read_text())
    assert (corrupt_train_run / "model.pt").is_file() and (corrupt_train_run / "encoder.pt").is_file()
    assert metrics["data/skipped_shards"] == 1 and metrics["data/skipped_records"] > 0
    assert metrics["probe/skipped_shards"] == 1 and metrics["probe/skipped_records"] > 0   # the probe read it too
    assert metrics["val/n_samples"] == 61


def test_skipped_train_data_is_one_warning_then_one_summary(corrupt_train_run):
    log = (corrupt_train_run / "log.txt").read_text()
    metrics = json.loads((corrupt_train_run / "metrics.json").read_text())
    summary = [line for line in log.splitlines() if "training skipped corrupt data over all ranks and workers" in line]
    assert len(summary) == 1
    assert (f"1 shard(s), {metrics['data/skipped_records']} record(s) lost" in summary[0]
            and "train-000001.tar" in summary[0])
    reads = int(summary[0].split(" lost in ")[1].split()[0])
    assert log.count("skipped a corrupt part of") == 2   # training's first (of all its workers), the probe's first
    assert reads >= 1


def test_a_failure_after_training_keeps_the_trained_model(cli, damaged_data, tiny_args, root, one_rank_run):
    run_dir = root / "failed_eval"
    result = cli("train", "--stage", "supervised", "--data", damaged_data["val"], "--run-dir", run_dir, *tiny_args,
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=2")
    assert result.code == 2
    assert "evaluating split 'val' failed: rank 0: CorruptShardError: val-000001.tar: truncated" in result.err
    assert "the trained model is in" in (run_dir / "log.txt").read_text()
    model = torch.load(run_dir / "model.pt", weights_only=True)
    import dlscale
    encoder = dlscale.load_encoder(run_dir / "encoder.pt")
    assert all(torch.equal(v, model[f"encoder.{k}"]) for k, v in encoder.state_dict().items())


# ---- 4. refused runs leave nothing behind -------------------------------------------------------------------------

REFUSED = {
    "init_from": (["--init-from", "{tmp}/missing/encoder.pt"], "missing/encoder.pt"),
    "data_dir": (["--data", "{tmp}/no_data"], "manifest"),
    "precision": (["--deepspeed.precision=fp16"], "fp16 is not supported on CPU"),
    "config_file": (["--deepspeed.config_file={tmp}/missing.json"], "missing.json not found"),
    "optimizer": (["--optim.lr=-1"], "optim.lr=-1"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_run_leaves_no_run_directory_and_a_retry_in_it_works(case, cli, tmp_path, separable_data,
                                                                       tiny_args, one_rank_run):
    (tmp_path / "no_data").mkdir()
    bad, message = REFUSED[case]
    bad = [a.replace("{tmp}", str(tmp_path)) for a in bad]
    run_dir = tmp_path / "run"
    short = [*tiny_args, "--schedule.epochs=1", "--schedule.batches_per_epoch=1", "--eval.probe_samples=32"]
    args = ["train", "--stage", "supervised", "--data", separable_data, "--run-dir", run_dir, *short]
    refused = cli(*args, *bad)
    assert refused.code != 0 and message in refused.err
    assert not run_dir.exists()
    retried = cli(*args)
    assert retried.code == 0, retried.err[-3000:]
    assert (run_dir / "model.pt").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
