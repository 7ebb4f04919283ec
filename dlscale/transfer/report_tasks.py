"""The downstream tasks' part of a transfer report: one table per task (encoder x method x N, each metric with
its CI, the published anchors in their own column), a label-efficiency panel per task, and each task's figures."""
from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlscale.transfer.subsets import ALL

STYLES = {"probe": "-", "random": "-.", "bicubic": ":", "finetune": "--", "scratch": ":"}


def task_record(task) -> dict:
    """What results.json says about a task: what it needs, how it is scored, its metrics and anchors."""
    return {"name": task.name, "needs": task.needs, "note": task.note, "metrics": list(task.metrics),
            "higher_is_better": task.higher_is_better,
            "anchors": [{"metric": a.metric, "value": a.value, "model": a.model, "source": a.source}
                        for a in task.anchors]}


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci(cell: dict, key: str) -> str:
    return f"{_f(cell['mean'].get(key))} ({_f(cell['ci_low'].get(key))}-{_f(cell['ci_high'].get(key))})"


def anchor_text(record: dict) -> str:
    return "; ".join(f"{a['model']} {a['metric']} {a['value']:g}" for a in record["anchors"]) or "-"


def task_table(record: dict, cells: list[dict]) -> list[str]:
    """| labels/class | method | encoder | repeats | n_train | metric (95% CI)... | anchor (other data) |"""
    metrics = record["metrics"] or sorted({k for c in cells for k in c["mean"]})
    header = "| labels/class | method | encoder | repeats | train images | " + \
        " | ".join(f"{m} (95% CI)" for m in metrics) + " | anchor (other data) |"
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    anchors = anchor_text(record)
    for c in cells:
        rows.append(f"| {c['n_per_class']} | {c['method']} | {c['model']} | {len(c['repeats'])} | {c['n_train']} | "
                    + " | ".join(_ci(c, m) for m in metrics) + f" | {anchors} |")
    return rows


def task_sections(results: dict) -> list[str]:
    """Markdown of every non-classification task: what it does, its table, its anchors' sources."""
    lines = []
    for record in results.get("tasks", []):
        if record["name"] == "classification":
            continue
        cells = [c for c in results["cells"] if c.get("task") == record["name"]]
        lines += ["", f"## Task: {record['name']}", "", f"{record['note'] or record['name']}. Needs: "
                  f"{record['needs']}.", "", *task_table(record, cells), ""]
        for source in dict.fromkeys(a["source"] for a in record["anchors"]):
            lines.append(f"- Anchor source: {source}. The datasets differ from this study's: read the anchors as "
                         "orders of magnitude, not as a ranking.")
    return lines


def _x(n, cells: list[dict]) -> float:
    """N on the x axis; `all` sits at twice the largest numeric N (its train count is in the table)."""
    if n != ALL:
        return float(n)
    return 2.0 * max((c["n_per_class"] for c in cells if c["n_per_class"] != ALL), default=1)


def efficiency_panels(results: dict) -> Figure | None:
    """One panel per non-classification task: its headline metric against labels per class, CI bands."""
    records = [r for r in results.get("tasks", []) if r["name"] != "classification"]
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
