"""`StreamConfig`: how shards become batches (the `data.*` keys of every config that reads shards)."""
from __future__ import annotations

from dataclasses import dataclass, field

NORMALIZATIONS = ("minmax", "standardize", "log", "none")
RESIZE_MODES = ("interpolate", "crop")
TRANSFORM_PLACES = ("auto", "host", "device")
EPS = 1e-8


@dataclass
class StreamConfig:
    """How shards become batches."""
    batch_size: int = 64
    """per rank (DeepSpeed's micro batch)"""
    num_workers: int = 2
    """DataLoader worker processes per rank; they share the rank's records (each decodes only its own) and the
    batches do not depend on their number (training with workers keeps its records in /dev/shm: docs/throughput.md)"""
    normalize: str = "minmax"
    """per image: minmax to [0,1] | standardize | log (log1p above min, then minmax) | none"""
    augment: bool = True
    """random flips and 90-degree rotations in training (no preferred orientation; the dihedral group is exact)"""
    shuffle_buffer: int = 4096
    """samples mixed across records before batching"""
    strict: bool = False
    """a corrupt training shard/record is fatal instead of skipped and counted"""
    allow_pipe: bool = False
    """allow `pipe:` shard URLs (they run shell commands)"""
    url_template: str | None = None
    """shard location, e.g. "pipe:aws s3 cp s3://bucket/set/{name} -"; default: the data directory"""
    targets: list[str] = field(default_factory=list)
    """metadata keys returned as regression targets (`target`)"""
    resize: int | None = None
    """batches become resize x resize: another image size than the encoder's"""
    resize_mode: str = "interpolate"
    """interpolate (bilinear, antialiased) | crop (centre crop of larger images)"""
    transforms: str = "auto"
    """where resize / normalise / augment run: host (DataLoader workers) | device (the training GPU, inside the
    step; workers only read records) | auto (device when training on CUDA)"""

    def __post_init__(self) -> None:
        StreamConfig.validate(self)

    def validate(self) -> "StreamConfig":
        """Raise naming the `data.*` key that is out of range (run on construction, and by `Config.validate`)."""
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize={self.normalize!r}: expected one of {NORMALIZATIONS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.shuffle_buffer >= 0")
        if self.transforms not in TRANSFORM_PLACES:
            raise ValueError(f"data.transforms={self.transforms!r}: expected one of {TRANSFORM_PLACES}")
        if self.resize is not None and self.resize < 1 or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"data.resize={self.resize!r} / data.resize_mode={self.resize_mode!r}: expected a side "
                             f">= 1 (or null) and a mode among {RESIZE_MODES}")
        return self

    def output_shape(self, shape) -> tuple[int, ...]:
        """(C, H, W) of the batches made from stored images of `shape`: what the model sees."""
        shape = tuple(int(s) for s in shape)
        if self.resize is None:
            return shape
        if self.resize_mode == "crop" and min(shape[1:]) < self.resize:
            raise ValueError(f"data.resize={self.resize} with resize_mode=crop: images are {list(shape)}, smaller "
                             "than the crop; use data.resize_mode=interpolate")
        return (shape[0], self.resize, self.resize)

