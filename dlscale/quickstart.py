"""`dlscale quickstart` (`make demo`): the foundation story on simulated lensing data, end to end.

    simulated Model-II-like labelled data -> shards -> pretraining from the simulation stream (fresh lenses every
    step, >= 10x the labelled train split; reconstruction + SimCLR, no labels) -> supervised baseline -> multi-task
    (initialised from the pretrained encoder) -> label efficiency of the pretrained encoder (`dlscale transfer`:
    linear probe, fine-tuning, LP-FT and scratch at 10 / 100 labels per class, 3 label subsets each, random-init
    control)
    -> report.md (the goals met or not, tables with CIs, "what this shows"), roc.png, label_efficiency.png,
    TensorBoard runs

    dlscale quickstart --out runs/quickstart                 # CPU-sized: 64x64, the small CNN, about 7 min here
    dlscale quickstart --out runs/full --scale full          # GPUs: the packaged `full` training recipe under it
    dlscale quickstart --out /tmp/qs --scale tiny            # smoke test of every step (about a minute)
    dlscale quickstart --scale small --print-config > qs.yaml; dlscale quickstart --config qs.yaml

Finished steps (the dataset, each run, the transfer study) are reused when the command is run again, unless
`--force`. The whole pipeline is one typed config (`quickstart_config.QuickstartConfig`: the packaged scales in
dlscale/recipes/quickstart.yaml, resolved), written to OUT/quickstart.yaml; each step's training config is written
to OUT/configs/<step>.yaml as the step's record; the stage then runs in this process (`dlscale.train.runner.run`)
when there is one rank, or on every local rank through `distributed.launch_local_ranks` (`torchrun ... -m
dlscale.train --config OUT/configs/<step>.yaml`: the process boundary is the one place the record's path becomes an
argument). A stream step (`StepConfig.from_stream`) trains on `data.source=simulate` with epochs of as many fresh
images as the labelled train split holds, so its epochs count the multiple of that split it sees, and is evaluated
on the labelled data.

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
import logging
import shutil
from pathlib import Path

from dlscale import io
from dlscale.configtree import dump_yaml, parse_with_overrides, plain, to_dict
from dlscale.distributed import launch_local_ranks, local_ranks
from dlscale.quickstart_config import QuickstartConfig, load_quickstart_config, print_quickstart_config, scale_names
from dlscale.quickstart_report import write_report
from dlscale.sim.config import load_config as simulator_config
from dlscale.sim.write import simulate
from dlscale.train.config import Config
from dlscale.train.deepspeed_setup import prepare_process
from dlscale.train.runner import run
from dlscale.transfer.config import TransferConfig
from dlscale.transfer.runner import run_transfer

log = logging.getLogger(__name__)


def is_done(run_dir: Path) -> bool:
    return (run_dir / "encoder.pt").is_file() and (run_dir / "metrics.json").is_file()


def make_data(cfg: QuickstartConfig, force: bool) -> Path:
    data = cfg.data_dir
    if (data / "manifest.json").is_file() and not force:
        log.info("reusing the simulated dataset in %s", data)
        return data
    shutil.rmtree(data, ignore_errors=True)
    simulate(simulator_config(cfg.preset), cfg.n_per_class, data, cfg.splits, seed=cfg.seed, batch_size=cfg.sim_batch)
    return data


def record_path(out: Path, name: str) -> Path:
    return out / "configs" / f"{name}.yaml"


def train_step(cfg: Config, record: Path) -> None:
    """One stage through the DeepSpeed engine: in this process with one rank, else on all local ranks (each reads
    the step's record, `record`, written here from `cfg`)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(record, dump_yaml(cfg))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    ranks = local_ranks()
    if ranks > 1:
        launch_local_ranks("dlscale.train", record, ranks)
        return
    prepare_process(cfg.device)
    run(cfg)


def study(cfg: TransferConfig | None, what: str, force: bool) -> dict | None:
    """A `dlscale transfer` study on the pretrained encoder: its results are reused when made with this very config
    (unless `force`), else it runs again from nothing (a changed `--transfer.repeats` is a new study)."""
    if cfg is None:
        return None
    where = Path(cfg.out)
    if (where / "results.json").is_file() and not force:
        done = io.read_json(where / "results.json")
        if done.get("config") == plain(to_dict(cfg)):
            log.info("reusing the %s study in %s", what, where)
            return done
        log.info("the %s study in %s was made with another config: running it again", what, where)
    shutil.rmtree(where, ignore_errors=True)
    return run_transfer(cfg)


def quickstart(cfg: QuickstartConfig, force: bool = False) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "quickstart.yaml", print_quickstart_config(cfg))
    make_data(cfg, force)
    for name, step in cfg.steps.items():
        if is_done(Path(step.train.run_dir)) and not force:
            log.info("reusing the finished %s run in %s", name, step.train.run_dir)
            continue
        log.info("training step %s (stage %s)", name, step.train.stage)
        train_step(step.train, record_path(out, name))
    transfer = study(cfg.transfer, "label-efficiency", force)
    return write_report(cfg, transfer, study(cfg.downstream, "downstream-task", force))


def quickstart_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale quickstart", description=__doc__.split("\n\n")[0] + " Any config "
                                "key can be set as --section.key=value (e.g. --steps.pretrain.train.schedule.epochs=4);"
                                " --print-config lists them.")
    p.add_argument("--out", help="output directory (default runs/quickstart)")
    p.add_argument("--scale", choices=scale_names(), help="packaged recipe (default small)")
    p.add_argument("--config", help="a config --print-config printed (instead of --scale)")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true", help="redo every step even if it finished before")
    p.add_argument("--n-per-class", type=int, help="simulated images per class (default: the scale's)")
    p.add_argument("--epochs", type=int, help="epochs of every step (a stream step's: of as many images as the train "
                   "split) and of the transfer runs (default: the scale's)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, each key's "
                   "meaning as a comment above it, and exit")
    args, rest = parse_with_overrides(p, argv)
    for name in ("n_per_class", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    given = {k: v for k, v in (("out", args.out), ("seed", args.seed), ("n_per_class", args.n_per_class),
                               ("epochs", args.epochs)) if v is not None}
    cfg = load_quickstart_config(args.scale, args.config, rest, given)
    if args.print_config:
        print(print_quickstart_config(cfg), end="")
        return 0
    report = quickstart(cfg, args.force)
    print(f"\n{report.read_text()}", flush=True)
    return 0
