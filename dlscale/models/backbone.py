"""The backbone contract and its registry: what a registered encoder declares (options, layers, export recipe) and
how a config builds one. The shipped backbones live in `cnn_backbones` and `timm_backbones`, registered in order by
`dlscale.models.encoders`.

Each encoder maps (B, in_channels, H, W) to a feature map (B, out_channels, h, w) with h = ceil(H / downsample),
so the decoder can rebuild the input and the heads can pool it, whatever the backbone (a ViT's patch tokens are
that map on the patch grid). Nothing is ever downloaded: lensing images are not ImageNet photographs, and cluster
nodes often have no internet; pretrained weights come from a local file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

from torch import nn

from dlscale.registry import Registry

@dataclass
class EncoderConfig:
    """Which encoder to build (`model.encoder`): the fields every backbone shares, and the chosen backbone's own
    options beside them (`model.encoder.width` for `small`, ...), each backbone's `Config` (a subclass of this one).

    `EncoderConfig(name="small", width=8)` builds the chosen backbone's `Config`, and so does loading a config tree
    (`variant`), so every config holds the options of its own backbone only: another backbone's option is refused
    naming its key."""

    VARIANT_KEY: ClassVar[str] = "name"
    name: str = "resnet18"
    """Encoder family: `resnet18` (torchvision), `small` (a few conv blocks, for CPU tests), `vit_tiny` /
    `vit_small` (timm ViT-Ti/S at the image size), `convnext_nano` (timm) or a registered one; all randomly
    initialised. The keys after `in_channels` are the options of this backbone."""
    in_channels: int = 1
    """Image channels: 1 for DeepLense Models I-III and the common test, 3 for some Model IV copies."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "EncoderConfig":
        """One constructor for every backbone: `EncoderConfig(name=..., **options)` is an instance of the named
        backbone's `Config` (Python then runs that class's `__init__`)."""
        chosen = cls.variant({"name": args[0] if args else kwargs.get("name", EncoderConfig.name), **kwargs},
                             "model.encoder.")
        if cls is not EncoderConfig and chosen is not cls:
            raise TypeError(f"{cls.__name__} holds the options of another backbone than {chosen.__name__}'s: build "
                            "EncoderConfig(name=..., ...)")
        return super().__new__(chosen)

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:
        return (), {"name": self.name}     # copies and pickles choose the same class

    @classmethod
    def variant(cls, values: dict, where: str) -> type:
        """The options class of the backbone `values` names (configtree's hook); raises naming the key for an option
        no backbone has, then for one of another backbone."""
        name = values.get("name", EncoderConfig.name)
        try:
            chosen = backbone_class(name).Config
        except ValueError as err:
            raise ValueError(f"{where}name: {err}") from None
        own = {f.name for f in fields(chosen)}
        holders = {key: [n for n, b in BACKBONES.items() if key in {f.name for f in fields(b.Config)}]
                   for key in values if key not in own}
        unknown = sorted(key for key, names in holders.items() if not names)
        if unknown:
            raise ValueError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(own))}")
        if holders:
            key, names = next(iter(holders.items()))
            families = sorted({BACKBONES[n].family or n for n in names})
            raise ValueError(f"{where}{key}={values[key]!r} applies to {' / '.join(families)} encoders "
                             f"({', '.join(names)}), not to {name!r}: leave it unset")
        return chosen


class Backbone:
    """A registered backbone: an `nn.Module` subclassing this too, mapping (B, C, H, W) images to a feature map
    (B, out_channels, h, w) with `out_channels` and `downsample` attributes, and declaring what the rest of dlscale
    needs to know about it, so nothing outside its class names it:

        @register_backbone
        class Strided(Backbone, nn.Module):
            name = "strided"

            @dataclass
            class Config(EncoderConfig):
                width: int = 16     # output channels

            @classmethod
            def from_config(cls, cfg, image_shape=None): return cls(cfg.in_channels, cfg.width)
    """
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    """What the backbones sharing options are called in messages (e.g. ViT); default: the name."""
    Config: ClassVar[type] = EncoderConfig
    """Its options: a dataclass subclassing `EncoderConfig` (fields with a docstring each, as `--print-config` shows
    them), set as `model.encoder.<field>`; `EncoderConfig` itself for a backbone without options."""
    needs_image_shape: ClassVar[bool] = False
    """Whether the image shape fixes its parameters (a ViT's position embeddings): `build_encoder` then requires it."""

    @classmethod
    def from_config(cls, cfg: EncoderConfig, image_shape: tuple[int, int, int] | None = None) -> nn.Module:
        """Build it, randomly initialised, from its options (`cfg`, an instance of `Config`)."""
        raise NotImplementedError

    @classmethod
    def arch_label(cls, cfg: EncoderConfig) -> str:
        """A short name of the architecture (e.g. `small-w8`): transfer studies key random-init and scratch rows by
        it, so two configs with the same label must build the same architecture."""
        return cfg.name

    @classmethod
    def describe(cls, cfg: EncoderConfig) -> str:
        """The architecture in words, for reports (e.g. `small CNN width 16`)."""
        return cfg.name

    @classmethod
    def timm_recipe(cls, cfg: EncoderConfig, image_shape: tuple[int, int, int] | None) -> dict | None:
        """How its weights load into plain timm (encoder.json's `timm`: `timm.create_model(model, pretrained=False,
        **kwargs)`, then `dlscale.export.rename_for_timm` with `rename`), or None when it is not a timm model."""
        return None

    def layer_paths(self) -> list[list[str]]:
        """Its layers from input to output, each a list of module or parameter paths (e.g. `["conv1", "bn1"]`,
        `["layer1"]`); `layer_groups` expands them to parameter names. Default: one group per direct parameter, then
        one per child module, in the order they were assigned."""
        direct = [[name] for name, _ in self.named_parameters(recurse=False)]
        return direct + [[name] for name, child in self.named_children() if any(True for _ in child.parameters())]


