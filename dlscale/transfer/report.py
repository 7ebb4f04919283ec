"""What a transfer study writes: results.json, report.md (one table N x method x encoder), label_efficiency.png
(macro AUC against labels per class, log x, one line per encoder and method with its CI band) and, with regression
targets, regression_scatter.png (predicted against true on the eval split at the largest N)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlscale import io
from dlscale.data.classes import CLASSES
from dlscale.transfer.report_tasks import efficiency_panels, task_record, task_sections
from dlscale.transfer.subsets import ALL

LINE_STYLES = {"probe": "-", "finetune": "--", "scratch": ":", "random": "-."}
METHOD_TEXT = {
    "probe": "logistic regression (ridge for regression targets) on the frozen encoder's pooled features",
    "finetune": "the encoder fine-tuned with a new head through the DeepSpeed engine (init_from)",
    "scratch": "the same architecture from random weights, same labels, config and budget",
    "random": "control: the same architecture at random initialisation, probed like `probe`"}


def write_outputs(study, cells: list[dict], ci_text: str) -> dict:
    cfg, out = study.cfg, Path(study.cfg.out)
    results = {
        "data_dir": str(cfg.data_dir), "data_source": study.manifest.get("source"), "split": cfg.split,
        "image_shape": study.manifest["image_shape"], "resize": study.train_cfg.data.resize,
        "eval_data": cfg.eval_data, "train_samples": len(study.train_labels),
        "eval_samples": (study.eval_manifest or study.manifest)["splits"][cfg.split]["samples"],
        "labels_per_class": cfg.labels_per_class, "repeats": cfg.repeats, "methods": cfg.methods,
        "targets": cfg.targets, "epochs": cfg.epochs, "ranks": cfg.ranks, "seed": cfg.seed,
        "overrides": cfg.overrides, "finetune_encoder_lr_scale": cfg.finetune_encoder_lr_scale, "ci": ci_text,
        "budget": {str(n): b for n, b in study.budget.items()},
        "encoders": [{"label": s.label, "path": str(s.path), "stage": s.stage, "architecture": s.arch_label,
                      "image_shape": list(s.image_shape), "normalize": s.normalize, "trained_on": s.trained_on}
                     for s in study.sources],
        "tasks": [task_record(t) for t in study.tasks], "cells": cells}
    classification = [c for c in cells if c["task"] == "classification"]
    if classification:
        save_figure(out / "label_efficiency.png", label_efficiency_figure(classification, len(study.train_labels)))
    if cfg.targets and study.preds:
        save_figure(out / "regression_scatter.png", scatter_figure(study, cells))
    results["figures"] = task_figures(study, cells, results)
    io.write_json(out / "results.json", results)
    io.write_text(out / "report.md", report_text(results))
    return results


def task_figures(study, cells: list[dict], results: dict) -> list[str]:
    """The downstream tasks' label-efficiency panels and their own figures; the file names written."""
    out, written = Path(study.cfg.out), []
    panels = efficiency_panels(results)
    if panels is not None:
        save_figure(out / "label_efficiency_tasks.png", panels)
        written.append("label_efficiency_tasks.png")
    for task in study.tasks:
        if task.name == "classification":
            continue
        for name, figure in task.figures(study, [c for c in cells if c["task"] == task.name]).items():
            save_figure(out / name, figure)
            written.append(name)
    return written


def save_figure(path: Path, figure: Figure) -> None:
    io.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))


def _x(n, train_samples: int) -> float:
    return train_samples / len(CLASSES) if n == ALL else float(n)


