"""Scoring a model over a split: per-sample outputs collected on each rank without gradients, then gathered once,
after the loop (ranks without samples take part too), in sample-id order, so the result does not depend on the
number of ranks or DataLoader workers."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

EXAMPLE_KEYS = ("examples", "recon_examples", "sr_examples")
"""Outputs holding a few shown images rather than one row per sample: rank 0's are kept as they are."""
TTA_FEATURES = "tta_features"
"""Pooled features averaged over the dihedral views of each image: what a head with test-time augmentation is
applied to (the regression head is linear), and what it is refitted to after training."""
FEATURE_KEYS = ("features", TTA_FEATURES)
"""Per-sample feature vectors: kept for the probes and head refits, left out of the scores files."""


def collect(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype,
            n_examples: int = 8, finish=None) -> dict[str, np.ndarray]:
    """Run `model` over `loader` without gradients; return this rank's per-sample outputs as numpy arrays.

    Keys: ids (N,3), labels, features, and whatever the model collects (`TaskModel.collect`: its tasks' probs,
    recon_mse, regression + target, ...); its first `n_examples` shown images (`TaskModel.examples`).
    `finish(batch)` puts a batch on the device (and transforms it there, see `data.transforms.finish_batch`).
    """
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            if finish is not None:
                batch = finish(batch)
            images = batch["image"].to(device, dtype, non_blocking=True)
            out = model(images)
            rows = {"ids": batch["ids"], "labels": batch["label"], "features": out["features"],
                    **model.collect(out, images, batch)}
            if seen < n_examples:
                rows.update({k: v[:n_examples - seen] for k, v in model.examples(out, images).items()})
            for key, value in rows.items():
                parts.setdefault(key, []).append(value.detach().float().cpu().numpy() if value.is_floating_point()
                                                 else value.cpu().numpy())
            seen += len(batch["label"])
    model.train(was_training)
    return {key: np.concatenate(values) for key, values in parts.items()}


def gather(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All ranks' arrays concatenated (one collective, after the loop; ranks without samples take part too),
    ordered by sample id so results do not depend on the world size. Examples stay those of rank 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        parts = [arrays]
    else:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, arrays)
    keys = sorted({k for p in parts for k in p if k not in EXAMPLE_KEYS})
    out = {k: np.concatenate([p[k] for p in parts if k in p]) for k in keys}
    if "ids" in out and len(out["ids"]):
        order = np.lexsort(out["ids"].T[::-1])
        out = {k: v[order] for k, v in out.items()}
    for k in EXAMPLE_KEYS:
        if k in parts[0]:
            out[k] = parts[0][k]
    return out
