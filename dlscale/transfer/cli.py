"""`dlscale transfer` argument handling (a process entry point: it sets the process up and prints the table).

    dlscale transfer --encoder runs/ae --encoder runs/mae/encoder.pt --data data/sim_ii --out runs/transfer
    dlscale transfer --encoder runs/model_i_ae --data data/model_ii --out runs/i_to_ii --data.resize=150
    dlscale transfer --encoder runs/ae --data data/sim --out runs/reg --targets theta_E --labels-per-class 100,all
    dlscale transfer --encoder runs/ae --data data/sim --out runs/cls --tasks classification
    dlscale transfer --encoder runs/model_i_ae --data data/model_i --eval-data data/model_ii --out runs/x \
        --tasks regression,anomaly --methods probe,random
"""
from __future__ import annotations

import argparse

from dlscale.configtree import parse_override
from dlscale.distributed import local_ranks
from dlscale.transfer.runner import METHODS, TransferConfig
from dlscale.transfer.subsets import parse_sizes
from dlscale.transfer.tasks.superres import SuperresOptions
from dlscale.transfer.training import device_of


def transfer_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale transfer", description="Label efficiency of pretrained encoders: linear probe, fine-tuning, "
        "the same architecture from scratch and at random initialisation, on nested label subsets. Training config "
        "overrides (--section.key=value, e.g. --data.batch_size=32 --optim.lr=3e-4 --data.resize=150) set the "
        "fine-tune and scratch runs and the probes' data stream.")
    p.add_argument("--encoder", action="append", required=True, help="encoder.pt or run directory (repeatable)")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json + shards)")
    p.add_argument("--out", required=True, help="output directory (finished runs in it are reused)")
    p.add_argument("--labels-per-class", default="10,100,1000,all", help="N values, e.g. 10,100,1000,all")
    p.add_argument("--repeats", type=int, default=3, help="label subsets (seeds) per N")
    p.add_argument("--methods", default=",".join(METHODS), help=f"some of {','.join(METHODS)}")
    p.add_argument("--split", default="val", choices=["val", "test"], help="evaluation split")
    p.add_argument("--epochs", type=int, default=10, help="fine-tune and scratch epochs")
    p.add_argument("--min-batches-per-epoch", type=int, default=5, help="floor of an epoch on a small subset")
    p.add_argument("--targets", default="", help="regression targets from the sample metadata, e.g. theta_E")
    p.add_argument("--ranks", type=int, default=None, help="training ranks (default: every GPU, or 2 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap draws of each CI")
    p.add_argument("--tasks", default="all",
                   help="downstream tasks, e.g. classification,regression,anomaly,superres; default 'all': every "
                   "registered task the data allows (the others are skipped with a log line)")
    p.add_argument("--eval-data", default=None, help="score on this dataset's eval split (cross-dataset transfer; "
                   "frozen-encoder methods only)")
    p.add_argument("--regression-targets", default="",
                   help="regression task targets (default: log10_axion_mass and the lens parameters that vary)")
    p.add_argument("--superres-steps", type=int, default=SuperresOptions.steps,
                   help="Adam steps of each super-resolution fit")
    p.add_argument("--superres-eval", type=int, default=SuperresOptions.eval_images,
                   help="eval images the super-resolution task scores (a third of them per class)")
    p.add_argument("--finetune-encoder-lr-scale", type=float, default=1.0,
                   help="fine-tune runs: the pretrained encoder's learning rate as a multiple of the new head's")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; training config overrides look like --section.key=value")
    settings = dict(parse_override(r) for r in rest)   # argv ends here: the study gets typed settings
    cfg = TransferConfig(args.encoder, args.data, args.out, parse_sizes(args.labels_per_class), args.repeats,
                         [m.strip() for m in args.methods.split(",") if m.strip()], args.split, args.epochs,
                         [t.strip() for t in args.targets.split(",") if t.strip()],
                         args.ranks if args.ranks is not None else local_ranks(), args.seed, args.n_bootstrap,
                         args.min_batches_per_epoch, settings, _names(args.tasks), args.eval_data,
                         _names(args.regression_targets),
                         SuperresOptions(steps=args.superres_steps, eval_images=args.superres_eval),
                         args.finetune_encoder_lr_scale)
    from dlscale.train.deepspeed_setup import prepare_process
    prepare_process(device_of(settings))
    from dlscale.transfer.report import table
    from dlscale.transfer.report_tasks import task_sections
    from dlscale.transfer.runner import run_transfer
    results = run_transfer(cfg)
    first = table(results) if "classification" in [t["name"] for t in results["tasks"]] else []
    print("\n".join(["", *first, *task_sections(results), "", f"report: {cfg.out}/report.md"]), flush=True)
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