def label_efficiency_figure(cells: list[dict], train_samples: int) -> Figure:
    figure = Figure(figsize=(7.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lines = sorted({(c["method"], c["model"]) for c in cells if "auc_macro" in c["mean"]})
    models = sorted({m for _, m in lines})
    for method, model in lines:
        rows = sorted((c for c in cells if (c["method"], c["model"]) == (method, model)),
                      key=lambda c: _x(c["n_per_class"], train_samples))
        x = [_x(c["n_per_class"], train_samples) for c in rows]
        colour = f"C{models.index(model) % 10}"
        axes.plot(x, [c["mean"]["auc_macro"] for c in rows], color=colour, linestyle=LINE_STYLES[method],
                  marker="o", label=f"{model} {method}")
        low, high = [c["ci_low"]["auc_macro"] for c in rows], [c["ci_high"]["auc_macro"] for c in rows]
        axes.fill_between(x, low, high, color=colour, alpha=0.12, linewidth=0)
    axes.set_xscale("log")
    ticks = sorted({c["n_per_class"] for c in cells}, key=lambda n: _x(n, train_samples))
    axes.set_xticks([_x(n, train_samples) for n in ticks], [str(n) for n in ticks])
    axes.minorticks_off()
    axes.set(xlabel="labels per class (all: the whole train split, per class on average)",
             ylabel="macro AUC (eval split)", title="Label efficiency (bands: 95% CI)")
    axes.axhline(0.5, color="0.6", linewidth=0.8)
    axes.legend(fontsize="small", loc="best")
    return figure


def scatter_figure(study, cells: list[dict]) -> Figure:
    """Predicted against true per target, every (method, model) at the largest N, first repeat."""
    targets, largest = study.cfg.targets, study.cfg.labels_per_class[-1]
    figure = Figure(figsize=(4.5 * len(targets), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    truth = study.truth["target"]
    for j, name in enumerate(targets):
        axes = figure.add_subplot(1, len(targets), j + 1)
        for k, ((method, model, n), preds) in enumerate(sorted(study.preds.items(), key=lambda kv: str(kv[0]))):
            if n != largest or "regression" not in preds[0]:
                continue
            axes.scatter(truth[:, j], preds[0]["regression"][:, j], s=6, alpha=0.5, color=f"C{k % 10}",
                         label=f"{model} {method}")
        lo, hi = float(np.min(truth[:, j])), float(np.max(truth[:, j]))
        axes.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8)
        axes.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}, {largest} labels per class")
        axes.legend(fontsize="x-small")
    return figure


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _with_ci(cell: dict, key: str) -> str:
    return f"{_f(cell['mean'].get(key))} ({_f(cell['ci_low'].get(key))}-{_f(cell['ci_high'].get(key))})"


def table(results: dict) -> list[str]:
    targets = results["targets"]
    header = "| labels/class | method | encoder | repeats | accuracy (95% CI) | macro AUC (95% CI) |" + \
        "".join(f" MAE {t} (95% CI) | R2 {t} |" for t in targets)
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in results["cells"]:
        if c.get("task", "classification") != "classification":
            continue
        regression = "".join(f" {_with_ci(c, f'mae/{t}')} | {_f(c['mean'].get(f'r2/{t}'))} |" for t in targets)
        rows.append(f"| {c['n_per_class']} | {c['method']} | {c['model']} | {len(c['repeats'])} | "
                    f"{_with_ci(c, 'accuracy')} | {_with_ci(c, 'auc_macro')} |{regression}")
    return rows


def _trained_on(encoder: dict, data_dir: str) -> str:
    info = encoder["trained_on"] or {}
    where = info.get("dir")
    if not where:
        return "training data unknown (not in its metadata)"
    same = Path(where).resolve() == Path(data_dir).resolve()
    source = info.get("source") or {}
    kind = ", ".join(f"{k} {source[k]}" for k in ("kind", "preset") if k in source)
    resize = f", resized to {info['resize']} ({info.get('resize_mode')})" if info.get("resize") else ""
    shape = f", images {info['image_shape']}" if info.get("image_shape") else ""
    return f"trained on `{where}`{' (' + kind + ')' if kind else ''}{shape}{resize}" + \
        (" - the data of this study" if same else " - **transfer to other data**")


def report_text(results: dict) -> str:
    shape = "x".join(map(str, results["image_shape"]))
    resize = f", resized to {results['resize']}x{results['resize']} for the encoders" if results["resize"] else ""
    lines = ["# dlscale transfer: label efficiency", "",
             f"Data: `{results['data_dir']}` ({shape} images{resize}); labelled subsets drawn from its "
             f"{results['train_samples']} train samples; every metric on the whole `{results['split']}` split "
             f"({results['eval_samples']} samples), which no subset touches.", "", "Encoders:"]
    if results.get("eval_data"):
        lines[2] += f" Cross-dataset: every metric is scored on `{results['eval_data']}` instead."
    lines += [f"- **{e['label']}** (`{e['path']}`): stage {e['stage']}, {e['architecture']}, "
              f"{_trained_on(e, results['data_dir'])}" for e in results["encoders"]]
    lines += ["", "Methods (scratch and random are per architecture):"]
    lines += [f"- {m}: {METHOD_TEXT[m]}" for m in results["methods"]]
    budget = "; ".join(f"N={n}: {b['epochs']} x {b['batches_per_epoch']} batches of {b['batch_size']} on "
                       f"{b['ranks']} rank(s)" for n, b in results["budget"].items())
    lines += ["", f"Subsets: N labels per class, stratified, nested (smaller inside larger), seeded (seed "
              f"{results['seed']}), {results['repeats']} repeat(s); at N = all the probe is deterministic (one "
              f"repeat). Fine-tune and scratch budget (epochs x batches): {budget or '-'}; config overrides "
              f"{_settings_text(results['overrides']) or 'none'}; fine-tuned encoders learn at "
              f"{results.get('finetune_encoder_lr_scale', 1.0):g}x the learning rate of their new head.",
              f"Values: mean over repeats; CI: {results['ci']}.", ""]
    if any(c.get("task", "classification") == "classification" for c in results["cells"]):
        lines += ["## Task: classification", "", *table(results), "",
                  "- Figure: `label_efficiency.png` (macro AUC vs labels per class, log x, CI bands)"]
    if results["targets"]:
        lines.append("- Regression: `regression_scatter.png` (predicted vs true at the largest N)")
    lines += [f"- Downstream tasks: `{name}`" for name in results.get("figures", [])]
    lines += ["- Fine-tune and scratch runs (TensorBoard): `tensorboard --logdir runs` in this directory"]
    lines += [*task_sections(results), ""]
    return "\n".join(lines)


def _settings_text(settings) -> str:
    """`key=value ...` of a study's training config settings (a results.json of an older study: its override list)."""
    if isinstance(settings, dict):
        return " ".join(f"{k}={v}" for k, v in settings.items())
    return " ".join(settings or [])
