"""Preemption: a stop signal mid-epoch makes every rank finish its step, write a complete checkpoint of that step and
exit with `PREEMPTED_EXIT_CODE`; `--resume auto` then ends with the weights of an uninterrupted run. One rank (the
signal to the process itself) and two ranks on gloo under torchrun (the signal to one rank; to the launcher, which
forwards it to both).

The signal is sent by the drill `DLSCALE_SIGNAL_AT_STEP` right after a known optimizer step (and the sender waits
until it has arrived), not by a timer, so the step at which the runs stop is fixed.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dlscale import preemption
from dlscale.cli import main
from dlscale.train import checkpoint
from runs import own_logging

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
BATCHES = {1: 240 // 16, 2: 240 // (16 * 2)}   # per rank and epoch (the default toy set, 16-image batches)
# checkpoint_every larger than the run: without the signal there would be no checkpoint before the last step
SCHEDULE = ["--schedule.epochs=2", "--schedule.checkpoint_every=1000", "--schedule.keep_checkpoints=5"]
STOP = {"one": BATCHES[1] + 5, "rank1": BATCHES[2] + 3, "launcher": 5}   # all mid-epoch
CODE = preemption.PREEMPTED_EXIT_CODE


def drill(step: int, target: str) -> list[str]:
    """A command prefix that gives the launched process the drill (env execs it: the pid stays the launcher's)."""
    return ["env", f"{preemption.DRILL}={step}:SIGTERM:{target}"]


def model_differences(run_dir: Path, reference: Path) -> list[str]:
    got = torch.load(run_dir / "model.pt", weights_only=True)
    want = torch.load(reference / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    return [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])]


def trained_differences(run_dir: Path, reference: Path, step: int) -> list[str]:
    """The entries that differ between the model states of two runs' checkpoints of `step`: the weights training
    ended with (model.pt also holds what is fitted after training, from the evaluation's features)."""
    def states(run: Path) -> dict:
        path = run / checkpoint.CHECKPOINTS / checkpoint.tag_for(step) / checkpoint.MODEL_STATES
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    got, want = states(run_dir), states(reference)
    assert got.keys() == want.keys()
    return [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])]


def assert_stopped_at(run_dir: Path, step: int, batches: int) -> None:
    """A complete checkpoint of `step` is the latest, nothing of a finished run was written, and log.txt says which
    signal stopped the run where and how to resume."""
    tag = checkpoint.tag_for(step)
    ckpt_dir = run_dir / checkpoint.CHECKPOINTS
    assert (ckpt_dir / "latest").read_text().strip() == tag
    record, problem = checkpoint.check_complete(ckpt_dir / tag)
    assert record is not None, problem
    assert record["step"] == step
    assert [p.name for p in checkpoint.tag_dirs(ckpt_dir)] == [tag]
    assert not (run_dir / "model.pt").exists() and not (run_dir / "metrics.json").exists()
    log = (run_dir / "log.txt").read_text()
    assert (f"SIGTERM received: stopped after step {step} (epoch {step // batches}, batch {step % batches}); "
            f"checkpoint {ckpt_dir / tag} is complete; exiting with code {CODE}") in log
    assert "--resume auto" in log


# ---- the runs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preemption")


@pytest.fixture(scope="module")
def torchrun(launch, venv_bin, separable_data, tiny_args, root):
    def start(name: str, *extra: str, prefix: tuple = (), log: str = ""):
        return launch([*prefix, venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT,
                       "--stage", "supervised", "--data", separable_data, "--run-dir", root / name, *tiny_args,
                       *SCHEDULE, *extra], root / f"{log or name}.log", root)
    return start


@pytest.fixture(scope="module")
def two_rank_runs(torchrun, root):
    """The uninterrupted 2-rank run and the two stopped ones, started together; {name: (exit code, output)}."""
    started = {"two": torchrun("two"),
               "rank1": torchrun("rank1", prefix=drill(STOP["rank1"], "1")),
               "launcher": torchrun("launcher", prefix=drill(STOP["launcher"], "launcher"))}
    return {name: (p.wait(TIMEOUT_S), p.output()) for name, p in started.items()}


