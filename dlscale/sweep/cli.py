"""`dlscale tune`: search the multi-task loss weighting (or any training setting) with Ray Tune.

    dlscale tune --data shards/ --out sweeps/weighting                                  # laptop: local Ray, all CPUs
    dlscale tune --data shards/ --out sweeps/w --address auto --gpus-per-trial 1 --trials 48      # a Ray cluster
    dlscale tune --data shards/ --out sweeps/w4 --address auto --workers-per-trial 4 --gpus-per-trial 4  # 4-rank trials
    dlscale tune --out sweeps/weighting --resume                                        # after Ctrl-C or a crash
    python tune/sweep.py ...                                                            # the same

OUT is the Tune experiment directory: one `trial_<id>/` per trial whose `run/` is that trial's run directory
(checkpoints, TensorBoard, metrics.json), `sweep.yaml` (the sweep as run; `--resume` reads it) and, once every trial
has ended, `results.md` / `results.csv`, `pareto.png` and `best_config.yaml` (`dlscale train --config
OUT/best_config.yaml` retrains the winner into OUT/best_run). `tensorboard --logdir OUT` compares the trials' curves
and hparams side by side. On a multi-node cluster OUT must be storage that every node sees at the same path (NFS):
trials write their DeepSpeed checkpoints there.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from dlscale import io
from dlscale.configtree import dump_yaml, parse_with_overrides
from dlscale.sweep.execution import Resources, node_resources, ray_cluster, run_sweep
from dlscale.sweep.results import outcomes, trials_left, write_results
from dlscale.sweep.spec import DEFAULT_SWEEP_FILE, SWEEP_RECORD, load_sweep, print_sweep
from dlscale.train.config import Config
from dlscale.train.data import load_dataset


# ---- command line -------------------------------------------------------------------------------------------------
def tune_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale tune", description="Search the multi-task loss weighting (and any training setting) with Ray "
        "Tune. Extra --section.key=value set the base training config, --sweep.key=value the sweep settings.")
    p.add_argument("--data", help="dataset directory (manifest.json + shards)")
    p.add_argument("--out", type=Path, help="sweep directory (new, or the one to --resume)")
    p.add_argument("--config", type=Path, help=f"sweep file (default {DEFAULT_SWEEP_FILE})")
    p.add_argument("--trials", type=int, help="configurations to sample (default: sweep.trials of the file)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DeepSpeed ranks per trial (Ray Train)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, shared by its workers")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, shared by its workers (default: 1 each)")
    p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.add_argument("--print-config", action="store_true", help="print the checked sweep (settings, space, base "
                   "training config) as YAML, each key's meaning as a comment above it, and exit")
    args, rest = parse_with_overrides(p, argv)
    if args.print_config:
        recorded = args.resume and args.out is not None
        path = args.out.resolve() / SWEEP_RECORD if recorded else args.config or DEFAULT_SWEEP_FILE
        print(print_sweep(load_sweep(path, rest, args.data, args.trials, complete=False)), end="")
        return 0
    if args.out is None:
        p.error("--out is required: the sweep directory (new, or the one to --resume)")
    out_dir = args.out.resolve()
    resources = Resources(args.workers_per_trial, args.cpus_per_trial, args.gpus_per_trial)
    if args.resume:
        if args.config or args.trials or rest:
            raise ValueError(f"--resume continues the sweep as recorded in {out_dir / SWEEP_RECORD}; drop --config, "
                             "--trials and overrides")
        if not (out_dir / SWEEP_RECORD).is_file():
            raise FileNotFoundError(f"{out_dir}: no {SWEEP_RECORD}, nothing to resume")
        spec = load_sweep(out_dir / SWEEP_RECORD)
        if args.data and Path(args.data).resolve() != Path(spec.base.data_dir):
            raise ValueError(f"--data {args.data}: this sweep trains on {spec.base.data_dir}")
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"sweep directory {out_dir} exists; pass --resume to continue its sweep, or choose a new "
                             "--out")
        spec = load_sweep(args.config or DEFAULT_SWEEP_FILE, rest, args.data, args.trials)
    _check_dataset(spec.base)
    # Ray Train frees the workers of a trial that ASHA stopped through Ray's state API, which the dashboard serves
    state_api = resources.workers > 1 and spec.settings.scheduler == "asha"
    if state_api and args.address is None:
        _check_state_api()
    with ray_cluster(args.address, dashboard=state_api) as cluster:
        resources.concurrency(cluster, node_resources())   # a trial that cannot fit fails here, before any starts
        if not args.resume:
            out_dir.mkdir(parents=True, exist_ok=True)
            io.write_text(out_dir / SWEEP_RECORD, dump_yaml(spec.to_tree()))
        from ray import tune
        if args.resume and not tune.Tuner.can_restore(str(out_dir)):
            raise FileNotFoundError(f"{out_dir}: no Tune experiment state to resume; start the sweep again")
        results = run_sweep(spec, out_dir, resources, cluster, args.resume)
    left = trials_left(spec, out_dir)
    if left:
        print(f"sweep interrupted with {left} trial(s) to go; continue it with\n  dlscale tune --out {out_dir} "
              "--resume", flush=True)
        return 130
    trials = outcomes(results, spec.base.schedule.epochs)
    print(write_results(trials, spec, out_dir), flush=True)
    return 0 if any(t.status != "failed" for t in trials) else 1


def _check_state_api() -> None:
    try:
        importlib.import_module("ray.dashboard.modules.state.state_head")
    except ImportError:
        raise ValueError("ASHA with --workers-per-trial > 1 needs Ray's state API to free the workers of the trials "
                         "it stops: pip install 'ray[default]' (or use --sweep.scheduler=fifo)") from None


def _check_dataset(cfg: Config) -> None:
    """The dataset fits the model (trials training from the simulator without one simulate their own eval set)."""
    if cfg.data_dir:
        load_dataset(cfg)
