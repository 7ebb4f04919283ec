"""`dlscale` console script: one subcommand per user task.

    dlscale pack SRC --out DIR            DeepLense .npy folders -> WebDataset shards + manifest
    dlscale shards verify DIR | info DIR  check checksums and counts / print a summary
    dlscale simulate --preset model_ii    built-in lensing simulator -> shards
    dlscale train --stage S --data DIR --run-dir RUN [--section.key=value ...] [--resume auto]
    dlscale eval --run-dir RUN [--data DIR] [--split val|test]
    dlscale predict --run RUN|ENCODER --data SRC --out OUT [--split S] [--embeddings] [--resize] [--skip-bad]
                                                           new images -> OUT/predictions.csv (+ embeddings.npy)
    dlscale adapt-bn --run-dir RUN --target-data DIR --out RUN2   BatchNorm statistics of an unlabelled target (AdaBN)
    dlscale quickstart [--out runs/quickstart] [--scale small|full] [--force]   the whole pipeline, with a report
    dlscale transfer --encoder A [--encoder B ...] --data DIR --out OUT [--labels-per-class 10,100,1000,all]
                     [--repeats R] [--methods probe,finetune,scratch,random] [--epochs E]   label efficiency study
    dlscale tune --data DIR --out DIR [--config SWEEP.yaml] [--trials N] [--workers-per-trial K]
                 [--gpus-per-trial G] [--cpus-per-trial C] [--address auto|HOST:PORT] [--resume]   Ray Tune sweep
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dlscale.distributed import setup_logging
from dlscale.preemption import Preempted

log = logging.getLogger("dlscale")


def pack_main(argv: list[str]) -> int:
    from dlscale.data.pack import PackConfig, pack
    from dlscale.data.shards import summary_table
    p = argparse.ArgumentParser(prog="dlscale pack", description="Pack a DeepLense .npy folder into shards.")
    p.add_argument("src", type=Path, help="DeepLense folder (dataset/, Model_X + Model_X_test, or Model IV train/val)")
    p.add_argument("--out", type=Path, required=True, help="new dataset directory")
    p.add_argument("--layout", default="auto", choices=["auto", "common-test", "model", "model-iv"])
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation cut of train when the source has none")
    p.add_argument("--shard-size", type=int, default=2048, help="samples per shard")
    p.add_argument("--samples-per-record", type=int, default=256, help="1 = classic one-sample WebDataset records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="reader processes")
    p.add_argument("--skip-bad", action="store_true", help="leave bad files out (listed in rejected.json)")
    a = p.parse_args(argv)
    manifest = pack(PackConfig(a.src, a.out, a.layout, a.val_fraction, a.shard_size, a.samples_per_record, a.seed,
                               a.workers, a.skip_bad))
    print(f"wrote {a.out} ({manifest['rejected']} files rejected)\n{summary_table(manifest)}")
    return 0


def shards_main(argv: list[str]) -> int:
    from dlscale.data.shards import info_text, verify
    p = argparse.ArgumentParser(prog="dlscale shards", description="Inspect a shard dataset.")
    p.add_argument("action", choices=["verify", "info"])
    p.add_argument("data_dir", type=Path)
    a = p.parse_args(argv)
    if a.action == "info":
        print(info_text(a.data_dir))
        return 0
    problems = verify(a.data_dir)
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{a.data_dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def simulate_main(argv: list[str]) -> int:
    from dlscale.sim import simulate_main as run
    return run(argv)


def train_main(argv: list[str]) -> int:
    from dlscale.train import main as run
    return run(argv)


def eval_main(argv: list[str]) -> int:
    from dlscale.train import eval_main as run
    return run(argv)


def predict_main(argv: list[str]) -> int:
    from dlscale.predict import predict_main as run
    return run(argv)


def adapt_bn_main(argv: list[str]) -> int:
    from dlscale.train.adabn import adapt_bn_main as run
    return run(argv)


def quickstart_main(argv: list[str]) -> int:
    from dlscale.quickstart import quickstart_main as run
    return run(argv)


def transfer_main(argv: list[str]) -> int:
    from dlscale.transfer.cli import transfer_main as run
    return run(argv)


def tune_main(argv: list[str]) -> int:
    from dlscale.sweep import tune_main as run
    return run(argv)


COMMANDS = {"pack": pack_main, "shards": shards_main, "simulate": simulate_main, "train": train_main,
            "eval": eval_main, "predict": predict_main, "adapt-bn": adapt_bn_main, "quickstart": quickstart_main,
            "transfer": transfer_main, "tune": tune_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except Preempted as err:   # a training run inside the command (transfer, quickstart) stopped on a signal
        log.error("%s", err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