@pytest.fixture(scope="module")
def two_rank_resumed(two_rank_runs, torchrun):
    """Both stopped 2-rank runs resumed with `--resume auto`, together; {name: (exit code, output)}."""
    started = {name: torchrun(name, "--resume", "auto", log=f"{name}_resumed") for name in ("rank1", "launcher")
               if two_rank_runs[name][0] != 0}
    return {name: (p.wait(TIMEOUT_S), p.output()) for name, p in started.items()}


@pytest.fixture(scope="module")
def one_rank_runs(launch, separable_data, tiny_args, root):
    """(exit code, output) of a 1-process run signalled in its second epoch; its uninterrupted twin trains in this
    process meanwhile."""
    stopped = launch([*drill(STOP["one"], "0"), sys.executable, TRAIN_SCRIPT, "--stage", "supervised", "--data",
                      separable_data, "--run-dir", root / "one_stopped", *tiny_args, *SCHEDULE],
                     root / "one_stopped.log", root)
    with own_logging():
        assert main(["train", "--stage", "supervised", "--data", str(separable_data), "--run-dir",
                     str(root / "one"), *tiny_args, *SCHEDULE]) == 0
    return stopped.wait(TIMEOUT_S), stopped.output()


# ---- one rank ---------------------------------------------------------------------------------------------------

def test_one_rank_stops_after_its_step_with_a_complete_checkpoint_and_the_documented_code(one_rank_runs, root):
    code, output = one_rank_runs
    assert code == CODE, output[-3000:]
    assert_stopped_at(root / "one_stopped", STOP["one"], BATCHES[1])


def test_one_rank_resumes_to_the_weights_of_an_uninterrupted_run(one_rank_runs, root, separable_data, tiny_args):
    assert one_rank_runs[0] == CODE
    run_dir, handler = root / "one_stopped", signal.getsignal(signal.SIGTERM)
    with own_logging():
        assert main(["train", "--stage", "supervised", "--data", str(separable_data), "--run-dir", str(run_dir),
                     *tiny_args, *SCHEDULE, "--resume", "auto"]) == 0
    assert f"resumed from {checkpoint.tag_for(STOP['one'])} (epoch 1, batch 5" in (run_dir / "log.txt").read_text()
    assert trained_differences(run_dir, root / "one", 2 * BATCHES[1]) == []
    assert model_differences(run_dir, root / "one") == []
    assert signal.getsignal(signal.SIGTERM) is handler   # the run (not stopped) put the handlers back


# ---- two ranks under torchrun -----------------------------------------------------------------------------------

def test_sigterm_to_one_rank_stops_both_after_the_same_step(two_rank_runs, root):
    code, output = two_rank_runs["rank1"]
    assert code != 0, output[-3000:]
    # torchrun's failure summary lists each rank with its exit code: both stopped with the documented one
    failures = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    assert sorted(failures) == [("0", str(CODE)), ("1", str(CODE))], output[-3000:]
    assert_stopped_at(root / "rank1", STOP["rank1"], BATCHES[2])


def test_sigterm_to_the_launcher_is_forwarded_and_both_ranks_stop_after_the_same_step(two_rank_runs, root):
    code, output = two_rank_runs["launcher"]
    # torchrun itself ends with its SignalException (exit code 1) once its ranks have exited; none had to be killed
    assert code == 1 and "got signal: 15" in output, output[-3000:]
    assert "forcefully exiting" not in output
    assert_stopped_at(root / "launcher", STOP["launcher"], BATCHES[2])


@pytest.mark.parametrize("name", ["rank1", "launcher"])
def test_two_ranks_resume_to_the_weights_of_an_uninterrupted_run(two_rank_runs, two_rank_resumed, root, name):
    assert two_rank_runs["two"][0] == 0, two_rank_runs["two"][1][-3000:]
    code, output = two_rank_resumed[name]
    assert code == 0, output[-3000:]
    step = STOP[name]
    assert (f"resumed from {checkpoint.tag_for(step)} (epoch {step // BATCHES[2]}, batch {step % BATCHES[2]}"
            in (root / name / "log.txt").read_text())
    assert trained_differences(root / name, root / "two", 2 * BATCHES[2]) == []
    assert model_differences(root / name, root / "two") == []
    assert json.loads((root / name / "metrics.json").read_text())["step"] == 2 * BATCHES[2]


# ---- the handler itself (in this process) -----------------------------------------------------------------------

@pytest.fixture
def clean_state():
    yield
    preemption.clear()


