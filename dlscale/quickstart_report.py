"""The quickstart's report.md: the stages next to the seed's numbers, the label-efficiency study, the figures, and
a "what this shows" paragraph written from the measured numbers and their confidence intervals."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dlscale import io
from dlscale.data.classes import CLASSES
from dlscale.figures import save_reliability, save_roc

PROBE_GOAL = 0.93          # linear-probe macro AUC of the pretrained encoder at 100 labels per class
SUPERVISED_GOAL = 0.95     # macro AUC of the supervised baseline on the demo's validation split

# The notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class), by its stage; our
# pretraining step stands where its autoencoder stood.
SEED_STAGE = {"pretrain": "autoencoder", "supervised": "supervised", "multitask": "multitask"}
SEED_RESULTS = {
    "autoencoder": {"probe/accuracy": 0.34},
    "supervised": {"accuracy": 0.62, "auc_macro": 0.81},
    "multitask": {"accuracy": 0.68, "auc_macro": 0.85, "auc/no_sub": 0.915, "auc/cdm": 0.807, "auc/axion": 0.840},
}


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def encoder_text(run_dir: Path) -> str:
    """"small CNN width 16 (0.10M)": the row's encoder and its parameter count."""
    payload = torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=True)
    c = payload["encoder_config"]
    n = sum(v.numel() for k, v in payload["state_dict"].items() if torch.is_tensor(v) and "running" not in k
            and "num_batches" not in k)
    name = {"small": f"small CNN width {c.get('width')}", "resnet18": "ResNet18" + (" 3x3 stem" if c.get(
        "small_input_stem") else "")}.get(c["name"], c["name"])
    return f"{name} ({n / 1e6:.2f}M)"


def stage_rows(out: Path, scale) -> tuple[list[str], dict]:
    header = ("| run | stage | encoder (parameters) | accuracy | ECE | macro AUC (95% CI) | "
              + " | ".join(f"AUC {c}" for c in CLASSES) + " | probe acc | probe AUC | recon MSE |")
    rows, metrics, curves = [header, "|" + "---|" * (header.count("|") - 1)], {}, {}
    for step in scale.steps:
        m = io.read_json(out / step.name / "metrics.json")
        metrics[step.name] = m
        ci = f" ({_f(m.get('val/auc_macro_ci_low'))}-{_f(m.get('val/auc_macro_ci_high'))})" \
            if m.get("val/auc_macro") is not None else ""
        rows.append(f"| dlscale {step.name} | {step.stage} | {encoder_text(out / step.name)} | "
                    f"{_f(m.get('val/accuracy'))} | {_f(m.get('val/ece'))} | {_f(m.get('val/auc_macro'))}{ci} | "
                    + " | ".join(_f(m.get(f"val/auc/{c}")) for c in CLASSES)
                    + f" | {_f(m.get('probe/accuracy'))} | {_f(m.get('probe/auc_macro'))} | "
                    f"{_f(m.get('val/recon_mse'), 5)} |")
        seed_stage = SEED_STAGE.get(step.name, step.name)
        seed = SEED_RESULTS.get(seed_stage, {})
        rows.append(f"| seed {seed_stage} | {seed_stage} | ResNet18 (11.2M) | {_f(seed.get('accuracy'))} | - | "
                    f"{_f(seed.get('auc_macro'))} | " + " | ".join(_f(seed.get(f"auc/{c}")) for c in CLASSES)
                    + f" | {_f(seed.get('probe/accuracy'))} | - | - |")
        scores = out / step.name / "scores_val.npz"
        if scores.is_file():
            with np.load(scores) as z:
                if "probs" in z:
                    curves[step.name] = (z["probs"], z["labels"])
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


