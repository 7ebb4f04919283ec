"""`data.source=simulate`: fresh simulated lenses every step (`dlscale.sim.stream.SimulationStream`), evaluated on
`data_dir` if given, else on a fixed set simulated once into RUN/eval_data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlscale.sim.stream import SimulationStream, prepare_eval_set as simulate_set, simulation_loader
from dlscale.train.sources.base import TrainingSource, register_source

EVAL_DATA = "eval_data"


@register_source
class SimulationSource(TrainingSource):
    name = "simulate"
    description = ("fresh simulated lenses every step (data.simulator: one preset or a mixture of instruments), "
                   "schedule.batches_per_epoch per epoch; evaluated on data_dir, or on a set simulated once into "
                   "RUN/eval_data")
    needs_data_dir = False

    def check_inputs(self) -> None:
        if not self.cfg.schedule.batches_per_epoch:
            raise ValueError("data.source=simulate: set schedule.batches_per_epoch (an epoch of fresh simulated "
                             "lenses has no natural length)")

    def check_config(self) -> None:
        cfg = self.cfg
        if not cfg.data_dir and cfg.data.simulator.probe_per_class == 0 and cfg.eval.probe_samples > 0:
            raise ValueError("data.simulator.probe_per_class=0 leaves the simulated evaluation set without a train "
                             "split for the linear probe: set eval.probe_samples=0 or probe_per_class > 0")

    def build(self, info, device: torch.device):
        cfg, batches = self.cfg, self.cfg.schedule.batches_per_epoch
        return SimulationStream(cfg.data.simulator, cfg.data, info.rank, info.world, batches, cfg.seed,
                                device), batches

    def loader(self, stream):
        return simulation_loader(stream)

    def record(self, stream) -> dict:
        return stream.describe()

    def target_sample(self, stream, n: int) -> np.ndarray:
        """The targets of the first global batches of epoch 0 (the same on every rank)."""
        values, held, index = [], 0, 0
        while held < n:
            values.append(stream.batch(0, index)["target"].cpu().numpy())
            held, index = held + len(values[-1]), index + 1
        return np.concatenate(values)

    def simulated_eval_set(self) -> bool:
        cfg = self.cfg
        return not cfg.data_dir or Path(cfg.data_dir) == Path(cfg.run_dir) / EVAL_DATA

    def prepare_eval_set(self) -> None:
        data = self.cfg.data
        simulate_set(data.simulator, self.cfg.data_dir, resize=data.resize, resize_mode=data.resize_mode)
