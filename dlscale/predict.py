"""`dlscale predict`: a trained model on new images -> OUT/predictions.csv (+ embeddings.npy, rejected.json).

    dlscale predict --run runs/mt --data new_images/ --out preds/ [--embeddings] [--resize] [--skip-bad]

With a finished run directory (model.pt + config.yaml) the whole model is rebuilt (`load_run`): class
probabilities, the regression targets in physical units, and, where the run has a reconstruction (or MAE) head, an
anomaly score (its per-image reconstruction error). With a bare exported encoder (encoder.pt, encoder.safetensors /
encoder.json) there are no heads: only embeddings, which are then always written.

Every local rank scores its share (`dlscale.predict_inputs` fixes the work items and their order), each image
exactly once; rank 0 writes the outputs, each atomically, and only when every image was scored or, with
`skip_bad`, rejected and listed. A bad input stops the run naming it before anything is written.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io as text_io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from dlscale import io
from dlscale.configtree import commented_yaml, load_dataclass, parse_with_overrides
from dlscale.data.classes import CLASSES, SPLITS
from dlscale.data.deeplense import BadFileError
from dlscale.data.records import worker_start
from dlscale.distributed import DistInfo, dist_info, setup_logging
from dlscale.models.heads import global_pool
from dlscale.predict_inputs import (Preprocess, PredictStream, file_items, is_shard_dataset, list_files,
                                    open_shards, shard_items)
from dlscale.export import load_encoder
from dlscale.train.deepspeed_setup import init_distributed, pick_device, prepare_process
from dlscale.train.evaluation import load_run

log = logging.getLogger(__name__)
ANOMALY_TASKS = ("recon", "mae")    # per-image reconstruction error: the anomaly score, in this order of preference
SHOWN_REJECTS = 5
DEVICES = ("auto", "cpu", "cuda")
LAYOUTS = ("auto", "common-test", "model", "model-iv")
PREVIEWS = 4                        # PNG previews of made images (super-resolution)


@dataclass
class PredictConfig:
    """One `dlscale predict` call (`--print-config` prints it, `--config` reads it back)."""
    model: str = ""                # a finished run directory, or an exported encoder (file or its directory)
    data: str = ""                 # shard dataset, DeepLense folder, folder of .npy files, one .npy or a glob
    out: str = ""                  # output directory
    split: str | None = None       # shard datasets: one split (default: every split)
    layout: str = "auto"           # DeepLense folders: as `dlscale pack --layout` (auto, common-test, model, model-iv)
    embeddings: bool = False       # also write OUT/embeddings.npy (always, for a bare encoder)
    resize: bool = False           # resize images of another size to the model's instead of refusing them
    skip_bad: bool = False         # leave bad inputs out, listed in OUT/rejected.json, instead of stopping
    batch_size: int = 64
    num_workers: int = 2           # DataLoader reader processes per rank
    device: str = "auto"           # auto | cpu | cuda
    progress: bool = True          # progress bar on rank 0

    def validate(self, complete: bool = True) -> "PredictConfig":
        """Check every value; `complete`: the inputs too (model, data, out), which a printed template may lack."""
        if complete and not (self.model and self.data and self.out):
            raise ValueError("model (--run), data (--data) and out (--out) are required")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size={self.batch_size}, num_workers={self.num_workers}: expected >= 1 and >= 0")
        for key, value, allowed in (("split", self.split, (None, *SPLITS)), ("device", self.device, DEVICES),
                                    ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(str(a) for a in allowed)}")
        return self


@dataclass
class Predictor:
    """The model side: a run's whole model (`heads`) or a bare encoder, and how images are prepared for it."""
    model: torch.nn.Module
    prep: Preprocess
    heads: tuple[str, ...] = ()                 # the scored tasks of a run: classification, regression, recon, mae
    targets: tuple[str, ...] = ()
    anomaly: str | None = None
    imagers: tuple[str, ...] = ()               # tasks that make images from the input (super-resolution)

    @property
    def is_run(self) -> bool:
        return isinstance(getattr(self.model, "task_specs", None), dict)


