"""`dlscale quickstart` (`make demo`): the foundation story on simulated lensing data, end to end.

    simulated Model-II-like labelled data -> shards -> pretraining from the simulation stream (fresh lenses every
    step, >= 10x the labelled train split; reconstruction + SimCLR, no labels) -> supervised baseline -> multi-task
    (initialised from the pretrained encoder) -> label efficiency of the pretrained encoder (`dlscale transfer`:
    linear probe, fine-tuning and scratch at 10 / 100 labels per class, 3 label subsets each, random-init control)
    -> report.md (the goals met or not, tables with CIs, "what this shows"), roc.png, label_efficiency.png,
    TensorBoard runs

    dlscale quickstart --out runs/quickstart                 # CPU-sized: 64x64, the small CNN, about 7 min here
    dlscale quickstart --out runs/full --scale full          # GPUs: launch/full.yaml's settings (see README)
    dlscale quickstart --out /tmp/qs --scale tiny            # smoke test of every step (about a minute)

Finished steps (the dataset, each run, the transfer study) are reused when the command is run again, unless
`--force`. Each stage's config is built here as a typed config (`build_config`: the recipes below are dotted
settings with typed values, not command-line strings) and written to OUT/configs/<step>.yaml as the step's record;
the stage then runs in this process (`dlscale.train.runner.run(cfg)`) when there is one rank, or on every local
rank through `distributed.launch_local_ranks` (`torchrun ... -m dlscale.train --config OUT/configs/<step>.yaml`:
the process boundary is the one place the record's path becomes an argument). A stream step (`Step.from_stream`)
trains on `data.source=simulate` with epochs of as many fresh images as the labelled train split holds, so its
epochs count the multiple of that split it sees, and is evaluated on the labelled data.

How the CPU budget was chosen (2-core machine shared with other work, 2 ranks of one thread each; `make demo` must
fit in 10 minutes with the installation, 1.5-2.5 minutes on a fresh clone). Probe figures: macro AUC of the linear
probe at 100 labels per class (3 subsets, `dlscale transfer`), which machine load does not change; costs in CPU
seconds (wall time depends on the load).
- pretraining method, from the stream, 48k images, small CNN width 16, batch 32 per rank, 4,800 / 1,200 labelled
  images: autoencoder 0.893, MAE 0.834, BYOL 0.866, SimCLR with the library's default views 0.888. SimCLR's views
  decide: without blur 0.903 (blur hides the substructure the classes differ by), then flux scale 1.5: 0.919 (2.0:
  0.917); without flux scaling 0.816, without shifts 0.600; temperature 0.1 / 0.5: 0.901 / 0.892. A seed moves a
  run by up to 0.05: SimCLR at batch 64 gave 0.934 / 0.885 / 0.877 (seeds 0-2), reconstruction + SimCLR (multitask,
  recon weight 1000: MSE ~1e-3 against NT-Xent ~2) 0.936 / 0.912 / 0.918, steadier, so the combination; lr 1e-3
  0.905 / 0.921. Twice the images at width 16 did not help (SimCLR 0.919 at 96k, batch 32).
- encoder: the small CNN at width 24 (0.05M parameters). Reconstruction + SimCLR, 48k images: width 16 0.922 on
  average at 210 CPU-s, width 24 0.946 / 0.941 (seeds 0, 1) at 300 CPU-s, width 32 0.948 / 0.934 at 365 CPU-s;
  SimCLR alone at width 24 0.924 / 0.904. torchvision's ResNet18, the seed's baseline, costs ~10x the small CNN per
  sample here (bench/pretrain.py): too slow for this budget. The report names every row's encoder and size.
- labelled data: 2,000 per class, 40% for validation: 2,400 images narrow the CIs, and the stream's 10x of a 3,600
  image train split is 36k images; the demo pretrains 10 stream epochs, 36,480 images (on the 4,800 / 1,200 set,
  width 24, seed 0: 36k images gave 0.934, 48k 0.946; here 12 epochs, 43,776 images, gave 0.936).
- supervised and multi-task (reconstruction + classification, from the pretrained encoder) 8 epochs each, the
  same budget, so goal (c) compares like with like. At width 24: supervised 12 epochs 0.990, multi-task 10 and 12
  epochs 0.989 (width 16 needed 25 and 20 epochs for 0.989-0.994).
- the 10-minute bound: fresh-clone `make demo` with 12 pretraining and 12 / 12 supervised / multi-task epochs took
  9 min 46 s; with 12 and 10 / 10, 9 min 34 s and 10 min 29 s (the same machine, otherwise idle, an hour apart:
  install 2.1-2.6 min, pretraining 160-189 s, each training launch ~10 s of start-up), so the demo pretrains 10
  epochs and trains 8 / 8.
- label efficiency: 10 / 100 labels per class, 3 subsets each; the 1,000-label fine-tune / scratch pair, which
  showed no gain from pretraining, is left out. Fine-tune and scratch share 200 steps at lr 3e-3 (50 steps stayed at
  chance at 100 labels per class; lr 1e-3 cost scratch more: 0.762 against 0.838 at 10 labels). Batch 16 per rank
  instead of 32 takes a third less time (129 vs 190 s wall on the demo's encoder) and costs scratch more than
  fine-tuning: fine-tuned vs scratch 0.865 vs 0.823 at 10 labels (batch 32: 0.861 vs 0.838), 0.937 vs 0.920 at
  100 (batch 32: 0.951 vs 0.955). Those runs skipped the head refit (no probe features): with it (every run now
  refits its head to the eval-mode features of its labelled images) fine-tuned vs scratch gave 0.864 vs 0.840 at
  10 labels, CIs overlapping, and 0.957 vs 0.959 at 100, accuracies 0.86 instead of 0.67-0.76. A gentler fine-tune
  (`optim.encoder_lr_scale`) lost: 0.1 gave 0.835 / 0.924 (without the refit), 0.3 gave 0.852 / 0.957 (with it).
- downstream tasks: regression and anomaly detection; super-resolution is left out (its light head matched bicubic
  PSNR, for 30-40 s of the budget).
- ZeRO stage 0: a 0.05M-parameter model has no optimizer state worth sharding, and 6 supervised epochs on 2 ranks
  ran at 3,510 / 2,031 samples/s with stage 0 against 3,440 / 1,752 with stage 1 (two interleaved pairs on a loaded
  machine, width 16); bench/engine.py puts DeepSpeed's ZeRO 1/2 flat-buffer copies at +25-35% of a ResNet18 step on
  CPU.

`--scale full` (not run: no GPU was lent to this work) pretrains the same recipe from the mixture of the three
instruments (Model I, II and III presets, equal shares, brought to 150x150), simulated on the training GPU, for 20
stream epochs of the 72,000-image train split (1.4M images), ResNet18 with the 3x3 stem, bf16, batch 128: about an
hour of one H200 by a FLOP estimate (~280 GFLOP an image for three encoder passes and the decoder, at ~100-150
TFLOP/s), to be checked by the GPU check's shortened run.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
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
    from_stream: bool = False             # trains on fresh simulated images (data.source=simulate), each epoch as
    #                                       many as the labelled train split holds; evaluates on the labelled data


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
    val_fraction: float = 0.2             # of the simulated images: the validation split every metric is taken on


LAUNCH = Path(__file__).resolve().parents[1] / "launch"   # launch/ of a checkout (the GPU settings)
# Pretraining (measured in the module docstring): reconstruction + SimCLR on two lensing-safe views (dihedral
# symmetries, shifts of a few pixels, flux scaled about the background; no blur: it hides the substructure the
# classes differ by; no crop or zoom: they change the Einstein radius).
VIEWS = {"model.task_options.contrastive.views.blur_prob": 0.0,
         "model.task_options.contrastive.views.noise_level": 0.0,
         "model.task_options.contrastive.views.flux_scale": 1.5}
PRETRAIN = {"model.tasks": ["recon", "contrastive"], "loss.method": "fixed",
            "loss.fixed.weights": {"recon": 1000.0, "contrastive": 1.0},   # recon MSE ~1e-3, NT-Xent ~2
            "model.task_options.contrastive.method": "simclr", **VIEWS}
MIXTURE = {"data.simulator.mixture": {preset: {"preset": preset, "share": 1.0}
                                      for preset in ("model_i", "model_ii", "model_iii")}}
CPU_MODEL = {"model.encoder.name": "small", "model.encoder.width": 24, "data.num_workers": 0,
             "deepspeed.zero_stage": 0, "eval.probe_samples": 3600, "schedule.log_every": 50,
             "schedule.checkpoint_every": 2000}
SCALES = {
    "small": Scale("model_ii", 2000, 32, {**CPU_MODEL, "data.batch_size": 32, "optim.lr": 3e-3}, (
        Step("pretrain", "multitask", {**PRETRAIN, "schedule.epochs": 10, "optim.warmup_steps": 50},
             from_stream=True),
        Step("supervised", "supervised", {"schedule.epochs": 8, "optim.warmup_steps": 100}),
        Step("multitask", "multitask", {"schedule.epochs": 8, "optim.warmup_steps": 100, "loss.method": "fixed",
                                        "loss.fixed.weights": {"recon": 1.0, "classification": 1.0}},
             init_from="pretrain"),
    ), {"labels_per_class": [10, 100], "repeats": 3, "epochs": 10, "min_batches_per_epoch": 20,
        "n_bootstrap": 300, "overrides": {"data.batch_size": 16, "optim.lr": 3e-3, "data.num_workers": 0,
                                          "deepspeed.zero_stage": 0}},
        {"labels_per_class": [100], "n_bootstrap": 300, "overrides": {"data.batch_size": 64, "data.num_workers": 0}},
        val_fraction=0.4),
    # Smoke test of the whole path (what `make test` runs): the numbers mean nothing.
    "tiny": Scale("model_ii", 40, 32, {"model.encoder.name": "small", "model.encoder.width": 8,
                                       "data.batch_size": 16, "data.num_workers": 0, "eval.probe_samples": 60,
                                       "eval.n_bootstrap": 20, "schedule.log_every": 2}, (
        Step("pretrain", "multitask", {**PRETRAIN, "schedule.epochs": 10}, from_stream=True),
        Step("supervised", "supervised", {"schedule.epochs": 1}),
        Step("multitask", "multitask", {"schedule.epochs": 1}, init_from="pretrain"),
    ), {"labels_per_class": [2, 5], "repeats": 3, "epochs": 1, "n_bootstrap": 20,
        "overrides": {"data.batch_size": 8, "data.num_workers": 0}},
        {"labels_per_class": [5], "n_bootstrap": 20, "overrides": {"data.batch_size": 16, "data.num_workers": 0}}),
    # GPUs: the public datasets' size, ResNet18 with the 3x3 stem, bf16 (launch/full.yaml holds the same settings);
    # pretraining from the three instruments' mixture, simulated on the training GPU, brought to Model I's 150x150.
    "full": Scale("model_i", 30000, 512, {}, (
        Step("pretrain", "multitask", {**PRETRAIN, **MIXTURE, "schedule.epochs": 20}, from_stream=True),
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
    splits = {"train": 1 - scale.val_fraction, "val": scale.val_fraction}
    simulate(simulator_config(scale.preset), scale.n_per_class, data, splits, seed=seed,
             batch_size=scale.sim_batch)
    return data


def stream_batches(data: Path, batch_size: int, ranks: int) -> int:
    """Batches per rank that make one stream epoch as many fresh images as the labelled train split holds."""
    n_train = io.read_json(data / "manifest.json")["splits"]["train"]["samples"]
    return max(1, math.ceil(n_train / (batch_size * ranks)))


def step_config(step: Step, scale: Scale, data: Path, out: Path, seed: int):
    """The typed config of one step, checked; its record is written to OUT/configs/<step>.yaml. A stream step
    simulates `scale.preset` (unless its settings say otherwise) and is evaluated on the labelled data."""
    get_stage(step.stage)
    settings = {**scale.train, **step.settings}
    if step.from_stream:
        settings = {"data.source": "simulate", "data.simulator.preset": scale.preset, **settings}
    top = dict(stage=step.stage, data_dir=str(data), run_dir=str(out / step.name), seed=seed,
               init_from=str(out / step.init_from) if step.init_from else None)
    cfg = build_config(scale.base, settings, **top)
    if step.from_stream:
        batches = stream_batches(data, cfg.data.batch_size, local_ranks())
        cfg = build_config(scale.base, {**settings, "schedule.batches_per_epoch": batches}, **top)
    cfg.validate()
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


DOWNSTREAM_TASKS = ["regression", "anomaly"]   # superres left out: it trains 3 SR networks per subset (minutes)


def downstream(out: Path, data: Path, scale: Scale, seed: int, force: bool) -> dict | None:
    """The cheap downstream tasks on the pretrained encoder's frozen features (regression of log10 axion mass,
    anomaly detection at one N), timed: the report says what they cost."""
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
    p.add_argument("--epochs", type=int, help="epochs of every step (a stream step's: of as many images as the train "
                   "split) and of the transfer runs (default: the scale's)")
    a = p.parse_args(argv)
    for name in ("n_per_class", "epochs"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected >= 1")
    report = quickstart(a.out, a.scale, a.force, a.seed, a.n_per_class, a.epochs)
    print(f"\n{report.read_text()}", flush=True)
    return 0