def findings(metrics: dict, transfer: dict) -> list[str]:
    """Sentences from the numbers: which stage wins and by how much, whether each goal is met."""
    lines = []
    sup, mt = metrics.get("supervised", {}), metrics.get("multitask", {})
    (a, a_lo, a_hi), (b, b_lo, b_hi) = _interval(mt), _interval(sup)
    if all(math.isfinite(v) for v in (a, b)):
        if a_lo > b_hi:
            verdict = "beats supervised: the 95% CIs do not overlap"
        elif b_lo > a_hi:
            verdict = "falls below supervised: the 95% CIs do not overlap (the seed's claim is not reproduced)"
        else:
            verdict = "and supervised agree within their 95% CIs"
        lines.append(f"- Multi-task {verdict} (macro AUC {_f(a)} [{_f(a_lo)}-{_f(a_hi)}] vs {_f(b)} "
                     f"[{_f(b_lo)}-{_f(b_hi)}], difference {a - b:+.3f}).")
        lines.append(f"- Supervised baseline: macro AUC {_f(b)}; goal >= {SUPERVISED_GOAL}: "
                     f"{'met' if b >= SUPERVISED_GOAL else '**not met**'}.")
    n = 100 if _cell(transfer, "probe", 100) else None
    if n is not None:
        probe, fine, scratch, random = (_cell(transfer, m, n) for m in ("probe", "finetune", "scratch", "random"))
        p = probe["mean"]["auc_macro"]
        lines.append(f"- At {n} labels per class the pretrained encoder's linear probe reaches macro AUC {_auc(probe)}"
                     f"; goal >= {PROBE_GOAL}: {'met' if p >= PROBE_GOAL else '**not met**'}; the random-init "
                     f"control probe gives {_auc(random)}.")
        if fine and scratch:
            f_lo, s_hi = fine["ci_low"]["auc_macro"], scratch["ci_high"]["auc_macro"]
            gap = fine["mean"]["auc_macro"] - scratch["mean"]["auc_macro"]
            word = ("beats scratch (CIs do not overlap)" if f_lo > s_hi else
                    "is above scratch, within the CIs" if gap > 0 else "does **not** beat scratch")
            lines.append(f"- Fine-tuned from the pretrained encoder with {n} labels per class it {word}: "
                         f"{_auc(fine)} vs {_auc(scratch)} ({gap:+.3f}).")
    return lines


def downstream_section(out: Path, results: dict | None) -> list[str]:
    """The cheap downstream tasks (frozen pretrained encoder, one N): their tables and what they cost."""
    if not results:
        return []
    from dlscale.transfer.report_tasks import task_sections
    return ["## Downstream tasks of the pretrained encoder (frozen features)", "",
            "Regression, anomaly detection and 2x super-resolution on the frozen encoder at one N (`dlscale "
            "transfer --tasks regression,anomaly,superres --methods probe`); its cost on this machine is logged and "
            f"kept as `seconds` in `{out / 'downstream' / 'results.json'}` (this report stays reproducible); full "
            f"study: `{out / 'downstream' / 'report.md'}`.",
            *task_sections(results), ""]


def write_report(out: Path, data: Path, scale, transfer: dict, downstream: dict | None = None) -> Path:
    from dlscale.transfer.report import table
    manifest = io.read_json(data / "manifest.json")
    rows, metrics = stage_rows(out, scale)
    val, source = manifest["splits"]["val"], manifest["source"]
    lines = [
        "# dlscale quickstart report", "",
        f"Data: simulated `{source.get('preset')}` images {'x'.join(map(str, manifest['image_shape']))}, "
        f"{manifest['splits']['train']['samples']} train / {val['samples']} validation samples "
        f"({', '.join(f'{c} {n}' for c, n in val['class_counts'].items())} in validation), seed {source.get('seed')}."
        " Every metric on the whole validation split; probe = logistic regression on the frozen encoder's features;"
        " CI = 95% bootstrap interval.", "",
        "## What this shows", "", *findings(metrics, transfer), "",
        "## Stages", "", *rows, "",
        "Seed rows: the notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class, "
        "ResNet18). **The datasets differ**, so the rows are a reference point, not a like-for-like comparison.", "",
        f"- ROC curves, stages overlaid: `{out / 'roc.png'}`; reliability diagram (ECE: 15 bins of the max "
        f"probability): `{out / 'reliability.png'}`",
        f"- TensorBoard: `tensorboard --logdir {out}` (one run per stage)",
        f"- Exported encoders: `{out / 'pretrain' / 'encoder.pt'}`, `{out / 'multitask' / 'encoder.pt'}` -> "
        "`dlscale.load_encoder(path)`", "",
        "## Label efficiency of the pretrained encoder", "",
        f"`dlscale transfer` on `{out / 'pretrain'}`: {transfer.get('ci', '')}.", "", *table(transfer), "",
        f"- Figure: `{out / 'label_efficiency' / 'label_efficiency.png'}` (macro AUC vs labels per class)",
        f"- Full study: `{out / 'label_efficiency' / 'report.md'}`", "", *downstream_section(out, downstream)]
    report = out / "report.md"
    io.write_text(report, "\n".join(lines))
    return report
