"""The quickstart's report.md: the stages next to the seed's numbers, the label-efficiency study, the figures, and
a "what this shows" paragraph written from the measured numbers and their confidence intervals."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dlscale import io
from dlscale.configtree import read_yaml
from dlscale.data.classes import CLASSES
from dlscale.export import encoder_config
from dlscale.figures import save_reliability, save_roc
from dlscale.models import backbone_class
from dlscale.train.config import load_config, run_tasks
from dlscale.transfer.methods import METHOD_TABLE
from dlscale.transfer.report import task_sections
from dlscale.transfer.report_text import fmt as _f
from dlscale.transfer.tasks.classification import table

PROBE_GOAL = 0.93          # linear-probe macro AUC of the pretrained encoder at 100 labels per class
SUPERVISED_GOAL = 0.95     # macro AUC of the supervised baseline on the demo's validation split
TRANSFER_GOAL_N = (10, 100)
"""labels per class where the best transfer method must beat scratch with 95% CIs apart, then be at least level"""

# The notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class), by its stage; our
# pretraining step stands where its autoencoder stood.
SEED_STAGE = {"pretrain": "autoencoder", "supervised": "supervised", "multitask": "multitask"}
SEED_RESULTS = {
    "autoencoder": {"probe/accuracy": 0.34},
    "supervised": {"accuracy": 0.62, "auc_macro": 0.81},
    "multitask": {"accuracy": 0.68, "auc_macro": 0.85, "auc/no_sub": 0.915, "auc/cdm": 0.807, "auc/axion": 0.840},
}


def encoder_text(run_dir: Path) -> str:
    """"small CNN width 16 (0.10M)": the row's encoder and its parameter count."""
    payload = torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=True)
    cfg = encoder_config(payload)
    n = sum(v.numel() for k, v in payload["state_dict"].items() if torch.is_tensor(v) and "running" not in k
            and "num_batches" not in k)
    return f"{backbone_class(cfg.name).describe(cfg)} ({n / 1e6:.2f}M)"


def stage_rows(out: Path, cfg) -> tuple[list[str], dict]:
    header = ("| run | stage (tasks) | encoder (parameters) | accuracy | ECE | macro AUC (95% CI) | "
              + " | ".join(f"AUC {c}" for c in CLASSES) + " | probe acc | probe AUC | recon MSE |")
    rows, metrics, curves = [header, "|" + "---|" * (header.count("|") - 1)], {}, {}
    for name, step in cfg.steps.items():
        m = io.read_json(out / name / "metrics.json")
        metrics[name] = m
        ci = f" ({_f(m.get('val/auc_macro_ci_low'))}-{_f(m.get('val/auc_macro_ci_high'))})" \
            if m.get("val/auc_macro") is not None else ""
        rows.append(f"| dlscale {name} | {step.train.stage} ({tasks_text(out / name)}) | "
                    f"{encoder_text(out / name)} | "
                    f"{_f(m.get('val/accuracy'))} | {_f(m.get('val/ece'))} | {_f(m.get('val/auc_macro'))}{ci} | "
                    + " | ".join(_f(m.get(f"val/auc/{c}")) for c in CLASSES)
                    + f" | {_f(m.get('probe/accuracy'))} | {_f(m.get('probe/auc_macro'))} | "
                    f"{_f(m.get('val/recon_mse'), 5)} |")
        seed_stage = SEED_STAGE.get(name, name)
        seed = SEED_RESULTS.get(seed_stage, {})
        rows.append(f"| seed {seed_stage} | {seed_stage} | ResNet18 (11.2M) | {_f(seed.get('accuracy'))} | - | "
                    f"{_f(seed.get('auc_macro'))} | " + " | ".join(_f(seed.get(f"auc/{c}")) for c in CLASSES)
                    + f" | {_f(seed.get('probe/accuracy'))} | - | - |")
        scores = out / name / "scores_val.npz"
        if scores.is_file():
            with np.load(scores) as z:
                if "probs" in z:
                    curves[name] = (z["probs"], z["labels"])
    if curves:
        save_roc(out / "roc.png", curves, CLASSES)
        save_reliability(out / "reliability.png", curves)
    return rows, metrics


