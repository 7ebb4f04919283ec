"""Training straight from the simulator: fresh lenses every step, nothing on disk, every batch reproducible.

`SimulationStream` stands in for the shard `TrainStream`: the same batch dict (`image` normalised and augmented,
`label`, `ids`, optional `target`), the same per-worker quota, `set_epoch`. A batch is a pure function of (seed,
epoch, global batch index), and rank r's i-th batch of an epoch is global batch i * world + r: ranks never share
images, a resumed run regenerates the same batches, and the images do not depend on the number of DataLoader workers
(worker w makes the rank's batches w, w + W, w + 2W, ..., which the DataLoader hands out in order). Generators come
from SeedSequence(seed, spawn_key=(STREAM_KEY, epoch, index)), a key `dlscale simulate` never uses, so the training
stream cannot repeat an evaluation set's images whatever the seeds.

Class balance, per batch of B images over the K classes: each class gets floor(B / K) images, and the B mod K
classes starting at class index (global batch index mod K) one more, so the remainder rotates and any K consecutive
global batches hold exactly equal counts. Each class is simulated as one sub-batch, then the batch is shuffled.

Several instruments (`data.simulator.mixture`) and nuisance parameters (`data.simulator.nuisance`) follow
`dlscale.sim.mixture`: each global batch is split among the components by their shares with a deterministic rule
(class counts as above), each component rendered at its own pixels and brought to one side (`data.resize`, else the
largest component's n_pix).

Regression targets are simulator metadata keys (`theta_E`, `e1`, `gamma1`, `exposure_time`, `substructure_mass`,
... as `dlscale simulate` writes them), or `log10_<key>` for a positive one. Every image of the mixed-class stream
needs a finite value, so keys that only one class has (`axion_mass`, `vortex_*`: None for no_sub and cdm) and
`log10_substructure_mass` (0 for no_sub) are refused when the stream is built, never mid-run.

Where it runs: on CPU in DataLoader workers of one torch thread each; on CUDA in the training process on the
training device (`simulation_loader` uses no workers there), so images never go through the host.

The fixed evaluation set is simulated once by `prepare_eval_set` into a standard shard dataset through the
`dlscale simulate` writer, so the evaluation code reads it unchanged; a mixture's (or one with nuisances) is drawn
from the same mixture and written at the stream's side (`dlscale.sim.mixture.write_mixture_set`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlscale.configtree import flatten, from_dict, plain, to_dict
from dlscale.data.classes import CLASSES
from dlscale.data.shards import MANIFEST, load_manifest
from dlscale.data.stream import make_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import transform
from dlscale.sim.config import SimulatorConfig, preset_config, preset_with_overrides
from dlscale.sim.mixture import (Mixture, MixtureComponent, NuisanceConfig, batch_generators, common_side,
                                 write_mixture_set)
from dlscale.sim.write import simulate

log = logging.getLogger(__name__)
STREAM_KEY = 0x51A57            # first spawn-key word of every training-stream batch seed
EVAL_BATCH_SIZE = 32            # simulation batch of the evaluation set: part of its identity, whatever the device
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SimulationSourceConfig:
    """Training images simulated on the fly (`data.simulator`); the preset and overrides are checked on load."""
    CONFIG_KEY: ClassVar[str] = "data.simulator"
    """Where its messages place it (`dlscale.configtree.rehomed` renames it for data.target.simulator)."""
    preset: str = "model_ii"
    """The simulator preset the overrides apply to: model_i | model_ii | model_iii."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Simulator keys over the preset (the fields of `dlscale.sim.SimulatorConfig`), dotted or as nested sections,
    e.g. {lens.randomize: true, instrument.n_pix: 32}; each is checked on load, an error names it.
    `--print-config` lists them all with the preset's values."""
    mixture: dict[str, MixtureComponent] = field(default_factory=dict)
    """Several instruments in one stream, name -> {preset, share, overrides}, in this order, e.g. {euclid: {preset:
    model_ii, share: 2}, hst: {preset: model_iii, share: 1}}; images brought to one side (data.resize, else the
    largest n_pix); see `dlscale.sim.mixture`. Empty: the single `preset` with `overrides`; with a mixture `preset`
    is unused and `overrides` must leave it unchanged."""
    nuisance: NuisanceConfig = field(default_factory=NuisanceConfig)
    """Nuisance parameters redrawn for every image within physical ranges, around every component's own values
    (off unless nuisance.enabled)."""
    device: str = "auto"
    """auto: the training device's type | cpu | cuda."""
    eval_per_class: int = 1000
    """Fixed evaluation set (val split), images per class."""
    probe_per_class: int = 500
    """Its train split for the linear probe; 0 = none."""
    eval_seed: int = 1_000_003
    """Seed of the evaluation set."""

    def __post_init__(self) -> None:
        if not isinstance(self.mixture, dict):
            raise ValueError(f"data.simulator.mixture = {self.mixture!r}: expected a mapping name -> {{preset, share, "
                             "overrides}}")
        self.mixture = {name: c if isinstance(c, MixtureComponent)
                        else from_dict(MixtureComponent, c, f"data.simulator.mixture.{name}.")
                        for name, c in self.mixture.items()}
        if isinstance(self.nuisance, dict):
            self.nuisance = from_dict(NuisanceConfig, self.nuisance, "data.simulator.nuisance.")
        self.validate()

    def validate(self) -> "SimulationSourceConfig":
        """Raise naming the `data.simulator.*` key that is wrong (run on construction and by `Config.validate`)."""
        if self.device not in DEVICES:
            raise ValueError(f"data.simulator.device={self.device!r}: expected one of {DEVICES}")
        if self.eval_per_class < 1 or self.probe_per_class < 0:
            raise ValueError(f"data.simulator.eval_per_class={self.eval_per_class} / probe_per_class="
                             f"{self.probe_per_class}: expected >= 1 / >= 0")
        resolved = self.simulator_config()
        for name, component in self.mixture.items():
            component.validate(f"data.simulator.mixture.{name}")
        if self.mixture and to_dict(resolved) != to_dict(preset_config(self.preset)):
            raise ValueError("data.simulator.overrides: not used with data.simulator.mixture; set them per component "
                             "(data.simulator.mixture.<name>.overrides) or draw them for all (data.simulator.nuisance)")
        self.nuisance.validate()
        return self

    def simulator_config(self) -> SimulatorConfig:
        """The preset with `overrides` over it, validated; an error names the offending key."""
        return preset_with_overrides(self.preset, self.overrides, "data.simulator")

    def components(self) -> list[tuple[str, float, SimulatorConfig]]:
        """(name, share, simulator config) of every instrument the stream draws from: the mixture's, else the one
        preset's (named after it)."""
        if not self.mixture:
            return [(self.preset, 1.0, self.simulator_config())]
        return [(name, c.share, c.simulator_config(f"data.simulator.mixture.{name}"))
                for name, c in self.mixture.items()]

    def single_preset(self) -> bool:
        """One preset and no nuisance draws: its evaluation set is a plain `dlscale simulate` dataset."""
        return not self.mixture and not self.nuisance.enabled


