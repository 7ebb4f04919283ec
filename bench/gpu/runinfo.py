"""Figures of a training run read from what `dlscale train` leaves behind: metrics.json, the TensorBoard scalars
under RUN/tb, and the log (RUN/log.txt, or the captured output of a run that never created its directory)."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

SPS_KEY = "throughput/samples_per_s"
WAIT_KEY = "throughput/data_wait_fraction"
LOG_LINE = re.compile(r"([\d.]+) samples/s, ([\d.]+)% waiting for data")
PEAK_MEMORY = re.compile(r"(?:peak|max)[ _](?:gpu[ _]|cuda[ _])?mem\w*[^\d\n]{0,24}([\d.]+)\s*(GiB|GB|MiB|MB)", re.I)
UNIT_MIB = {"gib": 1024.0, "gb": 1000 ** 3 / 2 ** 20, "mib": 1.0, "mb": 1000 ** 2 / 2 ** 20}
METRIC_KEYS = ("val/accuracy", "val/auc_macro", "val/recon_mse", "probe/accuracy", "probe/auc_macro", "step")


def tensorboard_scalars(tb_dir: Path, keys: tuple[str, ...]) -> dict[str, list[float]]:
    """Scalar series (in step order) from the event files under `tb_dir` that hold all of `keys` (the training
    windows; the hparams record repeats the final metrics, samples/s among them, at step 0); empty when none."""
    if not tb_dir.is_dir():
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if all(key in tags for key in keys):
            for key in keys:
                series.setdefault(key, []).extend((e.step, e.value) for e in acc.Scalars(key))
    return {key: [v for _, v in sorted(points)] for key, points in series.items()}


def steady(values: list[float]) -> float | None:
    """Median of a per-window series without its first window (start-up, cuDNN autotuning, first DataLoader
    fill), or the only value there is."""
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def run_figures(run_dir: Path, output: str, batch: int) -> dict:
    """samples/s (whole run and steady), data-wait fraction, step time, peak memory when the log states it, and
    the run's final metrics; each figure says where it came from."""
    figures: dict = {}
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        figures["samples_per_s"] = metrics.get(SPS_KEY)
        figures["metrics"] = {k: metrics[k] for k in METRIC_KEYS if k in metrics}
    scalars = tensorboard_scalars(run_dir / "tb", (SPS_KEY, WAIT_KEY))
    source = "tensorboard"
    if not scalars.get(SPS_KEY):
        log_file = run_dir / "log.txt"
        text = log_file.read_text(errors="replace") if log_file.is_file() else output
        pairs = [(float(a), float(b) / 100) for a, b in LOG_LINE.findall(text)]
        scalars = {SPS_KEY: [a for a, _ in pairs], WAIT_KEY: [b for _, b in pairs]}
        source = "log"
    if scalars.get(SPS_KEY):
        sps = steady(scalars[SPS_KEY])
        figures.update(samples_per_s_steady=sps, step_time_s=batch / sps if sps else None,
                       data_wait_fraction=steady(scalars.get(WAIT_KEY, [])), log_windows=len(scalars[SPS_KEY]),
                       throughput_source=source)
    log_file = run_dir / "log.txt"
    text = (log_file.read_text(errors="replace") if log_file.is_file() else "") + output
    peaks = [float(v) * UNIT_MIB[u.lower()] for v, u in PEAK_MEMORY.findall(text)]
    if peaks:
        figures.update(peak_memory_mib=max(peaks), peak_memory_source="log")
    return figures
