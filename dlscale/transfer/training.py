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
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dlscale import io
from dlscale.configtree import from_dict, plain, to_dict
from dlscale.data.stream_config import StreamConfig
from dlscale.distributed import dist_info, launch_local_ranks, setup_logging
from dlscale.models.adapters import LoRAConfig
from dlscale.preemption import Preempted
from dlscale.train.config import Config, DataConfig, TargetDataConfig, fill_options, load_config, run_tasks
from dlscale.train.deepspeed_setup import prepare_process
from dlscale.train.runner import run as train
from dlscale.train.stages import stage_tasks
from dlscale.train.weighting.classic import FixedConfig
from dlscale.transfer.methods import METHOD_TABLE

log = logging.getLogger(__name__)
RECORD = "transfer_run.json"          # the planned run, written into its directory once it finished


@dataclass
class PlannedRun:
    """One training run of the study: its directory and its typed training config (stage, data, starting encoder,
    budget: everything). The plan and the finished run's record hold `record()`."""
    run_dir: str
    config: Config

    def record(self) -> dict:
        return {"run_dir": self.run_dir, "config": plain(to_dict(self.config))}

    @classmethod
    def from_record(cls, record: dict) -> "PlannedRun":
        return cls(record["run_dir"], from_dict(Config, record["config"]).validate())


