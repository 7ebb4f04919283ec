"""`dlscale transfer` argument handling (a process entry point: it sets the process up and prints the report).

    dlscale transfer --encoder runs/ae --encoder runs/mae/encoder.pt --data data/sim_ii --out runs/transfer
    dlscale transfer --encoder runs/model_i_ae --data data/model_ii --out runs/i_to_ii --data.resize=150
    dlscale transfer --encoder runs/ae --data data/sim --out runs/cls --tasks classification \
        --task_options.classification.targets=[theta_E]
    dlscale transfer --encoder runs/model_i_ae --data data/model_i --eval-data data/model_ii --out runs/x \
        --tasks regression,anomaly --methods probe,random
    dlscale transfer --print-config > transfer.yaml; dlscale transfer --config transfer.yaml --encoder runs/ae ...

Every key of the study's config (`dlscale.transfer.config.TransferConfig`) can be set as `--section.key=value` or in
a YAML file; the flags below are shorthands for the common ones.
"""
from __future__ import annotations

import argparse

from dlscale.configtree import parse_with_overrides, set_dotted
from dlscale.train.deepspeed_setup import prepare_process
from dlscale.transfer.config import load_transfer_config, print_transfer_config
from dlscale.transfer.methods import METHODS
from dlscale.transfer.report import task_sections
from dlscale.transfer.runner import run_transfer
from dlscale.transfer.subsets import parse_sizes

FLAGS = {   # flag -> (config key, how the flag's text becomes the key's value)
    "--encoder": ("encoders", list),
    "--data": ("data_dir", str),
    "--out": ("out", str),
    "--eval-data": ("eval_data", str),
    "--labels-per-class": ("labels_per_class", parse_sizes),
    "--repeats": ("repeats", int),
    "--methods": ("methods", lambda text: _names(text)),
    "--split": ("split", str),
    "--tasks": ("tasks", lambda text: _names(text)),
    "--ranks": ("ranks", int),
    "--seed": ("seed", int),
    "--n-bootstrap": ("n_bootstrap", int),
    "--epochs": ("budget.epochs", int),
}


def transfer_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale transfer", description="Label efficiency of pretrained encoders on downstream tasks: linear "
        "probe, fine-tuning, the same architecture from scratch and at random initialisation, on nested label "
        "subsets. Any config key can be set as --section.key=value (e.g. --data.batch_size=32 --optim.lr=3e-4 "
        "--data.resize=150 --task_options.superres.steps=100); --print-config lists them and what each means.")
    p.add_argument("--encoder", action="append", help="encoder.pt, encoder.safetensors or run directory "
                   "(repeatable) = encoders")
    p.add_argument("--data", help="dataset directory (manifest.json + shards) = data_dir")
    p.add_argument("--out", help="output directory (finished runs in it are reused) = out")
    p.add_argument("--eval-data", help="score on this dataset's eval split (cross-dataset transfer; frozen-encoder "
                   "methods only) = eval_data")
    p.add_argument("--labels-per-class", help="N values, e.g. 10,100,1000,all = labels_per_class")
    p.add_argument("--repeats", help="label subsets (seeds) per N = repeats")
    p.add_argument("--methods", help=f"some of {','.join(METHODS)} = methods")
    p.add_argument("--split", choices=["val", "test"], help="evaluation split = split")
    p.add_argument("--tasks", help="downstream tasks, e.g. classification,regression,anomaly,superres; all: every "
                   "registered task the data allows = tasks")
    p.add_argument("--ranks", help="training ranks (0: every GPU, or 2 on CPU) = ranks")
    p.add_argument("--seed", help="= seed")
    p.add_argument("--n-bootstrap", help="bootstrap draws of each CI = n_bootstrap")
    p.add_argument("--epochs", help="fine-tune and scratch epochs = budget.epochs")
    p.add_argument("--config", help="YAML config file (what --print-config prints)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, each key's "
                   "meaning as a comment above it, and exit")
    args, rest = parse_with_overrides(p, argv)
    flags: dict = {}
    for flag, (key, convert) in FLAGS.items():
        text = getattr(args, flag[2:].replace("-", "_"))
        if text is not None:
            set_dotted(flags, key, convert(text))
    cfg = load_transfer_config(args.config, rest, flags, complete=not args.print_config)
    if args.print_config:
        print(print_transfer_config(cfg), end="")
        return 0
    prepare_process(cfg.device)
    results = run_transfer(cfg)
    print("\n".join(["", *task_sections(results), "", f"report: {cfg.out}/report.md"]), flush=True)
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
