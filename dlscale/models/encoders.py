"""Image encoders shared by every training stage.

Each encoder maps (B, in_channels, H, W) to a feature map (B, out_channels, h, w) with h = ceil(H / downsample),
so the decoder can rebuild the input and the heads can pool it, whatever the backbone (a ViT's patch tokens are
that map on the patch grid). Nothing is ever downloaded: lensing images are not ImageNet photographs, and cluster
nodes often have no internet; pretrained weights come from a local file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18

from dlscale.registry import Registry

VIT_ARCHITECTURES: dict[str, str] = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
"""Our ViT names -> the timm architecture (depth, width, heads) they take; image and patch size are ours."""

ENCODER_NAMES: tuple[str, ...] = ("resnet18", "small", *VIT_ARCHITECTURES, "convnext_nano")
"""The backbones dlscale ships (registered below, in this order); `BACKBONES` also holds those registered by users."""


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


@dataclass
class ResNet18Config(EncoderConfig):
    """Options of `resnet18`."""
    small_input_stem: bool = False
    """3x3 stride-1 stem without max-pool, which keeps detail on 64x64 inputs at ~16x the FLOPs."""


@register_backbone
class ResNetEncoder(Backbone, nn.Module):
    """torchvision ResNet18 without its pooling and classifier, stem adapted to the image channels and size.

    Parameter names match torchvision's (`conv1`, `bn1`, `layer1`, ...), so converted torchvision state dicts load.
    """
    name, family, Config = "resnet18", "ResNet", ResNet18Config

    @classmethod
    def from_config(cls, cfg: ResNet18Config, image_shape=None) -> "ResNetEncoder":
        return cls(cfg.in_channels, cfg.small_input_stem)

    @classmethod
    def arch_label(cls, cfg: ResNet18Config) -> str:
        return f"{cfg.name}-s" if cfg.small_input_stem else cfg.name

    @classmethod
    def describe(cls, cfg: ResNet18Config) -> str:
        return "ResNet18" + (" 3x3 stem" if cfg.small_input_stem else "")

    def layer_paths(self) -> list[list[str]]:
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]

    def __init__(self, in_channels: int = 1, small_input_stem: bool = False) -> None:
        super().__init__()
        net = resnet18(weights=None)
        if small_input_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same initialisation torchvision gives the stem it replaced.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels: int = 512
        self.downsample: int = 8 if small_input_stem else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU: the block of the small encoder and of the decoder."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@dataclass
class SmallConfig(EncoderConfig):
    """Options of `small`."""
    width: int = 32
    """Channels of the first block; each following block doubles them."""


@register_backbone
class SmallEncoder(Backbone, nn.Sequential):
    """Three stride-2 conv blocks (width, 2*width, 4*width channels): cheap enough for CPU tests and demos. Its
    layers are the blocks (the default `layer_paths`)."""
    name, family, Config = "small", "small CNN", SmallConfig

    @classmethod
    def from_config(cls, cfg: SmallConfig, image_shape=None) -> "SmallEncoder":
        return cls(cfg.in_channels, cfg.width)

    @classmethod
    def arch_label(cls, cfg: SmallConfig) -> str:
        return f"{cfg.name}-w{cfg.width}"

    @classmethod
    def describe(cls, cfg: SmallConfig) -> str:
        return f"small CNN width {cfg.width}"

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        channels = [in_channels, width, 2 * width, 4 * width]
        super().__init__(*(conv_bn_relu(c_in, c_out, stride=2) for c_in, c_out in zip(channels, channels[1:])))
        self.out_channels: int = channels[-1]
        self.downsample: int = 2 ** (len(channels) - 1)


def default_patch_size(height: int, width: int) -> int:
    """The patch side in 8..16 dividing both sides that is nearest to side / 15: 8 up to 120 pixels (64x64 -> an 8x8
    grid), 10 for the 150x150 DeepLense images (15x15). Small lensing images need small patches: timm's 16 would
    leave 16 coarse tokens on a 64x64 image."""
    common, target = math.gcd(height, width), max(height, width) / 15
    fitting = [p for p in range(8, 17) if common % p == 0]
    if not fitting:
        raise ValueError(f"no default patch size for {height}x{width} images (none of 8..16 divides both sides): "
                         "set model.encoder.patch_size")
    return min(fitting, key=lambda p: (abs(p - target), p))


def check_patch_size(patch_size: int, height: int, width: int, field: str = "model.encoder.patch_size") -> None:
    """Raise naming `field` unless `patch_size` divides both image sides (ViTs and MAE masks tile the image)."""
    if patch_size < 1 or height % patch_size or width % patch_size:
        common = math.gcd(height, width)
        choices = [p for p in range(2, min(common, 32) + 1) if common % p == 0]
        raise ValueError(f"{field}={patch_size} must divide the image size {height}x{width}; "
                         f"divisors that fit: {choices or 'none (crop or pad the images)'}")


@dataclass
class ViTConfig(EncoderConfig):
    """Options of the ViTs (`vit_tiny`, `vit_small`)."""
    patch_size: int | None = None
    """Side of the square patches, dividing both image sides. None: the divisor in 8..16 nearest to side / 15, i.e.
    8 for 64x64 images (8x8 grid), 10 for 150x150 (15x15 grid)."""


class ViTEncoder(Backbone, nn.Module):
    """timm Vision Transformer without class token or classifier; its patch tokens form the feature map.

    Submodule names are timm's (`patch_embed`, `pos_embed`, `blocks`, `norm`). No class token: the heads pool the
    patch tokens (a class token would be trained by attention alone, and MAE reconstructs patches only).
    Registered once per size (`ViTTinyEncoder`, `ViTSmallEncoder`: `VIT_ARCHITECTURES`).
    """
    family, Config, needs_image_shape = "ViT", ViTConfig, True

    @classmethod
    def from_config(cls, cfg: ViTConfig, image_shape=None) -> "ViTEncoder":
        return cls(VIT_ARCHITECTURES[cls.name], tuple(image_shape), cfg.patch_size)

    @classmethod
    def arch_label(cls, cfg: ViTConfig) -> str:
        return f"{cfg.name}-p{cfg.patch_size}" if cfg.patch_size else cfg.name

    @classmethod
    def timm_recipe(cls, cfg: ViTConfig, image_shape) -> dict | None:
        """timm's ViT without class token and head, at our image and patch size (None without the image shape)."""
        if not image_shape:
            return None
        channels, height, width = image_shape
        return {"model": VIT_ARCHITECTURES[cls.name], "rename": [],
                "kwargs": {"img_size": [height, width], "patch_size": cfg.patch_size or default_patch_size(height,
                                                                                                        width),
                           "in_chans": channels, "num_classes": 0, "class_token": False, "global_pool": ""}}

    def layer_paths(self) -> list[list[str]]:
        return [["patch_embed", "pos_embed", "norm_pre"], *([f"blocks.{i}"] for i in range(len(self.blocks))),
                ["norm"]]

    def __init__(self, architecture: str, image_shape: tuple[int, int, int], patch_size: int | None = None) -> None:
        super().__init__()
        import timm  # imported here: it takes a while and only ViT/ConvNeXt runs need it

        channels, height, width = image_shape
        patch_size = default_patch_size(height, width) if patch_size is None else patch_size
        check_patch_size(patch_size, height, width)
        vit = timm.create_model(architecture, pretrained=False, img_size=(height, width), patch_size=patch_size,
                                in_chans=channels, num_classes=0, class_token=False, global_pool="")
        if vit.num_prefix_tokens:
            raise ValueError(f"timm {architecture} still has {vit.num_prefix_tokens} prefix tokens")
        self.patch_embed, self.pos_embed, self.pos_drop = vit.patch_embed, vit.pos_embed, vit.pos_drop
        self.norm_pre, self.blocks, self.norm = vit.norm_pre, vit.blocks, vit.norm
        self.patch_size: int = patch_size
        self.grid_size: tuple[int, int] = (height // patch_size, width // patch_size)
        self.out_channels: int = vit.embed_dim
        self.downsample: int = patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _transform(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.norm_pre(self.pos_drop(tokens))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._transform(self.patch_embed(x) + self.pos_embed)           # (B, N, D), N in row-major order
        return tokens.transpose(1, 2).reshape(x.shape[0], self.out_channels, *self.grid_size)

    def forward_visible(self, x: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """Encode only the patches `keep_index` (B, n_keep) names, with their position embeddings: the MAE encoder,
        whose cost scales with the visible patches. Returns (B, n_keep, D) tokens in `keep_index` order."""
        tokens = self.patch_embed(x) + self.pos_embed
        index = keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self._transform(torch.gather(tokens, 1, index))


@register_backbone
class ViTTinyEncoder(ViTEncoder):
    """ViT-Ti (timm `vit_tiny_patch16_224`'s depth, width and heads) at the image and patch size."""
    name = "vit_tiny"


@register_backbone
class ViTSmallEncoder(ViTEncoder):
    """ViT-S (timm `vit_small_patch16_224`'s depth, width and heads) at the image and patch size."""
    name = "vit_small"


@register_backbone
class ConvNeXtEncoder(Backbone, nn.Module):
    """timm ConvNeXt-Nano trunk; the head's LayerNorm is applied to the map instead of to the pooled vector.

    Inputs are zero-padded to a multiple of 32 (150 -> 160), so the map side is ceil(H / 32) like the other CNNs'
    (the stride-4 stem would otherwise drop the border pixels).
    """
    name, family = "convnext_nano", "ConvNeXt"

    @classmethod
    def from_config(cls, cfg: EncoderConfig, image_shape=None) -> "ConvNeXtEncoder":
        return cls(cfg.in_channels)

    @classmethod
    def timm_recipe(cls, cfg: EncoderConfig, image_shape) -> dict:
        """The final LayerNorm is timm's `head.norm` (applied to the map, before pooling)."""
        return {"model": "convnext_nano", "rename": [["norm.", "head.norm."]],
                "kwargs": {"in_chans": cfg.in_channels, "num_classes": 0}}

    def layer_paths(self) -> list[list[str]]:
        return [["stem"], *([f"stages.{i}"] for i in range(len(self.stages))), ["norm"]]

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        import timm

        net = timm.create_model("convnext_nano", pretrained=False, in_chans=in_channels, num_classes=0)
        self.stem, self.stages, self.norm = net.stem, net.stages, net.head.norm
        self.out_channels: int = net.num_features
        self.downsample: int = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-x.shape[-2]) % self.downsample, (-x.shape[-1]) % self.downsample
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.norm(self.stages(self.stem(x)))


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


assert tuple(BACKBONES) == ENCODER_NAMES, "the shipped backbones are registered in ENCODER_NAMES order"
