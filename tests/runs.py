"""Helpers for tests that train: in the test process through `dlscale.cli.main`, or on 2 ranks under torchrun."""
import logging
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def own_logging():
    """`main` installs its own root log handlers; put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def two_rank_command(venv_bin: Path, stage: str, run_dir: Path, *args) -> list:
    """torchrun of launch/train.py on 2 local ranks."""
    return [venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage", stage,
            "--run-dir", run_dir, *args]


def whole_and_killed(launch, command, root: Path, kill_at_step: int, timeout_s: int):
    """An uninterrupted run (`command(root / "whole")`) and one whose rank 0 SIGKILLs itself after `kill_at_step`
    (the preemption drill), started together; returns the killed launch once both have ended."""
    from dlscale import preemption
    whole = launch(command(root / "whole"), root / "whole.log", root)
    killed = launch(command(root / "killed"), root / "killed.log", root,
                    env={preemption.DRILL: f"{kill_at_step}:SIGKILL"})
    assert killed.wait(timeout_s) != 0, killed.output()[-4000:]
    assert whole.wait(timeout_s) == 0, whole.output()[-4000:]
    return killed