def _interval(m: dict) -> tuple[float, float, float]:
    return (m.get("val/auc_macro", math.nan), m.get("val/auc_macro_ci_low", math.nan),
            m.get("val/auc_macro_ci_high", math.nan))


def _cell(transfer: dict, method: str, n) -> dict | None:
    return next((c for c in transfer.get("cells", []) if c["method"] == method and c["n_per_class"] == n), None)


def _auc(cell: dict | None) -> str:
    if cell is None:
        return "not measured"
    return f"{_f(cell['mean'].get('auc_macro'))} ({_f(cell['ci_low'].get('auc_macro'))}-" \
           f"{_f(cell['ci_high'].get('auc_macro'))})"


def _verdict(a: tuple, b: tuple) -> str:
    """How interval `a` (mean, low, high) stands against `b`: apart above, apart below, or overlapping."""
    return "above" if a[1] > b[2] else "below" if b[1] > a[2] else "overlap"


def _cell_interval(cell: dict) -> tuple[float, float, float]:
    return cell["mean"]["auc_macro"], cell["ci_low"]["auc_macro"], cell["ci_high"]["auc_macro"]


def findings(metrics: dict, transfer: dict) -> list[str]:
    """Sentences from the numbers: which stage wins and by how much, what pretraining buys at each N."""
    lines = []
    sup, mt = _interval(metrics.get("supervised", {})), _interval(metrics.get("multitask", {}))
    if all(math.isfinite(v) for v in (mt[0], sup[0])):
        verdict = {"above": "beats supervised: the 95% CIs do not overlap",
                   "below": "falls below supervised: the 95% CIs do not overlap (the seed's claim is not reproduced)",
                   "overlap": "and supervised agree within their 95% CIs"}[_verdict(mt, sup)]
        lines.append(f"- Multi-task {verdict} (macro AUC {_f(mt[0])} [{_f(mt[1])}-{_f(mt[2])}] vs {_f(sup[0])} "
                     f"[{_f(sup[1])}-{_f(sup[2])}], difference {mt[0] - sup[0]:+.3f}).")
        lines.append(f"- Supervised baseline: macro AUC {_f(sup[0])}; goal >= {SUPERVISED_GOAL}: "
                     f"{'met' if sup[0] >= SUPERVISED_GOAL else '**not met**'}.")
    for n in transfer.get("labels_per_class", []):
        probe, scratch, random = (_cell(transfer, m, n) for m in ("probe", "scratch", "random"))
        if probe:
            lines.append(f"- At {n} labels per class the pretrained encoder's linear probe reaches macro AUC "
                         f"{_auc(probe)}; the random-init control probe gives {_auc(random)}.")
        for method in _fine_tuned(transfer):
            fine = _cell(transfer, method, n)
            if fine and scratch:
                gap = fine["mean"]["auc_macro"] - scratch["mean"]["auc_macro"]
                word = {"above": "beats scratch (CIs do not overlap)",
                        "below": "falls below scratch (CIs do not overlap)",
                        "overlap": "is above scratch, within the CIs" if gap > 0 else "does **not** beat scratch"}[
                    _verdict(_cell_interval(fine), _cell_interval(scratch))]
                lines.append(f"- `{method}` from the pretrained encoder with {n} labels per class {word}: "
                             f"{_auc(fine)} vs {_auc(scratch)} ({gap:+.3f}).")
    return lines


def _fine_tuned(transfer: dict) -> list[str]:
    """The study's methods that train from the pretrained encoder (finetune, lpft, ...), in its order."""
    return [m for m in transfer.get("methods", []) if m in METHOD_TABLE and METHOD_TABLE[m].pretrained
            and not METHOD_TABLE[m].frozen]