def simulation_device(requested: str, training: torch.device | str) -> torch.device:
    """Where to simulate: `auto` follows the training device; cuda needs a CUDA training device (no host trip)."""
    training = torch.device(training)
    requested = training.type if requested == "auto" else requested
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "cuda" or training.type != "cuda":
        raise ValueError(f"data.simulator.device={requested!r} with training on {training}: expected auto or cpu "
                         "(cuda simulates on the CUDA training device only)")
    return training


def target_value(meta: dict, key: str) -> float | None:
    """One image's regression target: metadata `key`, or log10 of it for `log10_<key>`; None if not finite."""
    log10 = key.startswith("log10_") and key not in meta
    value = meta.get(key[len("log10_"):] if log10 else key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = (math.log10(value) if value > 0 else math.nan) if log10 else float(value)
    return value if math.isfinite(value) else None


def check_targets(mixture: Mixture, keys: list[str]) -> None:
    """Refuse, before training, a target that some class lacks (one drawn image per class and component shows
    it)."""
    params, nuisance = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    metas = {c: [m for k, sim in enumerate(mixture.sims) for m in sim.metadata(mixture.sample(k, c, 1, params,
                                                                                              nuisance))]
             for c in CLASSES}
    numeric = sorted({k for ms in metas.values() for m in ms for k in m if target_value(m, k) is not None})
    first = metas[CLASSES[0]][0]
    for key in keys:
        base = key[len("log10_"):] if key.startswith("log10_") and key not in first else key
        if base not in first:
            raise ValueError(f"data.targets: {key!r} is not simulator metadata; numeric keys: {', '.join(numeric)} "
                             "(or log10_<key> of a positive one)")
        lacking = [c for c in CLASSES if any(target_value(m, key) is None for m in metas[c])]
        if lacking:
            having = [c for c in CLASSES if c not in lacking]
            raise ValueError(f"data.targets: {key!r} has no finite value for class {', '.join(lacking)} (defined for "
                             f"{', '.join(having) or 'no class'}); a target must exist for every image of the "
                             "mixed-class stream")


class SimulationStream(IterableDataset):
    """Freshly simulated training batches, `batches_per_epoch` per rank; call `set_epoch` before each epoch."""

    def __init__(self, source: SimulationSourceConfig, cfg: StreamConfig, rank: int, world: int,
                 batches_per_epoch: int, seed: int = 0, device: torch.device | str = "cpu"):
        if not 0 <= rank < world or batches_per_epoch < 1:
            raise ValueError(f"rank {rank} of world {world}, batches_per_epoch {batches_per_epoch}: expected "
                             "0 <= rank < world and batches_per_epoch >= 1")
        self.source, self.cfg, self.rank, self.world = source, cfg, rank, world
        self.batches_per_epoch, self.seed, self.epoch = batches_per_epoch, seed, 0
        self.device = simulation_device(source.device, device)
        components = source.components()
        side, mode = common_side(components, cfg.resize, cfg.resize_mode)
        self.mixture = Mixture(components, source.nuisance, self.device, side, mode)
        self.image_shape = cfg.output_shape((1, side, side))   # of the batches (after data.resize), as TrainStream
        if cfg.targets:
            check_targets(self.mixture, list(cfg.targets))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def class_counts(self, index: int) -> list[int]:
        """Images of each class (CLASSES order) in global batch `index` (the rule in the module docstring)."""
        return [sum(column) for column in zip(*self.mixture.batch_cells(index, self.cfg.batch_size))]

    def batch(self, epoch: int, index: int) -> dict:
        """Global batch `index` of `epoch`: the same tensors every time on a given device type."""
        entropy = np.random.SeedSequence(self.seed, spawn_key=(STREAM_KEY, epoch, index))
        params_gen, noise_gen, order_gen, nuisance_gen = batch_generators(entropy, self.device)
        images, labels, metas = self.mixture.draw(self.mixture.batch_cells(index, self.cfg.batch_size), params_gen,
                                                  noise_gen, nuisance_gen, metadata=bool(self.cfg.targets))
        bs = self.cfg.batch_size
        order = torch.randperm(bs, generator=order_gen)
        image = images.index_select(0, order.to(self.device))
        image = transform(image, self.cfg, order_gen if self.cfg.augment else None)   # as the shard streams
        ids = torch.stack([torch.full((bs,), epoch), torch.full((bs,), index), torch.arange(bs)], 1)
        batch = {"image": image, "label": labels[order].to(self.device), "ids": ids}
        if self.cfg.targets:
            batch["target"] = torch.from_numpy(self._targets(metas, epoch, index))[order].to(self.device)
        return batch

    def _targets(self, metas: list[dict], epoch: int, index: int) -> np.ndarray:
        values = np.array([[target_value(m, k) for k in self.cfg.targets] for m in metas], dtype=np.float64)
        if not np.isfinite(values).all():   # NaN from None: a value the build-time check did not see
            row, column = np.argwhere(~np.isfinite(values))[0]
            raise ValueError(f"data.targets: {self.cfg.targets[column]!r} not finite for a {metas[row]['class']} "
                             f"image of {metas[row]['component']}, epoch {epoch} batch {index}")
        return values.astype(np.float32)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            if self.device.type == "cuda":
                raise RuntimeError("a CUDA simulation stream runs in the training process: use simulation_loader "
                                   "(num_workers=0), not DataLoader workers")
            torch.set_num_threads(1)
        for local in range(worker, self.batches_per_epoch, workers):   # TrainStream's quota per worker
            yield self.batch(self.epoch, local * self.world + self.rank)

    def sample_keys(self, ids: torch.Tensor) -> list[str]:
        """Human-readable sample keys ("epoch 2:batch 17:sample 5") for ids from a batch."""
        return [f"epoch {e}:batch {b}:sample {p}" for e, b, p in ids.tolist()]

    def describe(self) -> dict:
        """Everything that regenerates this stream's batches bit for bit (for the run directory): `simulator` holds
        a single preset's resolved config, `mixture` the components' (and side and nuisances) otherwise."""
        drawn = {"simulator": plain(to_dict(self.mixture.sims[0].config))} if self.source.single_preset() \
            else {"mixture": self.mixture.describe()}
        return {"kind": "simulation", "source": plain(to_dict(self.source)), **drawn, "seed": self.seed,
                "seed_key": [STREAM_KEY, "epoch", "global batch"], "batch_size": self.cfg.batch_size,
                "batches_per_epoch": self.batches_per_epoch, "world": self.world,
                "global_batch": "local batch * world + rank", "classes": list(CLASSES),
                "normalize": self.cfg.normalize, "augment": self.cfg.augment, "resize": self.cfg.resize,
                "resize_mode": self.cfg.resize_mode, "targets": list(self.cfg.targets),
                "device": self.device.type, "dtype": "float32", "torch": torch.__version__}


def simulation_loader(stream: SimulationStream) -> DataLoader:
    """`make_loader` on CPU; on CUDA no workers and no pinning (the batches already sit on the training device)."""
    if stream.device.type == "cpu":
        return make_loader(stream, stream.cfg)
    return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=False)


