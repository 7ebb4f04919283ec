"""Fine-tuning and from-scratch runs of a transfer study, through the DeepSpeed engine (`dlscale.train.run`).

Every run of the study goes into one plan (OUT/plan.json: each run's typed settings, the record the ranks read); the
plan is trained by one launch: on all local ranks through `distributed.launch_local_ranks` (`python -m
dlscale.transfer.training --config PLAN`, each rank going through the runs in order; the process group outlives each
run), or in this process with one rank. One launch, not one per run: process and
DeepSpeed start-up cost more than a small run's training. Finished runs (model.pt, metrics.json, the scores of the
eval split, and transfer_run.json: the planned run, written once it finished) are kept and skipped when the command
is repeated; a run directory left unfinished, or planned with other settings, is removed first, so the engine starts
it afresh.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlscale import io

log = logging.getLogger(__name__)
RECORD = "transfer_run.json"          # the planned run, written into its directory once it finished


@dataclass
class PlannedRun:
    """One `dlscale train` run: its stage, data, directory, starting encoder and training config settings (dotted
    keys with typed values, JSON-serialisable: the plan and the finished run's record hold them)."""
    run_dir: str
    data_dir: str
    stage: str
    init_from: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def config(self):
        """The run's typed training config."""
        from dlscale.train.build import build_config
        return build_config(None, self.settings, stage=self.stage, data_dir=self.data_dir, run_dir=self.run_dir,
                            init_from=self.init_from)


def device_of(settings: dict[str, Any]) -> str:
    """The `device` a run's (or a study's) training config settings ask for (auto when not set)."""
    return str(settings.get("device", "auto"))


def scores_file(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"scores_{split}.npz"


def is_finished(run: PlannedRun, split: str) -> bool:
    """The run finished with the settings this plan gives it (a run of other settings is not reused)."""
    run_dir = Path(run.run_dir)
    if not _trained(run, split) or not (run_dir / RECORD).is_file():
        return False
    return io.read_json(run_dir / RECORD) == dataclasses.asdict(run)


def _trained(run: PlannedRun, split: str) -> bool:
    run_dir = Path(run.run_dir)
    return all(p.is_file() for p in (run_dir / "model.pt", run_dir / "metrics.json", scores_file(run_dir, split)))


def train_all(runs: list[PlannedRun], plan_path: Path, split: str, ranks: int) -> None:
    """Train the runs of the plan not finished yet, on `ranks` local ranks (1: in this process)."""
    todo = [r for r in runs if not is_finished(r, split)]
    log.info("%d of %d fine-tune/scratch runs finished before; %d to train on %d rank(s)", len(runs) - len(todo),
             len(runs), len(todo), ranks)
    if not todo:
        return
    for run in todo:
        if Path(run.run_dir).exists():
            log.warning("removing %s: a run started before that never finished, or of other settings", run.run_dir)
            shutil.rmtree(run.run_dir)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(plan_path, {"runs": [dataclasses.asdict(r) for r in todo]})
    try:
        launch(todo, plan_path, split, ranks)
    finally:
        for run in todo:
            if _trained(run, split):
                io.write_json(Path(run.run_dir) / RECORD, dataclasses.asdict(run))


def launch(todo: list[PlannedRun], plan_path: Path, split: str, ranks: int) -> None:
    """One launch for the whole plan: this process (1 rank) or torchrun on `ranks` local processes."""
    if ranks <= 1:
        train_planned(todo)
        return
    from dlscale.distributed import launch_local_ranks
    code = launch_local_ranks("dlscale.transfer.training", plan_path, ranks, check=False)
    if code:
        unfinished = [r.run_dir for r in todo if not _trained(r, split)]
        raise RuntimeError(f"training the plan {plan_path} on {ranks} ranks exited with {code}; "
                           f"{len(unfinished)} run(s) unfinished, first {unfinished[:1]} (its log.txt says why)")


def train_planned(runs: list[PlannedRun], local_rank: int | None = None) -> None:
    """Train `runs` one after another in this process (every rank of a launch calls this with the same list)."""
    from dlscale.distributed import dist_info
    from dlscale.train.runner import run as train
    for i, planned in enumerate(runs, 1):
        cfg = planned.config()
        if dist_info(local_rank).is_main:
            log.info("transfer run %d/%d: %s (%s%s)", i, len(runs), planned.run_dir, planned.stage,
                     f", from {planned.init_from}" if planned.init_from else ", from scratch")
        train(cfg, local_rank=local_rank)


def read_scores(run: PlannedRun, split: str) -> dict[str, np.ndarray]:
    """ids, labels, probs (and regression, target) of a finished run on the eval split, in id order."""
    path = scores_file(run.run_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run did not finish (see {Path(run.run_dir) / 'log.txt'})")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank of a torchrun launch: `python -m dlscale.transfer.training --config PLAN`."""
    p = argparse.ArgumentParser(prog="python -m dlscale.transfer.training")
    p.add_argument("plan", type=Path, nargs="?", help="the plan (OUT/plan.json); or --config")
    p.add_argument("--config", type=Path, help="the plan (OUT/plan.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args(argv)
    plan = args.config or args.plan
    if plan is None:
        p.error("the plan: give --config PLAN")
    from dlscale.distributed import dist_info, setup_logging
    from dlscale.train.deepspeed_setup import prepare_process
    setup_logging(dist_info(args.local_rank).rank)
    runs = [PlannedRun(**r) for r in io.read_json(plan)["runs"]]
    devices = {device_of(r.settings) for r in runs}
    prepare_process(devices.pop() if len(devices) == 1 else "auto")
    from dlscale.preemption import Preempted
    try:
        train_planned(runs, args.local_rank)
    except Preempted as err:   # logged by the run; the unfinished run is started afresh next time
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