def best_transfer(transfer: dict, n) -> dict | None:
    """The cell of the method using the pretrained encoder (frozen or trained; not scratch or the random control)
    with the highest mean macro AUC at `n` labels per class, or None when none was measured."""
    cells = [c for c in transfer.get("cells", []) if c["n_per_class"] == n and c["method"] in METHOD_TABLE
             and METHOD_TABLE[c["method"]].pretrained and c.get("task", "classification") == "classification"]
    return max(cells, key=lambda c: c["mean"]["auc_macro"], default=None)


def goals(metrics: dict, transfer: dict) -> list[str]:
    """The foundation goals, each met or not met by the measured numbers (a goal without its cells says so)."""
    lines = []
    small, large = TRANSFER_GOAL_N
    best, scratch = best_transfer(transfer, small), _cell(transfer, "scratch", small)
    if best and scratch:
        method = best["method"]
        met = _verdict(_cell_interval(best), _cell_interval(scratch)) == "above"
        lines.append(f"- (a) The best transfer method at {small} labels per class, `{method}`, beats scratch with "
                     f"95% CIs apart: {'met' if met else '**not met**'} ({_auc(best)} vs {_auc(scratch)}).")
        later, scratch = _cell(transfer, method, large), _cell(transfer, "scratch", large)
        if later and scratch:
            level = _verdict(_cell_interval(later), _cell_interval(scratch)) != "below"
            lines.append(f"- (a) `{method}` is at least level with scratch at {large} labels per class (not below it "
                         f"with CIs apart): {'met' if level else '**not met**'} ({_auc(later)} vs {_auc(scratch)}).")
        else:
            lines.append(f"- (a) `{method}` against scratch at {large} labels per class: not measured in this run.")
    else:
        lines.append(f"- (a) The best transfer method against scratch at {small} labels per class: not measured in "
                     "this run.")
    probe = _cell(transfer, "probe", 100)
    lines.append(f"- (b) Linear probe at 100 labels per class >= {PROBE_GOAL}: " + (
        f"{'met' if probe['mean']['auc_macro'] >= PROBE_GOAL else '**not met**'} ({_auc(probe)})." if probe
        else "not measured in this run."))
    sup, mt = _interval(metrics.get("supervised", {})), _interval(metrics.get("multitask", {}))
    if all(math.isfinite(v) for v in (mt[0], sup[0])):
        within = "; the CIs overlap" if _verdict(mt, sup) == "overlap" else ""
        lines.append(f"- (c) Multi-task >= supervised: {'met' if mt[0] >= sup[0] else '**not met**'} (macro AUC "
                     f"{_f(mt[0])} vs {_f(sup[0])}{within}).")
    return lines


def stream_images(run_dir: Path) -> int | None:
    """Distinct simulated images a run saw from the simulation stream (its steps x batch x ranks: no image comes
    twice); None for a run trained on stored images."""
    if not (run_dir / "simulation.json").is_file():
        return None
    stream = io.read_json(run_dir / "simulation.json")
    return int(io.read_json(run_dir / "metrics.json")["step"]) * stream["batch_size"] * stream["world"]


def tasks_text(run_dir: Path) -> str:
    """"recon+contrastive": the tasks a run trained, as its recorded config resolves them."""
    return "+".join(run_tasks(load_config(run_dir / "config.yaml", run_dir=str(run_dir))))


def simulated_text(simulator: dict) -> str:
    """What a stream simulated, from its recorded `data.simulator`: one preset, or the mixture's with their shares."""
    mixture = simulator.get("mixture") or {}
    if not mixture:
        return f"`{simulator['preset']}`"
    return "the mixture of " + ", ".join(f"`{c['preset']}` (share {c.get('share', 1.0):g})" for c in mixture.values())