@dataclass
class Predictions:
    """Gathered outputs in output order; `rejected` [(source, reason)] in the order found."""
    sources: list[str]
    arrays: dict[str, np.ndarray]
    rejected: list[tuple[str, str]] = field(default_factory=list)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.pt").is_file() and (path / "config.yaml").is_file()


def load_predictor(path: Path) -> Predictor:
    """A run directory's whole model, or an exported encoder (embeddings only: it has no heads)."""
    path = Path(path)
    if is_run_dir(path):
        cfg, model, info = load_run(path)
        imagers = tuple(t for t, spec in model.task_specs.items() if spec.output_images)
        shape = tuple(info["image_shape"])
        if imagers:    # its inputs: what the task makes images from (low-resolution images for super-resolution)
            shape = model.task_specs[imagers[0]].input_shape(shape)
        prep = Preprocess(shape, cfg.data.normalize,
                          resize_mode=(info.get("data") or {}).get("resize_mode") or "interpolate")
        heads = tuple(t for t in model.task_specs if t in ("classification", "regression", *ANOMALY_TASKS))
        anomaly = next((t for t in ANOMALY_TASKS if t in heads), None)
        return Predictor(model.eval(), prep, heads, tuple(cfg.data.targets) if "regression" in heads else (), anomaly,
                         imagers)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run directory or exported encoder")
    encoder = load_encoder(path)
    meta = encoder.dlscale
    prep = Preprocess(tuple(meta["image_shape"]), meta.get("normalize", "minmax"),
                      resize_mode=(meta.get("data") or {}).get("resize_mode") or "interpolate")
    return Predictor(encoder, prep)


@torch.no_grad()
def score(predictor: Predictor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image outputs of one batch: `features` always, and for a run `probs`, `regression` (physical units) and
    `anomaly` as its heads allow. Only the encoder and these heads run (no views, no training draws)."""
    model = predictor.model
    if not predictor.is_run:
        return {"features": global_pool(model(images))}
    if predictor.imagers:      # inputs of another shape than the encoder's: only the image-making tasks run
        return {model.task_specs[name].output_images: model.task_specs[name].make_images(model.heads[name], images,
                                                                                         model)
                for name in predictor.imagers}
    feature_map = model.encoder(images)
    rows, out = {"features": global_pool(feature_map)}, {}
    for name in predictor.heads:
        out.update(model.task_specs[name].forward(model.heads[name], feature_map, images, None, model))
    if "logits" in out:
        rows["probs"] = torch.softmax(out["logits"].float(), dim=1)
    if "regression" in out:
        mean, std = model.task_specs["regression"]._stats(out["regression"].device)
        rows["regression"] = out["regression"].float() * std + mean
    if predictor.anomaly is not None:
        rows["anomaly"] = next(iter(model.task_specs[predictor.anomaly].collect(out, images, {}).values()))
    return rows


def plan(cfg: PredictConfig, prep: Preprocess) -> tuple[list, dict, int]:
    """(work items, ShardSets by split, images in the source) for `cfg.data`."""
    src = Path(cfg.data)
    if is_shard_dataset(src):
        shards = open_shards(src, cfg.split, cfg.batch_size)
        stored = next(iter(shards.values())).image_shape
        if stored != prep.image_shape and not (cfg.resize and stored[0] == prep.image_shape[0]):
            raise ValueError(f"{src}: images {list(stored)}, the model expects {list(prep.image_shape)}"
                             + ("; pass --resize to resize them" if stored[0] == prep.image_shape[0] else ""))
        return shard_items(shards), shards, sum(s.num_samples for s in shards.values())
    if cfg.split is not None:
        raise ValueError(f"--split {cfg.split}: {src} is not a shard dataset (no manifest.json); it applies to those")
    files = list_files(cfg.data, cfg.layout)
    return file_items(files, cfg.batch_size), {}, len(files)


def run_rank(predictor: Predictor, stream: PredictStream, cfg: PredictConfig, device: torch.device,
             rank_images: int, show: bool) -> tuple[dict, str | None]:
    """This rank's outputs (keys, sources, arrays, rejected) and its error, if any (raised after the gather, on every
    rank, so no rank waits forever). Stops at the first bad input unless `skip_bad`."""
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=4 if cfg.num_workers
                        else None, multiprocessing_context=worker_start(cfg.num_workers))
    parts: dict[str, list] = {"keys": [np.zeros((0, 3), np.int64)]}
    sources, rejected = [], []
    want_features = cfg.embeddings or not predictor.is_run
    try:
        with tqdm(total=rank_images, unit="img", desc="predict", disable=not show) as bar:
            for batch in loader:
                rejected += batch["rejected"]
                bar.update(len(batch["sources"]) + len(batch["rejected"]))
                if batch["rejected"] and not cfg.skip_bad:
                    break
                if not len(batch["sources"]):
                    continue
                rows = score(predictor, batch["image"].to(device, torch.float32, non_blocking=True))
                rows = {k: v for k, v in rows.items() if k != "features" or want_features}
                for key, value in rows.items():
                    parts.setdefault(key, []).append(value.float().cpu().numpy())
                parts["keys"].append(batch["keys"].numpy())
                sources += batch["sources"]
    except Exception as err:   # noqa: BLE001 - reported on every rank after the gather
        return {}, f"rank {stream.rank}: {type(err).__name__}: {err}"
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return {"arrays": arrays, "sources": sources, "rejected": rejected}, None


def gather_predictions(mine: dict, error: str | None, world: int) -> Predictions:
    """Every rank's outputs on every rank, in key order (so the same on any number of ranks and workers); an error
    of any rank raises on all of them."""
    parts = [(mine, error)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, error))
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise RuntimeError("prediction failed: " + "; ".join(errors))
    return merge([p for p, _ in parts])


def merge(parts: list[dict]) -> Predictions:
    """Ranks' outputs as one, sorted by key (item, record, position); a rank that scored nothing has keys only."""
    names = sorted({k for p in parts for k in p["arrays"]})
    arrays = {k: np.concatenate([p["arrays"][k] for p in parts if k in p["arrays"]]) for k in names}
    sources = [s for p in parts for s in p["sources"]]
    order = np.lexsort(arrays["keys"].T[::-1])
    return Predictions([sources[i] for i in order], {k: v[order] for k, v in arrays.items()},
                       sorted((r for p in parts for r in p["rejected"]), key=lambda r: r[0]))