# ---- The fixed evaluation set ------------------------------------------------------------------------------------

def eval_set_identity(source: SimulationSourceConfig, batch_size: int = EVAL_BATCH_SIZE,
                      mixture: Mixture | None = None) -> dict:
    """What an evaluation set's manifest `source` must hold to be reused (the simulation device is not part of it:
    it changes noise bits, not the distribution); `mixture` for a set drawn from one."""
    splits = {"val": source.eval_per_class, **({"train": source.probe_per_class} if source.probe_per_class else {})}
    drawn = {"kind": "simulator", "config": plain(to_dict(source.simulator_config()))} if mixture is None \
        else {"kind": "simulator_mixture", **mixture.describe()}
    return {**drawn, "seed": source.eval_seed, "splits": splits, "batch_size": batch_size, "dtype": "float32"}


def _identity_differences(held: dict, wanted: dict) -> list[str]:
    there, here = flatten(plain(held)), flatten(wanted)
    return [f"{k}: {there.get(k, '(absent)')!r} there, {here[k]!r} wanted" for k in here if there.get(k) != here[k]]


def _reusable(out_dir: Path, wanted: dict) -> bool:
    """True if `out_dir` holds the wanted set; False if it holds no manifest; raises if it holds another set."""
    if not (out_dir / MANIFEST).is_file():
        return False
    held = load_manifest(out_dir).get("source", {})
    differences = _identity_differences(held, wanted)
    if differences:
        raise ValueError(f"{out_dir}: holds an evaluation set made differently ({'; '.join(differences[:6])}"
                         f"{' ...' if len(differences) > 6 else ''}); delete it or use another directory")
    return True


