"""`dlscale train` / `launch/train.py` and `dlscale eval` argument handling (the same under every launcher).

These are process entry points: they set the process up (DeepSpeed accelerator, logging) and print the results
table; the library below them only logs.
"""
from __future__ import annotations

import argparse

from dlscale.configtree import parse_with_overrides
from dlscale.data.classes import CLASSES, SPLITS
from dlscale.distributed import dist_info, setup_logging
from dlscale.preemption import PREEMPTED_EXIT_CODE, Preempted
from dlscale.recipes import config_path
from dlscale.summaries import metrics_table
from dlscale.train.config import load_config, print_config
from dlscale.train.deepspeed_setup import prepare_process
from dlscale.train.evaluation import evaluate_run
from dlscale.train.runner import run
from dlscale.train.sources.two_stream import TARGET_PREFIX
from dlscale.train.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale train", description="Train one stage. Any config key can be set as --section.key=value, "
        "e.g. --model.encoder.name=small --optim.lr=3e-4 --deepspeed.zero_stage=2 "
        "--model.task_options.mae.mask_ratio=0.6; --print-config lists them (with the chosen stage's task options) "
        "and what each means.",
        epilog=f"Exit codes: 0 finished; 2 bad input; {PREEMPTED_EXIT_CODE} stopped by a signal of "
        "schedule.preempt_signals (default SIGTERM, SIGUSR1: SLURM, Kubernetes, spot instances) after every rank "
        "finished its step and a complete checkpoint was written: run the same command with --resume auto to "
        "continue.")
    p.add_argument("--stage", choices=list(STAGES), help="; ".join(f"{k}: {v.description}" for k, v in
                                                                 STAGES.items()))
    p.add_argument("--data", help="dataset directory (manifest.json + shards)")
    p.add_argument("--target-data", help="stage adapt: the unlabelled target domain's dataset directory (its train "
                   "split adapts, its val split scores: target/val/...); = --data.target.data_dir=DIR")
    p.add_argument("--run-dir", help="new run directory (or the one to resume)")
    p.add_argument("--config", help="YAML config file, or a packaged training recipe by name (full: the GPU "
                   "settings)")
    p.add_argument("--init-from", help="encoder.pt, a finished run directory or an encoder state dict to start from")
    p.add_argument("--resume", choices=["auto"], help="continue from the latest complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, "
                   "each key's meaning as a comment above it (the chosen stage's task options; with "
                   "--data.source=simulate every simulator key), and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args, rest = parse_with_overrides(p, argv)
    if args.target_data:
        rest = [*rest, f"--data.target.data_dir={args.target_data}"]
    cfg = load_config(config_path(args.config) if args.config else None, rest, complete=not args.print_config,
                      stage=args.stage, data_dir=args.data, run_dir=args.run_dir, init_from=args.init_from)
    if args.print_config:
        print(print_config(cfg), end="")
        return 0
    info = dist_info(args.local_rank)
    setup_logging(info.rank)
    prepare_process(cfg.device)
    try:
        metrics = run(cfg, resume=args.resume == "auto", local_rank=args.local_rank)
    except Preempted:   # the run has logged which signal stopped it where, and how to resume
        return PREEMPTED_EXIT_CODE
    if info.is_main:
        target = f"{TARGET_PREFIX}{cfg.eval.split}"
        on_target = (f"\ntarget domain ({cfg.data.target.data_dir or cfg.data.target.simulator.preset}):\n"
                     f"{metrics_table(metrics, CLASSES, target, probe=TARGET_PREFIX + 'probe')}"
                     if f"{target}/n_samples" in metrics else "")
        print(f"\n{cfg.stage} finished: {cfg.run_dir}\n{metrics_table(metrics, CLASSES, cfg.eval.split)}{on_target}\n"
              f"  encoder          {cfg.run_dir}/encoder.pt", flush=True)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale eval", description="Evaluate a finished run on a dataset split. On the "
                                "run's own data it writes metrics.json, scores_<split>.npz and the ROC figure into "
                                "the run directory; on other data (--data) into RUN/eval/<dataset>-<split>/.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=list(SPLITS))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args(argv)
    info = dist_info(args.local_rank)
    setup_logging(info.rank)
    prepare_process()
    metrics, out_dir = evaluate_run(args.run_dir, args.data, args.split, args.local_rank)
    if info.is_main:
        print(f"{args.run_dir} on {args.data or 'its own data'} [{args.split}] -> {out_dir}\n"
              f"{metrics_table(metrics, CLASSES, args.split)}", flush=True)
    return 0