def run_config(study, source, method: str, n_train: int, run_dir: Path, data_dir: str, seed: int,
               stage: str = "supervised", tasks: list[str] | None = None, targets: list[str] | None = None) -> Config:
    """The typed config of one run of trained `method` on `n_train` labelled images, as its `Method` declares
    (from `source`'s weights or from scratch; LP-FT's probe head, layer-wise decay, frozen stages, LoRA; the
    semi-supervised multi-task's unlabelled tasks on the study's whole train split as `data.target`): `source`'s
    architecture and normalisation; the study's data, optim and deepspeed sections; the shared budget: `epochs` x
    max(floor, N_train / (batch x ranks), min_steps / epochs) batches, warm-up a tenth; evaluation on the eval
    split without bootstrap. A run with a classification head has the probe read all `n_train` labelled
    images, so the head is refitted to their eval-mode features as in any training run
    (`classification.refit_head`; without it 2 of 3 label subsets ended with most no_sub images called cdm,
    accuracy 0.58-0.61 at macro AUC 0.93); a regression-only run, which may hold one class, has no probe, and its
    LP-FT head starts from the ridge probe fitted on its whole train split (the subset's images carrying the
    targets)."""
    cfg, m, budget = study.cfg, METHOD_TABLE[method], study.cfg.budget
    target, weights = TargetDataConfig(), None
    if m.semi_supervised:   # the downstream task's heads, and the unlabelled tasks on every train image
        tasks = [*stage_tasks(stage, tasks, len(targets or [])), *budget.unlabelled_tasks]
        stage, weights = "multitask", {task: 1.0 for task in tasks} | budget.unlabelled_tasks
        target = TargetDataConfig(source="shards", data_dir=cfg.data_dir, evaluate=False)
    base = load_config(None, None, stage=stage, data_dir=data_dir, run_dir=str(run_dir), seed=seed,
                       device=cfg.device, init_from=str(source.path) if m.pretrained else None)
    batches = max(budget.min_batches_per_epoch, n_train // (cfg.data.batch_size * cfg.ranks),
                  -(-budget.min_steps // budget.epochs))
    optim = dataclasses.replace(
        cfg.optim, encoder_lr_scale=budget.finetune_encoder_lr_scale if m.pretrained else cfg.optim.encoder_lr_scale,
        layer_decay=budget.layer_decay if m.layer_decay else cfg.optim.layer_decay,
        freeze_stages=budget.freeze_stages if m.freeze_stages else cfg.optim.freeze_stages,
        warmup_steps=max(1, budget.epochs * batches // 10))
    run = dataclasses.replace(
        base, data=DataConfig(**{**stream_fields(study.stream(source)), "targets": list(targets or []),
                                 "target": target}),
        model=dataclasses.replace(base.model, encoder=source.architecture, tasks=tasks, task_options={},
                                  lora=LoRAConfig(rank=budget.lora_rank) if m.adapters else base.model.lora),
        loss=dataclasses.replace(base.loss, method="fixed", fixed=FixedConfig(weights)) if tasks else base.loss,
        optim=optim,
        deepspeed=cfg.deepspeed,
        schedule=dataclasses.replace(base.schedule, epochs=cfg.budget.epochs, batches_per_epoch=batches,
                                     checkpoint_every=0, keep_checkpoints=1))
    probe = n_train if "classification" in run_tasks(run) else 0
    run = fill_options(dataclasses.replace(run, eval=dataclasses.replace(base.eval, split=cfg.split,
                                                                         probe_samples=probe, n_bootstrap=0)))
    if m.probe_head:   # every head that can start from its probe's fit (`probe_init`) does
        run.model.task_options.update({task: dataclasses.replace(options, probe_init=True)
                                       for task, options in run.model.task_options.items()
                                       if hasattr(options, "probe_init")})
    return run.validate()


def stream_fields(stream: StreamConfig) -> dict:
    """The stream section's values by field name (a training run's `data` is built from them)."""
    return {f.name: getattr(stream, f.name) for f in fields(StreamConfig)}


def budget_of(run: PlannedRun, ranks: int) -> dict:
    """Epochs, batches per epoch and batch of a planned run (what the report says of the budget)."""
    c = run.config
    return {"epochs": c.schedule.epochs, "batches_per_epoch": c.schedule.batches_per_epoch,
            "batch_size": c.data.batch_size, "ranks": ranks}


def scores_file(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"scores_{split}.npz"


def is_finished(run: PlannedRun, split: str) -> bool:
    """The run finished with the settings this plan gives it (a run of other settings is not reused)."""
    run_dir = Path(run.run_dir)
    if not _trained(run, split) or not (run_dir / RECORD).is_file():
        return False
    return io.read_json(run_dir / RECORD) == run.record()


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
    io.write_json(plan_path, {"runs": [r.record() for r in todo]})
    try:
        launch(todo, plan_path, split, ranks)
    finally:
        for run in todo:
            if _trained(run, split):
                io.write_json(Path(run.run_dir) / RECORD, run.record())


def launch(todo: list[PlannedRun], plan_path: Path, split: str, ranks: int) -> None:
    """One launch for the whole plan: this process (1 rank) or torchrun on `ranks` local processes."""
    if ranks <= 1:
        train_planned(todo)
        return
    code = launch_local_ranks("dlscale.transfer.training", plan_path, ranks, check=False)
    if code:
        unfinished = [r.run_dir for r in todo if not _trained(r, split)]
        raise RuntimeError(f"training the plan {plan_path} on {ranks} ranks exited with {code}; "
                           f"{len(unfinished)} run(s) unfinished, first {unfinished[:1]} (its log.txt says why)")


def train_planned(runs: list[PlannedRun], local_rank: int | None = None) -> None:
    """Train `runs` one after another in this process (every rank of a launch calls this with the same list)."""
    for i, planned in enumerate(runs, 1):
        cfg = planned.config
        if dist_info(local_rank).is_main:
            log.info("transfer run %d/%d: %s (%s%s)", i, len(runs), planned.run_dir, cfg.stage,
                     f", from {cfg.init_from}" if cfg.init_from else ", from scratch")
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
    setup_logging(dist_info(args.local_rank).rank)
    runs = [PlannedRun.from_record(r) for r in io.read_json(plan)["runs"]]
    devices = {r.config.device for r in runs}
    prepare_process(devices.pop() if len(devices) == 1 else "auto")
    try:
        train_planned(runs, args.local_rank)
    except Preempted as err:   # logged by the run; the unfinished run is started afresh next time
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
