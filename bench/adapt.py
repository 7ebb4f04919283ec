"""Domain adaptation study: how much of the gap between a source-only classifier and a target-supervised one each
adaptation recipe closes on simulated instrument shifts, and which recipe a user would pick without target labels
(CPU-sized: 64x64, the small CNN, one rank).

    python bench/adapt.py [--shifts ii_to_iii,noiseless_to_noisy] [--batches 600] [--eval-per-class 400]
                          [--methods ...] [--heads coral,em] [--self-train-rounds 3]
                          [--work-dir runs/bench_adapt]                                          # prints JSON

Per shift (source: Model-II-like, fresh simulated lenses every step; batches of 32):
  source_only        stage supervised on the source simulator, `--batches` batches
  adabn              source_only with every BatchNorm re-estimated on the target's unlabelled images (no training)
  mmd, sinkhorn, dann_sn, mmd_selftrain
                     stage adapt from scratch, `--batches` batches (dann_sn: spectrally normalised domain classifier;
                     mmd_selftrain: MMD and AdaMatch self-training together)
  selftrain, adda, adda_selftrain
                     stage adapt started from source_only's encoder (`init_from`), `--batches` / 2 batches (AdaMatch
                     pseudo-labels; ADDA with the encoder at 0.1x the discriminator's learning rate; both);
                     `_sep`: the same with `model.domain_batchnorm=separate` (each domain normalised alone)
  shot, mmd_adabn, selftrain_adabn, instrument_adabn, instrument_shot
                     started where AdaBN ends (`FROM_ADABN`: source_only's encoder, its classifier fitted to its
                     features before the first step, each domain normalised by its own statistics), `--batches` / 2
                     batches: SHOT's information maximisation, MMD, AdaMatch, instrument randomisation, the last two
  instrument         stage adapt from scratch with instrument randomisation of the labelled images
  noisematch, mmd_noisematch, noisematch_gaussian, mmd_noisematch_gaussian
                     stage adapt from scratch with noise matching of the labelled images to the target's noise
                     (Poisson-Gaussian model; `_gaussian`: the background's noise alone), with MMD or without
  target_supervised  stage supervised on the target simulator: the upper bound at the same budget
Every adapted run also ends with AdaBN (`data.target.adabn`), a candidate of its own (`<method>+adabn`), and each
AdaBN candidate's classification head is refitted to the target's features without target labels (`--heads`,
`dlscale adapt-bn --head`: `adabn+em`, `<method>+adabn+coral`, ...); with `--self-train-rounds N`, every AdaBN
candidate and its refits also self-train the encoder on their target pseudo-labels (`adabn+selftrain`, taught by
the trained head; `adabn+em+selftrain`, `mmd+adabn+em+selftrain`, ...). All are scored on one
simulated target evaluation set (its labels used for scoring only) and one source evaluation set.

Reported per candidate: target macro AUC with a 95% CI, the share of the gap closed ((AUC - AUC_source_only) /
(AUC_target_supervised - AUC_source_only)) with a paired bootstrap CI (`dlscale.metrics.gap_closed`), the gain over
AdaBN alone (paired bootstrap CI), the source validation macro AUC, the deep-embedded-validation risk and the
target-side rules ATC, SND, IM and BNM (`dlscale.train.selection`); an AdaBN candidate is a target-specific export,
so its labelled-domain side (source validation AUC and loss, source features of DEV's domain classifier) is its
weights (a refitted head included) with the source statistics (`twin`), its target side its own features. Then the
candidate each selection rule picks: `source_val` (highest source validation AUC), `dev` (lowest DEV risk), `atc`,
`snd`, `im`, `bnm` (highest; all label-free), against `oracle` (highest target AUC: what a user cannot do). Wall
times and the machine load are recorded; finished runs in --work-dir are reused.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlscale.train.target_head import SOURCE_HEAD, TARGET_HEADS

SHIFTS = {
    # Euclid-like (Model II: 0.101"/px, PSF 0.16") -> HST-like (Model III: 0.08"/px, PSF 0.08"); both 64x64
    "ii_to_iii": ({"preset": "model_ii"}, {"preset": "model_iii"}),
    # the same instrument: noiseless (as the preset) -> a short exposure (100 s) with Poisson and background noise
    "noiseless_to_noisy": ({"preset": "model_ii"},
                           {"preset": "model_ii", "overrides": "{instrument.noise: true, "
                                                               "instrument.exposure_time: [100, 100]}"}),
}
FROM_SOURCE = ["--init_from={source_only}", "--optim.warmup_steps=10"]
# where AdaBN ends: the source model (encoder and, fitted to its features, classifier), each domain normalised by
# its own statistics in training (the target's as AdaBN's), the labelled domain's kept as the run's
FROM_ADABN = ["--model.domain_batchnorm=separate", "--model.task_options.classification.probe_init=true",
              "--eval.probe_samples=1200", *FROM_SOURCE]
GAUSSIAN_NOISE = ["--model.task_options.noisematch.model=gaussian"]   # the background's noise alone, no shot noise
SHOT = ["--model.tasks=[classification,shot]", "--optim.lr=1e-3", *FROM_ADABN]
METHODS = {   # name: (stage, extra arguments, share of --batches, adapted)
    "source_only": ("supervised", [], 1.0, False),
    "mmd": ("adapt", ["--model.tasks=[classification,mmd]"], 1.0, True),
    "sinkhorn": ("adapt", ["--model.tasks=[classification,sinkhorn]"], 1.0, True),
    "mmd_selftrain": ("adapt", ["--model.tasks=[classification,mmd,selftrain]"], 1.0, True),
    "dann_sn": ("adapt", ["--model.tasks=[classification,dann]", "--model.task_options.dann.spectral_norm=true"],
                1.0, True),
    "selftrain": ("adapt", ["--model.tasks=[classification,selftrain]", *FROM_SOURCE], 0.5, True),
    "adda": ("adapt", ["--model.tasks=[classification,adda]", "--optim.encoder_lr_scale=0.1", *FROM_SOURCE], 0.5,
             True),
    "adda_selftrain": ("adapt", ["--model.tasks=[classification,adda,selftrain]", "--optim.encoder_lr_scale=0.1",
                                 *FROM_SOURCE], 0.5, True),
    "selftrain_sep": ("adapt", ["--model.tasks=[classification,selftrain]", "--model.domain_batchnorm=separate",
                                *FROM_SOURCE], 0.5, True),
    "selftrain_sep_lr3e-4": ("adapt", ["--model.tasks=[classification,selftrain]", "--model.domain_batchnorm=separate",
                                       "--optim.lr=3e-4", *FROM_SOURCE], 0.5, True),
    "adda_selftrain_sep": ("adapt", ["--model.tasks=[classification,adda,selftrain]", "--optim.encoder_lr_scale=0.1",
                                     "--model.domain_batchnorm=separate", *FROM_SOURCE], 0.5, True),
    "shot": ("adapt", SHOT, 0.5, True),
    "shot_lr3e-4": ("adapt", [*SHOT, "--optim.lr=3e-4"], 0.5, True),
    "shot_lr1e-4": ("adapt", [*SHOT, "--optim.lr=1e-4"], 0.5, True),
    "shot_div2_lr3e-4": ("adapt", [*SHOT, "--optim.lr=3e-4", "--model.task_options.shot.diversity=2"], 0.5, True),
    "selftrain_adabn": ("adapt", ["--model.tasks=[classification,selftrain]", "--optim.lr=3e-4", *FROM_ADABN], 0.5,
                        True),
    "selftrain_adabn_lr1e-4": ("adapt", ["--model.tasks=[classification,selftrain]", "--optim.lr=1e-4",
                                         *FROM_ADABN], 0.5, True),
    "mmd_adabn": ("adapt", ["--model.tasks=[classification,mmd]", "--optim.lr=1e-3", *FROM_ADABN], 0.5, True),
    "instrument": ("adapt", ["--model.tasks=[classification,instrument]"], 1.0, True),
    "noisematch": ("adapt", ["--model.tasks=[classification,noisematch]"], 1.0, True),
    "mmd_noisematch": ("adapt", ["--model.tasks=[classification,mmd,noisematch]"], 1.0, True),
    "noisematch_gaussian": ("adapt", ["--model.tasks=[classification,noisematch]", *GAUSSIAN_NOISE], 1.0, True),
    "mmd_noisematch_gaussian": ("adapt", ["--model.tasks=[classification,mmd,noisematch]", *GAUSSIAN_NOISE], 1.0,
                                True),
    "instrument_adabn": ("adapt", ["--model.tasks=[classification,instrument]", "--optim.lr=1e-3", *FROM_ADABN],
                         0.5, True),
    "instrument_shot": ("adapt", ["--model.tasks=[classification,instrument,shot]", "--optim.lr=1e-3", *FROM_ADABN],
                        0.5, True),
    "target_supervised": ("supervised", [], 1.0, False),
}
TRAIN = ["--model.encoder.name=small", "--model.encoder.width=16", "--data.batch_size=32", "--data.num_workers=1",
         "--deepspeed.zero_stage=0", "--optim.lr=3e-3", "--optim.warmup_steps=50", "--schedule.log_every=100",
         "--schedule.checkpoint_every=100000", "--eval.n_bootstrap=50", "--eval.probe_samples=0"]


def simulator_args(prefix: str, side: dict, per_class: int) -> list[str]:
    args = [f"--{prefix}.preset={side['preset']}", f"--{prefix}.eval_per_class={per_class}",
            f"--{prefix}.probe_per_class={per_class}"]
    return args + ([f"--{prefix}.overrides={side['overrides']}"] if "overrides" in side else [])


def run_method(shift: str, method: str, args, work: Path) -> float:
    """Train one method (unless finished in an earlier call); returns its wall time (recorded beside the run).
    Every run after source_only evaluates on source_only's simulated sets (the same images for every method)."""
    run_dir = work / method
    timing = run_dir / "bench_seconds.txt"
    if (run_dir / "metrics.json").is_file() and timing.is_file():
        return float(timing.read_text())
    if run_dir.exists():   # an interrupted run of an earlier call: train it again
        shutil.rmtree(run_dir)
    source, target = SHIFTS[shift]
    stage, extra, share, adapted = METHODS[method]
    labelled = target if method == "target_supervised" else source
    epochs = 2
    base = work / "source_only"
    sets = [] if method == "source_only" else [
        f"--data_dir={base / ('target_eval_data' if method == 'target_supervised' else 'eval_data')}",
        f"--data.target.data_dir={base / 'target_eval_data'}"]
    argv = ["train", "--stage", stage, "--run-dir", str(run_dir), "--data.source=simulate",
            f"--schedule.epochs={epochs}", f"--schedule.batches_per_epoch={int(args.batches * share) // epochs}",
            f"--seed={args.seed}", "--data.target.source=simulate",
            *simulator_args("data.simulator", labelled, args.eval_per_class),
            *simulator_args("data.target.simulator", target, args.eval_per_class), *TRAIN, *sets,
            *(["--data.target.adabn=true"] if adapted else []), *(a.format(source_only=base) for a in extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlscale.cli", *argv], check=True, env=env, stdout=sys.stderr)
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}\n")
    return seconds


def adabn_run(run: Path, out: Path, head: str, work: Path, self_train_rounds: int = 0) -> Path:
    """`run` with AdaBN on the target's unlabelled train images (and the `head` refit, and self-training) into
    `out`, unless done."""
    from dlscale.train.adabn import AdaBNConfig, adapt_batchnorm
    from dlscale.train.target_selftrain import SelfTrainConfig
    if not (out / "model.pt").is_file():
        shutil.rmtree(out, ignore_errors=True)
        adapt_batchnorm(AdaBNConfig(run, work / "source_only" / "target_eval_data", out, head=head,
                                    self_train=SelfTrainConfig(self_train_rounds)), progress=False)
    return out


def candidates(work: Path, methods: list[str], heads: list[str], self_train_rounds: int) -> dict[str, Path]:
    """Every run directory a user could deploy: each method's run and, for adapted ones, its AdaBN run, and each
    AdaBN run's head refits (`<run>+<head>`), and with rounds the self-trained runs (see `refits`)."""
    from dlscale.train.adabn import RUN_STEP_DIR
    source = work / "source_only"
    runs = {"source_only": source, "adabn": adabn_run(source, work / "adabn", SOURCE_HEAD, work)}
    refits(runs, "adabn", source, work, work, heads, self_train_rounds)
    for m in methods:
        runs[m] = work / m
        if METHODS[m][3]:
            runs[f"{m}+adabn"] = work / m / RUN_STEP_DIR
            refits(runs, f"{m}+adabn", work / m, work / m, work, heads, self_train_rounds)
    return runs


def refits(runs: dict[str, Path], name: str, run: Path, where: Path, work: Path, heads: list[str],
           self_train_rounds: int) -> None:
    """Add `run`'s AdaBN head refits (`<name>+<head>`) and, with rounds, their self-trained runs
    (`<name>+<head>+selftrain`) and the AdaBN run self-trained with its trained head as the teacher
    (`<name>+selftrain`), written under `where`."""
    if self_train_rounds:
        runs[f"{name}+selftrain"] = adabn_run(run, where / f"adabn_selftrain{self_train_rounds}", SOURCE_HEAD, work,
                                              self_train_rounds)
    for h in heads:
        runs[f"{name}+{h}"] = adabn_run(run, where / f"adabn_{h}", h, work)
        if self_train_rounds:
            runs[f"{name}+{h}+selftrain"] = adabn_run(run, where / f"adabn_{h}_selftrain{self_train_rounds}", h, work,
                                                       self_train_rounds)


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def outputs(run_dir: Path, twin_dir: Path, work: Path) -> dict[str, dict]:
    """A candidate's probabilities and features on the target's train / val splits, and on the source's with its
    weights under the BatchNorm statistics of `twin_dir` (see `twin`)."""
    from dlscale.train.evaluation import load_run
    from dlscale.train.selection import split_outputs
    cfg, model, _ = load_run(run_dir)
    _, twin_model, _ = load_run(twin_dir)
    source_model = copy.deepcopy(model)
    source_model.load_state_dict({**model.state_dict(), **{k: v for k, v in twin_model.state_dict().items()
                                                             if k.rsplit(".", 1)[-1] in STATISTICS}})
    source, target = work / "source_only" / "eval_data", work / "source_only" / "target_eval_data"
    device = torch.device("cpu")
    return {f"{side}_{split}": split_outputs(m, cfg.data, where, split, device)
            for side, m, where in (("source", source_model, source), ("target", model, target))
            for split in ("train", "val")}


def labelled_side(run: Path, work: Path) -> Path:
    """`run` with its BatchNorms re-estimated on the labelled domain's train images (AdaBN back to the source)."""
    from dlscale.train.adabn import AdaBNConfig, adapt_batchnorm
    out = run.parent / f"{run.name}_labelled"
    if not (out / "model.pt").is_file():
        shutil.rmtree(out, ignore_errors=True)
        adapt_batchnorm(AdaBNConfig(run, work / "source_only" / "eval_data", out), progress=False)
    return out


def twin(name: str, runs: dict[str, Path], work: Path) -> Path:
    """The run whose BatchNorm statistics serve the labelled domain for candidate `name`: an AdaBN run is a
    target-specific export (domain-specific normalisation, as in AdaBN), its weights (its refitted head included)
    with the statistics of its source twin (`source_only` for `adabn...`, `m` for `m+adabn...`) score the labelled
    validation set. A self-trained candidate's encoder is no longer its source twin's: its own weights with
    statistics re-estimated on the labelled train images serve instead."""
    if name.endswith("+selftrain"):
        return labelled_side(runs[name], work)
    first = name.split("+")[0]
    return runs["source_only" if first == "adabn" else first]


def head_report(run_dir: Path) -> dict:
    """What a head refit did (adabn.json's `head`: for EM, whether its fit was kept), if it ran."""
    record = run_dir / "adabn.json"
    return json.loads(record.read_text()).get("head", {}) if record.is_file() else {}


def study(shift: str, args, work: Path) -> dict:
    from dlscale.metrics import gap_closed
    from dlscale.train.selection import label_free_scores
    seconds = {m: run_method(shift, m, args, work) for m in ["source_only", *args.methods, "target_supervised"]}
    runs = candidates(work, args.methods, args.heads, args.self_train_rounds)
    runs["target_supervised"] = work / "target_supervised"
    outs = {name: outputs(run, twin(name, runs, work), work) for name, run in runs.items()}
    labels = outs["source_only"]["target_val"]["labels"]
    probs = {name: o["target_val"]["probs"] for name, o in outs.items()}
    closed = gap_closed(probs, labels, "source_only", "target_supervised", seed=args.seed)
    over_adabn = gap_closed(probs, labels, "adabn", "target_supervised", seed=args.seed)
    rows = {}
    for name, o in outs.items():
        rows[name] = {**closed[name], "gain_over_adabn_ci_low": over_adabn[name]["gain_over_baseline_ci_low"],
                      "gain_over_adabn_ci_high": over_adabn[name]["gain_over_baseline_ci_high"],
                      **label_free_scores(o["source_train"], o["source_val"], o["target_train"]["features"],
                                          o["target_train"]["probs"], args.seed),
                      "seconds": round(seconds.get(name.split("+")[0], 0.0), 1)}
        if head_report(runs[name]).get("kind", SOURCE_HEAD) != SOURCE_HEAD:
            rows[name]["head"] = head_report(runs[name])
    deployable = [n for n in rows if n != "target_supervised"]
    chosen = {"source_val": max(deployable, key=lambda n: rows[n]["source_auc_macro"]),
              "dev": min(deployable, key=lambda n: rows[n]["dev_risk"]),
              "atc": max(deployable, key=lambda n: rows[n]["atc"]),
              "snd": max(deployable, key=lambda n: rows[n]["snd"]),
              "im": max(deployable, key=lambda n: rows[n]["im"]),
              "bnm": max(deployable, key=lambda n: rows[n]["bnm"]),
              "oracle": max(deployable, key=lambda n: rows[n]["auc_macro"])}
    selection = {rule: {"chosen": n, "auc_macro": rows[n]["auc_macro"], "gap_closed": rows[n]["gap_closed"],
                        "gap_closed_ci": [rows[n]["gap_closed_ci_low"], rows[n]["gap_closed_ci_high"]],
                        "ci_apart_from_adabn": rows[n]["gain_over_adabn_ci_low"] > 0}
                 for rule, n in chosen.items()}
    goal = selection["dev"]["gap_closed"] >= 0.9 and selection["dev"]["ci_apart_from_adabn"]
    return {"candidates": rows, "gap": closed["gap"], "selection": selection,
            "goal_90_percent_label_free_ci_apart_from_adabn": bool(goal)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", default=",".join(SHIFTS))
    p.add_argument("--methods", default="mmd,selftrain,adda_selftrain",
                   help=f"adapted methods, some of {', '.join(m for m in METHODS if METHODS[m][3])}")
    p.add_argument("--heads", default="coral,em", help="head refits of every AdaBN candidate (`data.target.head`): "
                                                       "some of coral, em; '' for none")
    p.add_argument("--self-train-rounds", type=int, default=0, help="also self-train source_only's head refits "
                                                                     "(`adapt-bn --self-train-rounds`)")
    p.add_argument("--batches", type=int, default=600, help="training batches of 32 of a run from scratch")
    p.add_argument("--eval-per-class", type=int, default=400, help="evaluation (and train-split) images per class "
                                                                   "of both domains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_adapt"))
    args = p.parse_args()
    shifts, args.methods, args.heads = args.shifts.split(","), args.methods.split(","), [
        h for h in args.heads.split(",") if h]
    refits = [h for h in TARGET_HEADS if h != SOURCE_HEAD]
    unknown = (sorted(set(shifts) - set(SHIFTS)) + sorted(m for m in args.methods if not METHODS.get(m, (0,) * 4)[3])
               + sorted(set(args.heads) - set(refits)))
    if unknown:
        p.error(f"unknown shifts, methods or heads {unknown}: shifts {', '.join(SHIFTS)}; methods "
                f"{', '.join(m for m in METHODS if METHODS[m][3])}; heads {', '.join(refits)}")
    torch.set_num_threads(1)
    load, start = os.getloadavg()[0], time.perf_counter()
    results = {s: study(s, args, args.work_dir / s) for s in shifts}
    print(json.dumps({"bench": "adapt", "batches": args.batches, "batch_size": 32,
                      "eval_per_class": args.eval_per_class, "methods": args.methods, "heads": args.heads,
                      "self_train_rounds": args.self_train_rounds,
                      "load_average_start": load, "load_average_end": os.getloadavg()[0],
                      "seconds": round(time.perf_counter() - start, 1), "shifts": results}, indent=2))


if __name__ == "__main__":
    main()