def test_a_signal_is_only_recorded_and_a_second_one_absorbed(clean_state):
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.listen(["SIGUSR1"]) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)   # the default action would end this process
        assert preemption.requested() == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN   # from the end of the run until the process exits
    preemption.clear()
    assert preemption.requested() == 0 and signal.getsignal(signal.SIGUSR1) is before


def test_without_a_signal_the_previous_handlers_come_back(clean_state):
    before = signal.getsignal(signal.SIGTERM)
    with preemption.listen(["SIGTERM", "SIGUSR1"]):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before and preemption.requested() == 0


def test_sigusr2_writes_the_stacks_of_a_process_whose_logging_dlscale_set_up_and_it_goes_on():
    code = ("import os, signal\nfrom dlscale.distributed import setup_logging\nsetup_logging()\n"
            "def waiting_here():\n    os.kill(os.getpid(), signal.SIGUSR2)\nwaiting_here()\nprint('went on')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "went on", done.stderr
    assert "Current thread" in done.stderr and "in waiting_here" in done.stderr, done.stderr


def test_a_run_that_stops_on_sigusr2_gets_it_instead_of_the_stack_dump(clean_state):
    from dlscale.distributed import STACKS_SIGNAL, setup_logging
    with own_logging():
        setup_logging()
    with preemption.listen(["SIGUSR2"]) as installed:
        assert installed
        os.kill(os.getpid(), STACKS_SIGNAL)
        assert preemption.requested() == STACKS_SIGNAL


def test_outside_the_main_thread_nothing_is_installed(clean_state):
    seen = []

    def body():
        with preemption.listen(["SIGTERM"]) as installed:
            seen.append(installed)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [False]


@pytest.mark.parametrize("value", ["SIGKILL", "TERM", "SIGNOPE"])
def test_an_uncatchable_or_unknown_signal_is_rejected_naming_the_key(cli, tmp_path, separable_data, value):
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "run",
                 f"--schedule.preempt_signals=[{value}]")
    assert result.code == 2 and "schedule.preempt_signals" in result.err and value in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["x", "5:SIGTERM:someone", "5:SIGTERM:launcher", "1:2:3:4", "5:SIGSTOP",
                                   "5:SIGKILL:launcher"])
def test_a_malformed_drill_is_rejected_naming_the_variable(value):
    with pytest.raises(ValueError, match=preemption.DRILL):
        preemption.drill_from_env({preemption.DRILL: value})


def test_a_drill_may_sigkill_a_rank_but_a_handler_cannot_listen_for_it():
    assert preemption.drill_from_env({preemption.DRILL: "7:SIGKILL:1"}) == preemption.Drill(7, signal.SIGKILL, "1")
    with pytest.raises(ValueError, match="SIGKILL"):
        preemption.signal_number("SIGKILL")


def test_train_help_documents_the_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"{CODE} stopped by a signal" in " ".join(capsys.readouterr().out.split())


# ---- launch/slurm.sbatch (with stand-ins for srun and scontrol) --------------------------------------------------

FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE_DIR/srun_args"
trap 'echo usr1 > "$FAKE_DIR/srun_signal"; exit 75' USR1
touch "$FAKE_DIR/started"
while :; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node1; else echo "$@" >> "$FAKE_DIR/scontrol"; fi
"""


@pytest.mark.parametrize("restart", ["0", "1"])
def test_sbatch_passes_the_time_limit_signal_to_the_ranks_requeues_and_resumes(tmp_path, deadline, restart):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sbatch = Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch"
    assert "#SBATCH --signal=B:USR1@" in sbatch.read_text() and "#SBATCH --requeue" in sbatch.read_text()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": restart}
    job = subprocess.Popen(["bash", str(sbatch), "DATA", "RUN", "--stage", "multitask"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with deadline(60):
        while not (tmp_path / "started").exists():
            time.sleep(0.01)
        job.send_signal(signal.SIGUSR1)   # what SLURM's --signal=B:USR1@180 does
        output, _ = job.communicate()
    assert job.returncode == CODE, output
    assert (tmp_path / "srun_signal").read_text().strip() == "usr1"
    resume = " --resume auto" if restart == "1" else ""   # a requeued start resumes, the first does not
    assert f"--data DATA --run-dir RUN{resume} --stage multitask" in (tmp_path / "srun_args").read_text()
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "42"]