def pretraining_lines(out: Path, cfg, n_train: int) -> list[str]:
    """What each stream-trained step learned from: its tasks and the fresh images it saw, against the labelled
    train split."""
    lines = []
    for name in cfg.steps:
        images = stream_images(out / name)
        if images is not None:
            presets = simulated_text(read_yaml(out / name / "config.yaml")["data"]["simulator"])
            lines.append(f"- `{name}` ({tasks_text(out / name)}) trained on {images:,} fresh images from "
                         f"the simulation stream ({presets}, none stored, none repeated): {images / n_train:.1f}x "
                         f"the {n_train:,} images of the labelled train split; its metrics are taken on the "
                         "labelled validation split.")
    return lines


def downstream_section(out: Path, results: dict | None) -> list[str]:
    """The cheap downstream tasks (frozen pretrained encoder, one N): their tables and what they cost."""
    if not results:
        return []
    names = ",".join(t["name"] for t in results.get("tasks", []))
    return ["## Downstream tasks of the pretrained encoder (frozen features)", "",
            f"The frozen encoder at one N (`dlscale transfer --tasks {names} --methods probe`); its cost on this "
            "machine is logged and "
            f"kept as `seconds` (per task) in `{out / 'downstream' / 'results.json'}` (this report stays "
            "reproducible); full "
            f"study: `{out / 'downstream' / 'report.md'}`.",
            *task_sections(results), ""]


def classification_table(results: dict) -> list[str]:
    """The label-efficiency study's classification table (its cells, with the regression targets it trained)."""
    record = next(r for r in results["tasks"] if r["name"] == "classification")
    return table([c for c in results["cells"] if c["task"] == "classification"],
                 (record.get("options") or {}).get("targets", []))


def write_report(cfg, transfer: dict, downstream: dict | None = None) -> Path:
    """OUT/report.md of the quickstart `cfg` (a QuickstartConfig), from its runs and studies."""
    out, data = Path(cfg.out), cfg.data_dir
    manifest = io.read_json(data / "manifest.json")
    rows, metrics = stage_rows(out, cfg)
    val, source = manifest["splits"]["val"], manifest["source"]
    lines = [
        "# dlscale quickstart report", "",
        f"Data: simulated `{source.get('preset')}` images {'x'.join(map(str, manifest['image_shape']))}, "
        f"{manifest['splits']['train']['samples']} train / {val['samples']} validation samples "
        f"({', '.join(f'{c} {n}' for c, n in val['class_counts'].items())} in validation), seed {source.get('seed')}."
        " Every metric on the whole validation split; probe = logistic regression on the frozen encoder's features;"
        " CI = 95% bootstrap interval.", "",
        "## What this shows", "", *findings(metrics, transfer), "",
        "## Goals", "", *goals(metrics, transfer), "",
        "## Pretraining", "", *pretraining_lines(out, cfg, manifest["splits"]["train"]["samples"]), "",
        "## Stages", "", *rows, "",
        "Seed rows: the notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class, "
        "ResNet18). **The datasets differ**, so the rows are a reference point, not a like-for-like comparison.", "",
        f"- ROC curves, stages overlaid: `{out / 'roc.png'}`; reliability diagram (ECE: 15 bins of the max "
        f"probability): `{out / 'reliability.png'}`",
        f"- TensorBoard: `tensorboard --logdir {out}` (one run per stage)",
        f"- Exported encoders: `{out / 'pretrain' / 'encoder.pt'}`, `{out / 'multitask' / 'encoder.pt'}` -> "
        "`dlscale.load_encoder(path)`", "",
        "## Label efficiency of the pretrained encoder", "",
        f"`dlscale transfer` on `{out / 'pretrain'}`: {transfer.get('ci', '')}.", "",
        *classification_table(transfer), "",
        f"- Figure: `{out / 'label_efficiency' / 'label_efficiency.png'}` (macro AUC vs labels per class)",
        f"- Full study: `{out / 'label_efficiency' / 'report.md'}`", "", *downstream_section(out, downstream)]
    report = out / "report.md"
    io.write_text(report, "\n".join(lines))
    return report