def prepare_eval_set(source: SimulationSourceConfig, out_dir: Path | str, workers: int = 1, device: str = "cpu",
                     batch_size: int = EVAL_BATCH_SIZE, shard_size: int = 2048, samples_per_record: int = 256,
                     resize: int | None = None, resize_mode: str = "interpolate") -> Path:
    """Simulate the fixed evaluation set once (val: `eval_per_class`, train: `probe_per_class` images per class) with
    the `dlscale simulate` writer; an existing set of the same config, seed, counts and batch size is reused as is.
    Raw images, as every shard dataset: the eval stream normalises them as the training stream does its own.

    A mixture or nuisance draws (not `source.single_preset()`) are drawn the way the stream draws them, in this
    process (`workers` unused), at the stream's side (`resize` / `resize_mode`: the run's data.resize and
    data.resize_mode), by `dlscale.sim.mixture.write_mixture_set`."""
    out_dir = Path(out_dir)
    mixture = None
    if not source.single_preset():
        components = source.components()
        mixture = Mixture(components, source.nuisance, device, *common_side(components, resize, resize_mode))
    wanted = eval_set_identity(source, batch_size, mixture)
    if _reusable(out_dir, wanted):
        log.info("%s: reusing the evaluation set (same simulator config and seed)", out_dir)
        return out_dir
    total = sum(wanted["splits"].values())
    splits = {name: n / total for name, n in wanted["splits"].items()}   # val first takes the rounding
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        if mixture is not None:
            write_mixture_set(mixture, wanted["splits"], out_dir, wanted, source.eval_seed, batch_size, shard_size,
                              samples_per_record)
        else:
            simulate(source.simulator_config(), total, out_dir, splits, device=device, seed=source.eval_seed,
                     batch_size=batch_size, workers=workers, shard_size=shard_size,
                     samples_per_record=samples_per_record)
    except ValueError:
        if _reusable(out_dir, wanted):   # another process wrote the same set meanwhile
            return out_dir
        raise
    if not _reusable(out_dir, wanted):
        raise RuntimeError(f"{out_dir}: `dlscale simulate` finished without a manifest")
    log.info("%s: simulated the evaluation set (%s per class)", out_dir, wanted["splits"])
    return out_dir
