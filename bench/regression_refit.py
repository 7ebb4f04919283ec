"""How far a finished regression run's linear head is from the best linear head on its final features: the head refitted
by least absolute deviations (scikit-learn's median `QuantileRegressor`, the MAE's own loss) on the eval-mode
features of the run's train images, each averaged over the 8 dihedral views when the run scores with TTA, and both
heads scored on the eval split (nothing of it is fitted there).

    python bench/regression_refit.py --run-dir RUN [--n-bootstrap 1000]   # prints JSON

The head was trained on training-mode features (batch statistics, one random view per image); after precise
BatchNorm statistics and with TTA the features it is applied to differ a little, which shows as a constant offset of
its predictions on the train images themselves. MAE with a 95% CI of the bootstrap over the eval images, bias, R^2,
and the paired reduction of the MAE with its CI; for one target (the run's first).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from sklearn.linear_model import QuantileRegressor
from sklearn.metrics import r2_score

from dlscale.data.stream import eval_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import dihedral_views
from dlscale.models.heads import global_pool
from dlscale.train.evaluation import load_run


def features(model, data_dir: str, stream: StreamConfig, split: str, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """(pooled eval-mode encoder features, averaged over the dihedral views if `tta`; the first target)."""
    feats, targets = [], []
    with torch.no_grad():
        for batch in eval_loader(data_dir, stream, split=split):
            views = dihedral_views(batch["image"]) if tta else [batch["image"]]
            feats.append(torch.stack([global_pool(model.encoder(v)) for v in views]).mean(0).double())
            targets.append(batch["target"][:, 0].double())
    return torch.cat(feats).numpy(), torch.cat(targets).numpy()


def scores(pred: np.ndarray, truth: np.ndarray, draws: list[np.ndarray]) -> dict:
    err = np.abs(pred - truth)
    boots = [err[i].mean() for i in draws]
    return {"mae": float(err.mean()), "ci": [float(x) for x in np.percentile(boots, [2.5, 97.5])],
            "bias": float((pred - truth).mean()), "r2": float(r2_score(truth, pred))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run with a regression head")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    cfg, model, info = load_run(args.run_dir)
    model.eval()
    target = info["targets"][0]
    tta = cfg.model.task_options["regression"].tta
    stream = StreamConfig(batch_size=200, num_workers=0, normalize=cfg.data.normalize, augment=False,
                          targets=[target])
    train_x, train_y = features(model, cfg.data_dir, stream, "train", tta)
    eval_x, eval_y = features(model, cfg.data_dir, stream, cfg.eval.split, tta)
    head = model.heads["regression"].linear
    mean, std = info["target_stats"]["mean"][0], info["target_stats"]["std"][0]
    trained = (eval_x @ head.weight[0].detach().double().numpy() + float(head.bias[0].detach())) * std + mean
    refit = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(train_x, train_y).predict(eval_x)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(eval_y), len(eval_y)) for _ in range(args.n_bootstrap)]
    gain = np.abs(trained - eval_y) - np.abs(refit - eval_y)
    print(json.dumps({"run_dir": args.run_dir, "target": target, "tta": tta, "n_train": len(train_y),
                      "n_eval": len(eval_y), "trained_head": scores(trained, eval_y, draws),
                      "refitted_head": scores(refit, eval_y, draws),
                      "mae_reduction": {"mean": float(gain.mean()),
                                        "ci": [float(x) for x in np.percentile([gain[i].mean() for i in draws],
                                                                               [2.5, 97.5])]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