BACKBONES: Registry[Backbone] = Registry("encoder")
"""`model.encoder.name` -> the backbone class (see `Backbone`). Users add one with `@register_backbone`, no dlscale
edit."""


def register_backbone(cls):
    """Class decorator: make `cls` (a `Backbone` nn.Module with `name`, `Config` and `from_config`) buildable as
    `model.encoder.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone) and issubclass(cls, nn.Module)
            and cls.from_config.__func__ is not Backbone.from_config.__func__):
        raise ValueError(f"{cls.__name__}: a backbone subclasses dlscale.models.Backbone and nn.Module and defines "
                         "a `from_config(cfg, image_shape)` classmethod")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, EncoderConfig) and is_dataclass(cls.Config)):
        raise ValueError(f"{cls.__name__}.Config: expected a dataclass subclassing EncoderConfig")
    return BACKBONES.register(cls)


def backbone_class(name: str) -> type[Backbone]:
    """The registered backbone `name`; raises naming the known ones."""
    return BACKBONES.get_class(name)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names of a backbone's layers, from input to output (stem, stages or blocks, final norm): what
    layer-wise learning-rate decay scales. `model`: the encoder, or a model holding it as `.encoder` (names then
    as in `model.named_parameters()`). Every parameter is in exactly one group; a backbone whose `layer_paths`
    miss one or name one twice is refused, naming the parameters."""
    encoder, prefix = (model, "") if isinstance(model, Backbone) else (model.encoder, "encoder.")
    names = [name for name, _ in encoder.named_parameters()]
    groups = [[n for n in names if any(n == p or n.startswith(p + ".") for p in paths)]
              for paths in encoder.layer_paths()]
    counted = [n for group in groups for n in group]
    missing, twice = [n for n in names if n not in counted], sorted({n for n in counted if counted.count(n) > 1})
    if missing or twice:
        raise ValueError(f"{type(encoder).__name__}.layer_paths: parameters in no group {missing[:5]}, in several "
                         f"{twice[:5]}")
    return [[prefix + n for n in group] for group in groups if group]


def load_encoder_weights(encoder: nn.Module, state: dict, where: str) -> None:
    """Load a state dict into `encoder`; raise naming `where` (its file) and every key that does not fit.

    Accepts an encoder's own state dict or a whole model's (keys `encoder.*`, e.g. an autoencoder checkpoint's
    module), so a multitask run can start from an autoencoder.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a state dict, found {type(state).__name__}")
    if any(key.startswith("encoder.") for key in state):
        state = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    problems = [
        f"{label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape))
        if keys
    ]
    if problems:
        raise ValueError(f"encoder weights {where} do not fit the {type(encoder).__name__}: " + "; ".join(problems))
    encoder.load_state_dict(state)


def build_encoder(cfg: EncoderConfig, image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """Build the encoder `cfg` names, randomly initialised (a run starts it from other weights with `init_from`).

    `image_shape` (C, H, W) is needed by the ViTs (their position embeddings fix the patch grid); the CNNs take
    any size and ignore it.
    """
    backbone = backbone_class(cfg.name)
    if image_shape is not None and tuple(image_shape)[0] != cfg.in_channels:
        raise ValueError(f"image_shape {tuple(image_shape)} has {image_shape[0]} channels, "
                         f"model.encoder.in_channels is {cfg.in_channels}")
    if image_shape is None and backbone.needs_image_shape:
        raise ValueError(f"encoder {cfg.name!r} needs the image shape (C, H, W): its position embeddings "
                         "fix the patch grid; pass image_shape to build_encoder")
    return backbone.from_config(cfg, None if image_shape is None else tuple(image_shape))