def check_complete(result: Predictions, cfg: PredictConfig, total: int, from_shards: bool) -> None:
    """Stop on rejected inputs (without `skip_bad`), and on any image scored twice or never."""
    if result.rejected and not cfg.skip_bad:
        shown = "\n  ".join(reason for _, reason in result.rejected[:SHOWN_REJECTS])
        more = f"\n  ... and {len(result.rejected) - SHOWN_REJECTS} more" if len(result.rejected) > SHOWN_REJECTS \
            else ""
        raise BadFileError(f"{len(result.rejected)} input(s) could not be scored:\n  {shown}{more}\n(nothing was "
                           "written; pass --skip-bad to leave bad inputs out and list them in rejected.json)")
    keys = result.arrays["keys"]
    if len(np.unique(keys, axis=0)) != len(keys):
        raise RuntimeError("an image was scored twice: the work items overlap")
    lost = total - len(keys) - (0 if from_shards else len(result.rejected))
    if lost and not (from_shards and result.rejected):
        raise RuntimeError(f"scored {len(keys)} of {total} images ({len(result.rejected)} rejected): some were "
                           "never read")


def predict(cfg: PredictConfig, info: DistInfo) -> tuple[Predictions, Predictor]:
    """Score `cfg.data` with `cfg.model` on every rank; rank 0 writes OUT. Returns the gathered predictions."""
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out}: is an existing file, expected a directory to write predictions.csv into "
                         "(the file is left as it is)")
    predictor = load_predictor(Path(cfg.model))
    if not predictor.is_run and not cfg.embeddings:
        log.warning("%s is a bare encoder: it has no heads, so only embeddings are available; writing "
                    "embeddings.npy (a run directory gives class probabilities too)", cfg.model)
        cfg = dataclasses.replace(cfg, embeddings=True)
    prep = Preprocess(predictor.prep.image_shape, predictor.prep.normalize, cfg.resize, predictor.prep.resize_mode)
    items, shards, total = plan(cfg, prep)
    device = pick_device(cfg.device)
    if info.world > 1:
        prepare_process(cfg.device)
        init_distributed(info, device)
    stream = PredictStream(items, shards, prep, cfg.batch_size, info.rank, info.world)
    rank_images = sum(item.size(shards) for item in stream.rank_items(cfg.num_workers))
    log.info("predicting %d images of %s with %s on %d rank(s)", total, cfg.data, cfg.model, info.world)
    predictor.model.to(device)
    predictor.prep = prep
    mine, error = run_rank(predictor, stream, cfg, device, rank_images, cfg.progress and info.is_main)
    result = gather_predictions(mine, error, info.world)
    check_complete(result, cfg, total, bool(shards))
    if info.is_main:
        write_outputs(cfg, predictor, result)
    return result, predictor


