"""Markdown pieces of a transfer report that every downstream task's section uses: numbers with their CI, the
published anchors, a task's table."""
from __future__ import annotations

import math


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def with_ci(cell: dict, key: str) -> str:
    """`mean (low-high)` of metric `key` of a results.json cell."""
    return f"{fmt(cell['mean'].get(key))} ({fmt(cell['ci_low'].get(key))}-{fmt(cell['ci_high'].get(key))})"


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
                    + " | ".join(with_ci(c, m) for m in metrics) + f" | {anchors} |")
    return rows
