"""What a transfer study writes: results.json, report.md (the study, then one section per downstream task, each
written by its task: `DownstreamTask.section`), each task's figures, and label_efficiency_tasks.png (one panel per
task that asks for it: its headline metric against labels per class, CI bands)."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlscale import io
from dlscale.configtree import plain, to_dict
from dlscale.transfer.methods import METHOD_TEXT
from dlscale.transfer.subsets import ALL
from dlscale.transfer.tasks import DOWNSTREAM, DownstreamTask

STYLES = {"probe": "-", "random": "-.", "bicubic": ":", "finetune": "--", "scratch": ":"}


def task_record(task: DownstreamTask, options) -> dict:
    """What results.json says about a task: what it needs, how it is scored, its metrics, anchors and options."""
    return {"name": task.name, "needs": task.needs, "note": task.note, "metrics": list(task.metrics),
            "higher_is_better": task.higher_is_better, "efficiency_panel": task.efficiency_panel,
            "options": plain(to_dict(options)) if options is not None else None,
            "anchors": [{"metric": a.metric, "value": a.value, "model": a.model, "source": a.source}
                        for a in task.anchors]}


def write_outputs(study, cells: list[dict], ci_text: str, seconds: dict[str, float]) -> dict:
    cfg, out = study.cfg, Path(study.cfg.out)
    results = {
        "data_dir": str(cfg.data_dir), "data_source": study.manifest.get("source"), "split": cfg.split,
        "image_shape": study.manifest["image_shape"], "resize": cfg.data.resize,
        "eval_data": cfg.eval_data, "train_samples": len(study.train_labels),
        "eval_samples": (study.eval_manifest or study.manifest)["splits"][cfg.split]["samples"],
        "labels_per_class": cfg.labels_per_class, "repeats": cfg.repeats, "methods": cfg.methods,
        "ranks": cfg.ranks, "seed": cfg.seed, "config": plain(to_dict(cfg)), "ci": ci_text,
        "budget": {str(n): b for n, b in study.budget.items()}, "seconds": seconds,
        "encoders": [{"label": s.label, "path": str(s.path), "stage": s.stage, "architecture": s.arch_label,
                      "image_shape": list(s.image_shape), "normalize": s.normalize, "trained_on": s.trained_on}
                     for s in study.sources],
        "tasks": [task_record(t, cfg.task_options.get(t.name)) for t in study.tasks], "cells": cells}
    written = []
    panels = efficiency_panels(results)
    if panels is not None:
        save_figure(out / "label_efficiency_tasks.png", panels)
        written.append("label_efficiency_tasks.png")
    for task in study.tasks:
        for name, figure in task.figures(study, [c for c in cells if c["task"] == task.name]).items():
            save_figure(out / name, figure)
            written.append(name)
    results["figures"] = written
    io.write_json(out / "results.json", results)
    io.write_text(out / "report.md", report_text(results))
    return results


def save_figure(path: Path, figure: Figure) -> None:
    io.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))


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
    config = results["config"]
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
              f"repeat). Fine-tune and scratch budget (epochs x batches): {budget or '-'}; fine-tuned encoders "
              f"learn at {config['budget']['finetune_encoder_lr_scale']:g}x the learning rate of their new head; "
              "the whole config: `results.json` (`config`).",
              f"Values: mean over repeats; CI: {results['ci']}.",
              "Time per task: " + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("seconds", {}).items()), ""]
    lines += [f"- Figure: `{name}`" for name in results.get("figures", [])]
    lines += ["- Fine-tune and scratch runs (TensorBoard): `tensorboard --logdir runs` in this directory"]
    lines += [*task_sections(results), ""]
    return "\n".join(lines)


def task_sections(results: dict) -> list[str]:
    """Markdown of every task of the study, each written by its registered task (a task no longer registered:
    the generic table)."""
    lines = []
    for record in results.get("tasks", []):
        cells = [c for c in results["cells"] if c.get("task") == record["name"]]
        lines += ["", *DOWNSTREAM.get(record["name"], DownstreamTask).section(record, cells, results)]
    return lines


def _x(n, cells: list[dict]) -> float:
    """N on the x axis; `all` sits at twice the largest numeric N (its train count is in the table)."""
    if n != ALL:
        return float(n)
    return 2.0 * max((c["n_per_class"] for c in cells if c["n_per_class"] != ALL), default=1)


def efficiency_panels(results: dict) -> Figure | None:
    """One panel per task that asks for it: its headline metric against labels per class, CI bands."""
    records = [r for r in results.get("tasks", []) if r.get("efficiency_panel", True)]
    if not records:
        return None
    figure = Figure(figsize=(4.6 * len(records), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    for i, record in enumerate(records):
        axes = figure.add_subplot(1, len(records), i + 1)
        cells = [c for c in results["cells"] if c.get("task") == record["name"]]
        metric = (record["metrics"] or sorted({k for c in cells for k in c["mean"]}) or ["-"])[0]
        lines = sorted({(c["method"], c["model"]) for c in cells})
        for k, (method, model) in enumerate(lines):
            rows = sorted((c for c in cells if (c["method"], c["model"]) == (method, model)),
                          key=lambda c: _x(c["n_per_class"], cells))
            x = [_x(c["n_per_class"], cells) for c in rows]
            axes.plot(x, [c["mean"].get(metric, math.nan) for c in rows], marker="o", color=f"C{k % 10}",
                      linestyle=STYLES.get(method, "-"), label=f"{model} {method}")
            axes.fill_between(x, [c["ci_low"].get(metric, math.nan) for c in rows],
                              [c["ci_high"].get(metric, math.nan) for c in rows], color=f"C{k % 10}", alpha=0.12,
                              linewidth=0)
        axes.set_xscale("log")
        better = "higher" if record["higher_is_better"] else "lower"
        axes.set(xlabel="labels per class (all: rightmost)", ylabel=f"{metric} ({better} is better)",
                 title=record["name"])
        axes.legend(fontsize="x-small")
    return figure