def csv_text(predictor: Predictor, result: Predictions) -> str:
    """predictions.csv: source, prob_<class>..., predicted, the regression targets, anomaly_score."""
    arrays = result.arrays
    header = ["source"]
    columns: list[np.ndarray] = []
    if "probs" in arrays:
        header += [f"prob_{c}" for c in CLASSES] + ["predicted"]
        columns += [arrays["probs"][:, k] for k in range(len(CLASSES))]
    if "regression" in arrays:
        header += list(predictor.targets)
    if "anomaly" in arrays:
        header.append("anomaly_score")
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, source in enumerate(result.sources):
        row = [source]
        if "probs" in arrays:
            row += [f"{p:.9g}" for p in arrays["probs"][i]] + [CLASSES[int(arrays["probs"][i].argmax())]]
        if "regression" in arrays:
            row += [f"{v:.9g}" for v in arrays["regression"][i]]
        if "anomaly" in arrays:
            row.append(f"{arrays['anomaly'][i]:.9g}")
        writer.writerow(row)
    return buffer.getvalue()


def write_outputs(cfg: PredictConfig, predictor: Predictor, result: Predictions) -> None:
    """embeddings.npy and rejected.json first, predictions.csv last, each atomically: a reader that finds the CSV
    finds the rest of this call's outputs beside it, and none of an earlier call's (removed first)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, written in (("embeddings.npy", cfg.embeddings), ("rejected.json", cfg.skip_bad)):
        if not written:
            (out / name).unlink(missing_ok=True)
    if cfg.embeddings:
        features = result.arrays.get("features", np.zeros((0, 0), np.float32))
        io.atomic_write(out / "embeddings.npy", lambda f: np.save(f, features))
    for name in predictor.imagers:
        write_images(out, predictor.model.task_specs[name].output_images, result)
    if cfg.skip_bad:
        io.write_json(out / "rejected.json", {"count": len(result.rejected), "rejected": [
            {"source": source, "reason": reason} for source, reason in result.rejected]})
    io.write_text(out / "predictions.csv", csv_text(predictor, result))


def write_images(out: Path, name: str, result: Predictions) -> None:
    """OUT/<name>.npy (N, C, H', W'), rows in CSV order, and PNG previews of the first PREVIEWS (first channel)."""
    from matplotlib import pyplot
    images = result.arrays[name]
    io.atomic_write(out / f"{name}.npy", lambda f: np.save(f, images))
    for i, image in enumerate(images[:PREVIEWS]):
        io.atomic_write(out / f"{name}_{i}.png", lambda f, image=image: pyplot.imsave(f, image[0], cmap="magma",
                                                                                   format="png"))


def summary(predictor: Predictor, result: Predictions, cfg: PredictConfig) -> str:
    """What the call wrote, with one line per class (images predicted, mean probability) where the model has a
    classifier."""
    n, features = len(result.sources), result.arrays.get("features")
    lines = [f"scored {n} images -> {cfg.out}/predictions.csv"
             + (f" (+ embeddings.npy, {features.shape[1]} features per image)" if features is not None else "")]
    if result.rejected:
        lines.append(f"rejected {len(result.rejected)} inputs, listed in {cfg.out}/rejected.json")
    for name in predictor.imagers:
        made = predictor.model.task_specs[name].output_images
        lines.append(f"  {made}: {cfg.out}/{made}.npy {list(result.arrays[made].shape)} (+ {made}_<i>.png previews)")
    if "probs" in result.arrays:
        predicted = result.arrays["probs"].argmax(1)
        for k, name in enumerate(CLASSES):
            count = int((predicted == k).sum())
            lines.append(f"  {name:<8} {count:>8} predicted ({100 * count / max(n, 1):5.1f}%), mean "
                         f"prob_{name} {result.arrays['probs'][:, k].mean() if n else float('nan'):.3f}")
    elif not predictor.is_run:
        lines.append("  a bare encoder has no heads: embeddings only (pass a run directory for class probabilities)")
    else:
        lines.append(f"  this run has no classification head (tasks {', '.join(predictor.model.task_specs)})")
    return "\n".join(lines)


FLAGS = {   # a flag's argparse name -> (config key, how its text becomes the key's value)
    "run": ("model", str), "data": ("data", str), "out": ("out", str), "split": ("split", str),
    "layout": ("layout", str), "batch_size": ("batch_size", int), "workers": ("num_workers", int),
    "device": ("device", str)}
SWITCHES = {"embeddings": ("embeddings", True), "resize": ("resize", True), "skip_bad": ("skip_bad", True),
            "no_progress": ("progress", False)}   # a switch given -> (config key, its value)


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale predict", description="Score new images with a trained model: "
                                "OUT/predictions.csv (+ embeddings.npy). Runs on every local rank of torchrun / "
                                "deepspeed; the output does not depend on their number. Every key of the config "
                                "can also be set as --key=value or in a YAML file (--config); --print-config lists "
                                "them.")
    p.add_argument("--run", "--run-dir", dest="run", help="finished run directory (class probabilities, regression, "
                   "anomaly score) or exported encoder: encoder.pt / .safetensors / .json (embeddings). Under torchrun "
                   "spell it --run-dir: torchrun takes --run for its --run-path = model")
    p.add_argument("--data", help="shard dataset, DeepLense folder (any layout dlscale pack reads), folder of .npy "
                   "files, one .npy file, or a quoted glob = data")
    p.add_argument("--out", help="output directory = out")
    p.add_argument("--split", help=f"shard datasets: this split only ({', '.join(SPLITS)}; default: every split)")
    p.add_argument("--layout", help=f"DeepLense folders: {', '.join(LAYOUTS)} (default auto)")
    p.add_argument("--embeddings", action="store_true", help="also write OUT/embeddings.npy (rows as in the CSV)")
    p.add_argument("--resize", action="store_true", help="resize images of another size to the model's")
    p.add_argument("--skip-bad", action="store_true", help="leave bad inputs out, listed in OUT/rejected.json")
    p.add_argument("--batch-size", help="images per batch (default 64)")
    p.add_argument("--workers", help="reader processes per rank (default 2) = num_workers")
    p.add_argument("--device", help=f"{', '.join(DEVICES)} (default auto)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML config file (what --print-config prints)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, each key's "
                   "meaning as a comment beside it, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    a, rest = parse_with_overrides(p, argv)
    given = {key: convert(getattr(a, name)) for name, (key, convert) in FLAGS.items() if getattr(a, name) is not None}
    given.update({key: value for name, (key, value) in SWITCHES.items() if getattr(a, name)})
    cfg = load_dataclass(PredictConfig(), a.config, rest, **given).validate(complete=not a.print_config)
    if a.print_config:
        print(commented_yaml(cfg), end="")
        return 0
    info = dist_info(a.local_rank)
    setup_logging(info.rank)
    result, predictor = predict(cfg, info)
    if info.is_main:
        print(summary(predictor, result, cfg), flush=True)
    return 0
