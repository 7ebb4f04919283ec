"""`dlscale quickstart` (`make demo`): the foundation story on simulated lensing data, end to end.

    simulated Model-II-like data -> shards -> pretraining (self-supervised) -> supervised baseline -> multi-task
    (initialised from the pretrained encoder) -> label efficiency of the pretrained encoder (`dlscale transfer`:
    linear probe, fine-tuning and scratch at 10 / 100 / 1000 labels per class, random-init control)
    -> report.md (tables with CIs, "what this shows"), roc.png, label_efficiency.png, TensorBoard runs

    dlscale quickstart --out runs/quickstart                 # CPU-sized: 64x64, the small CNN, 4 min 11 s here
    dlscale quickstart --out runs/full --scale full          # GPUs: launch/full.yaml's settings (see README)
    dlscale quickstart --out /tmp/qs --scale tiny            # smoke test of every step (about a minute)

Finished steps (the dataset, each run, the transfer study) are reused when the command is run again, unless
`--force`. Each stage's config is built here as a typed config (`build_config`: the recipes below are dotted
settings with typed values, not command-line strings) and written to OUT/configs/<step>.yaml as the step's record;
the stage then runs in this process (`dlscale.train.runner.run(cfg)`) when there is one rank, or on every local
rank through `distributed.launch_local_ranks` (`torchrun ... -m dlscale.train --config OUT/configs/<step>.yaml`:
the process boundary is the one place the record's path becomes an argument).

How the CPU budget was chosen (2-core machine, 2 ranks of one thread each; `make demo` must fit in 10 minutes
with the installation, which takes ~2.5 minutes on a fresh clone):
- encoder: the small CNN (width 16, 0.02M parameters). torchvision's ResNet18, the seed's baseline, costs ~0.45 s
  per batch of 32 per core here (bench/pretrain.py: 61 vs 630 samples/s per CPU-second), too slow for this budget;
  the report names every row's encoder and parameter count.
- pretraining: the autoencoder (light decoder). On this data 6 epochs (55-87 s) gave a linear probe of macro AUC
  0.939, SimCLR 8 epochs (142 s) 0.933; bench/pretrain.py's matched 75 CPU-seconds on 1,000 images per class put
  autoencoder, MAE, SimCLR and BYOL within one standard error (0.954-0.963).
- supervised: 25 epochs with augmentation (macro AUC measured: 25 epochs 0.989, 30 epochs 0.988, 40 epochs 0.992).
- multi-task: reconstruction + classification, 20 epochs, from the pretrained encoder (25 epochs gave 0.990 in
  the run where 30 supervised epochs gave 0.988).
- label efficiency: 10 / 100 / 1000 labels per class, one subset each, fine-tune and scratch at least 200 steps
  (50 stayed at chance at 100 labels per class).
- ZeRO stage 0: a 0.02M-parameter model has no optimizer state worth sharding, and 6 supervised epochs on 2 ranks
  ran at 3,510 / 2,031 samples/s with stage 0 against 3,440 / 1,752 with stage 1 (two interleaved pairs on a loaded
  machine); bench/engine.py puts DeepSpeed's ZeRO 1/2 flat-buffer copies at +25-35% of a ResNet18 step on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dlscale import io
from dlscale.configtree import dump_yaml
from dlscale.distributed import launch_local_ranks, local_ranks
from dlscale.train.build import build_config
from dlscale.train.stages import get_stage

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Step:
    """One run of the pipeline: its directory name, the stage it trains and its own config settings."""
    name: str
    stage: str
    settings: dict = field(default_factory=dict)   # dotted training config keys -> values
    init_from: str | None = None          # the name of an earlier step whose encoder starts this one


@dataclass(frozen=True)
class Scale:
    preset: str
    n_per_class: int
    sim_batch: int
    train: dict                           # training config settings shared by every step (dotted keys)
    steps: tuple[Step, ...]
    transfer: dict = field(default_factory=dict)   # TransferConfig fields (labels_per_class, repeats, epochs, ...)
    downstream: dict = field(default_factory=dict)  # the cheap downstream tasks' TransferConfig fields ({}: none)
    base: Path | None = None              # a training config YAML under `train` (the GPU settings)


LAUNCH = Path(__file__).resolve().parents[1] / "launch"   # launch/ of a checkout (the GPU settings)
CPU_MODEL = {"model.encoder.name": "small", "model.encoder.width": 16, "data.num_workers": 0,
             "deepspeed.zero_stage": 0, "eval.probe_samples": 4800, "schedule.log_every": 50,
             "schedule.checkpoint_every": 2000}
SCALES = {
    "small": Scale("model_ii", 2000, 32, {**CPU_MODEL, "data.batch_size": 32, "optim.lr": 3e-3}, (
        Step("pretrain", "autoencoder", {"schedule.epochs": 6, "optim.warmup_steps": 50}),
        Step("supervised", "supervised", {"schedule.epochs": 25, "optim.warmup_steps": 100}),
        Step("multitask", "multitask", {"schedule.epochs": 20, "optim.warmup_steps": 100, "loss.method": "fixed",
                                        "loss.fixed.weights": {"recon": 1.0, "classification": 1.0}},
             init_from="pretrain"),
    ), {"labels_per_class": [10, 100, 1000], "repeats": 1, "epochs": 10, "min_batches_per_epoch": 20,
        "n_bootstrap": 300, "overrides": {"data.batch_size": 32, "optim.lr": 3e-3, "data.num_workers": 0,
                                          "deepspeed.zero_stage": 0}},
        {"labels_per_class": [100], "n_bootstrap": 300, "superres_steps": 200, "superres_eval": 512,
         "overrides": {"data.batch_size": 64, "data.num_workers": 0}}),
    # Smoke test of the whole path (what `make test` runs): the numbers mean nothing.
    "tiny": Scale("model_ii", 40, 32, {"model.encoder.name": "small", "model.encoder.width": 8,
                                       "data.batch_size": 16, "data.num_workers": 0, "eval.probe_samples": 60,
                                       "eval.n_bootstrap": 20, "schedule.log_every": 2}, (
        Step("pretrain", "autoencoder", {"schedule.epochs": 1}),
        Step("supervised", "supervised", {"schedule.epochs": 1}),
        Step("multitask", "multitask", {"schedule.epochs": 1}, init_from="pretrain"),
    ), {"labels_per_class": [2, 5], "repeats": 1, "epochs": 1, "n_bootstrap": 20,
        "overrides": {"data.batch_size": 8, "data.num_workers": 0}},
        {"labels_per_class": [5], "n_bootstrap": 20, "superres_steps": 5, "superres_eval": 16,
         "overrides": {"data.batch_size": 16, "data.num_workers": 0}}),
    # GPUs: the public datasets' size, ResNet18 with the 3x3 stem, bf16 (launch/full.yaml holds the same settings).
    "full": Scale("model_i", 30000, 512, {}, (
        Step("pretrain", "autoencoder", {"schedule.epochs": 30}),
        Step("supervised", "supervised", {"schedule.epochs": 30}),
        Step("multitask", "multitask", {"schedule.epochs": 30}, init_from="pretrain"),
    ), {"labels_per_class": [10, 100, 1000, "all"], "repeats": 3, "epochs": 20, "n_bootstrap": 1000,
        "overrides": {"data.batch_size": 128}}, base=LAUNCH / "full.yaml"),
}


def is_done(run_dir: Path) -> bool:
    return (run_dir / "encoder.pt").is_file() and (run_dir / "metrics.json").is_file()


def make_data(out: Path, scale: Scale, seed: int, force: bool) -> Path:
    from dlscale.sim.config import load_config as simulator_config
    from dlscale.sim.write import simulate
    data = out / "data"
    if (data / "manifest.json").is_file() and not force:
        log.info("reusing the simulated dataset in %s", data)
        return data
    shutil.rmtree(data, ignore_errors=True)
    simulate(simulator_config(scale.preset), scale.n_per_class, data, {"train": 0.8, "val": 0.2}, seed=seed,
             batch_size=scale.sim_batch)
    return data


def step_config(step: Step, scale: Scale, data: Path, out: Path, seed: int):
    """The typed config of one step, checked; its record is written to OUT/configs/<step>.yaml."""
    get_stage(step.stage)
    cfg = build_config(scale.base, {**scale.train, **step.settings}, stage=step.stage, data_dir=str(data),
                       run_dir=str(out / step.name), seed=seed,
                       init_from=str(out / step.init_from) if step.init_from else None).validate()
    record_path(out, step).parent.mkdir(parents=True, exist_ok=True)
    io.write_text(record_path(out, step), dump_yaml(cfg))
    return cfg


def record_path(out: Path, step: Step) -> Path:
    return out / "configs" / f"{step.name}.yaml"


def train_step(cfg, record: Path) -> None:
    """One stage through the DeepSpeed engine: in this process with one rank, else on all local ranks (each reads
    the step's record, `record`, which holds `cfg`)."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    ranks = local_ranks()
    if ranks > 1:
        launch_local_ranks("dlscale.train", record, ranks)
        return
    from dlscale.train.deepspeed_setup import prepare_process
    from dlscale.train.runner import run
    prepare_process(cfg.device)
    run(cfg)


def label_efficiency(out: Path, data: Path, scale: Scale, seed: int, force: bool) -> dict:
    """`dlscale transfer` on the pretrained encoder (its results are reused unless `force`)."""
    from dlscale.transfer.runner import TransferConfig, run_transfer
    where = out / "label_efficiency"
    if (where / "results.json").is_file() and not force:
        log.info("reusing the label-efficiency study in %s", where)
        return io.read_json(where / "results.json")
    shutil.rmtree(where, ignore_errors=True)
    cfg = TransferConfig([str(out / "pretrain")], str(data), str(where), seed=seed, ranks=local_ranks(),
                         methods=["probe", "finetune", "scratch", "random"], tasks=["classification"],
                         **scale.transfer)
    return run_transfer(cfg.validate())


DOWNSTREAM_TASKS = ["regression", "anomaly", "superres"]


def downstream(out: Path, data: Path, scale: Scale, seed: int, force: bool) -> dict | None:
    """The cheap downstream tasks on the pretrained encoder's frozen features (regression of log10 axion mass,
    anomaly detection, super-resolution at one N), timed: the report says what they cost."""
    import time
    from dlscale.transfer.runner import TransferConfig, run_transfer
    if not scale.downstream:
        return None
    where = out / "downstream"
    if (where / "results.json").is_file() and not force:
        log.info("reusing the downstream-task study in %s", where)
        return io.read_json(where / "results.json")
    shutil.rmtree(where, ignore_errors=True)
    start = time.perf_counter()
    cfg = TransferConfig([str(out / "pretrain")], str(data), str(where), seed=seed, repeats=1,
                         methods=["probe"], tasks=DOWNSTREAM_TASKS, **scale.downstream)
    results = run_transfer(cfg.validate())
    results["seconds"] = round(time.perf_counter() - start, 1)
    log.info("downstream tasks (%s) took %.1f s", ", ".join(DOWNSTREAM_TASKS), results["seconds"])
    io.write_json(where / "results.json", results)
    return results


def resized(scale: Scale, n_per_class: int | None, epochs: int | None) -> Scale:
    """`scale` with another data size and / or every step's (and the transfer study's) epochs (a shortened run)."""
    if n_per_class is not None:
        scale = dataclasses.replace(scale, n_per_class=n_per_class)
    if epochs is not None:
        steps = tuple(dataclasses.replace(s, settings={**s.settings, "schedule.epochs": epochs})
                      for s in scale.steps)
        scale = dataclasses.replace(scale, steps=steps, transfer={**scale.transfer, "epochs": epochs})
    return scale


def quickstart(out: Path, scale_name: str = "small", force: bool = False, seed: int = 0,
               n_per_class: int | None = None, epochs: int | None = None) -> Path:
    from dlscale.quickstart_report import write_report
    scale = resized(SCALES[scale_name], n_per_class, epochs)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, scale, seed, force)
    for step in scale.steps:
        run_dir = out / step.name
        if is_done(run_dir) and not force:
            log.info("reusing the finished %s run in %s", step.name, run_dir)
            continue
        log.info("training step %s (stage %s)", step.name, step.stage)
        train_step(step_config(step, scale, data, out, seed), record_path(out, step))
    transfer = label_efficiency(out, data, scale, seed, force)
    return write_report(out, data, scale, transfer, downstream(out, data, scale, seed, force))


def quickstart_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo every step even if it finished before")
    p.add_argument("--n-per-class", type=int, help="simulated images per class (default: the scale's)")
    p.add_argument("--epochs", type=int, help="epochs of every step and of the transfer runs (default: the scale's)")
    a = p.parse_args(argv)
    for name in ("n_per_class", "epochs"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected >= 1")
    report = quickstart(a.out, a.scale, a.force, a.seed, a.n_per_class, a.epochs)
    print(f"\n{report.read_text()}", flush=True)
    return 0
