"""`dlscale train` / `launch/train.py` and `dlscale eval` argument handling (the same under every launcher)."""
from __future__ import annotations

import argparse

from dlscale.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale train", description="Train one stage. Any config key can be set as --section.key=value, "
        "e.g. --model.encoder.name=small --optim.lr=3e-4 --deepspeed.zero_stage=2.")
    p.add_argument("--stage", choices=["autoencoder", "supervised", "multitask"])
    p.add_argument("--data", help="dataset directory (manifest.json + shards)")
    p.add_argument("--run-dir", help="new run directory (or the one to resume)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--init-from", help="encoder.pt or a finished run directory to start the encoder from")
    p.add_argument("--resume", choices=["auto"], help="continue from the latest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    from dlscale.train.engine import run
    cfg = load_config(args.config, rest, stage=args.stage, data_dir=args.data, run_dir=args.run_dir,
                      init_from=args.init_from)
    run(cfg, resume=args.resume == "auto", local_rank=args.local_rank)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale eval", description="Evaluate a finished run on a dataset split; "
                                "writes metrics.json, scores_<split>.npz and the ROC figure into the run directory.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args(argv)
    from dlscale.train.engine import evaluate_run
    evaluate_run(args.run_dir, args.data, args.split, args.local_rank)
    return 0
