"""Every backbone speaks one interface (feature map, out_channels, downsample) and declares its options, layer groups
and labels; ViT patch sizes; the light decoder; format 2's flat encoder configs still load."""

import copy
import dataclasses
import math
import pickle

import pytest
import torch

from dlscale.models import ENCODER_NAMES, EncoderConfig, backbone_class, build_encoder, layer_groups
from dlscale.models.timm_backbones import default_patch_size
from dlscale.models.heads import ClassifierHead, Decoder

SIZES = (64, 150)


@pytest.fixture(scope="module")
def encoders():
    """One encoder per (name, size): the ViTs depend on the image size, and building timm models takes a while."""
    torch.manual_seed(0)
    configs = {name: EncoderConfig(name=name) for name in ENCODER_NAMES if name != "resnet18"}
    configs |= {"resnet18": EncoderConfig(name="resnet18"),
                "resnet18_small_stem": EncoderConfig(name="resnet18", small_input_stem=True)}
    return {(name, size): build_encoder(cfg, (1, size, size)).eval()
            for name, cfg in configs.items() for size in SIZES}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["small", "resnet18", "resnet18_small_stem", "vit_tiny", "vit_small",
                                  "convnext_nano"])
def test_every_backbone_gives_the_documented_feature_map(encoders, name, size):
    encoder = encoders[name, size]
    with torch.no_grad():
        feature_map = encoder(torch.randn(2, 1, size, size))
    side = math.ceil(size / encoder.downsample)
    assert feature_map.shape == (2, encoder.out_channels, side, side)
    assert torch.isfinite(feature_map).all()


@pytest.mark.parametrize(("name", "size", "patch", "channels"), [
    ("vit_tiny", 64, 8, 192), ("vit_tiny", 150, 10, 192), ("vit_small", 64, 8, 384), ("vit_small", 150, 10, 384),
])
def test_vit_default_patch_size_width_and_token_grid(encoders, name, size, patch, channels):
    encoder = encoders[name, size]
    assert (encoder.patch_size, encoder.downsample, encoder.out_channels) == (patch, patch, channels)
    assert encoder.grid_size == (size // patch, size // patch)
    assert encoder.pos_embed.shape == (1, (size // patch) ** 2, channels)   # patch tokens only: no class token


def test_every_name_in_encoder_names_is_covered(encoders):
    assert {name for name, _ in encoders} >= set(ENCODER_NAMES)


@pytest.mark.parametrize("size", SIZES)
def test_vit_tiny_forward_backward_reaches_every_parameter(size):
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="vit_tiny"), (1, size, size))
    head = ClassifierHead(encoder.out_channels, 3)
    loss = torch.nn.functional.cross_entropy(head(encoder(torch.randn(2, 1, size, size))), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_vit_patch_tokens_sit_on_their_grid_position():
    """Changing one patch of the input changes that patch's token most (the map is not transposed or shuffled)."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="vit_tiny", patch_size=16), (1, 64, 64)).eval()
    encoder.blocks = torch.nn.Sequential()     # without attention each token sees only its own patch
    x = torch.randn(1, 1, 64, 64)
    y = x.clone()
    y[..., 16:32, 48:64] += 5.0                # patch (row 1, column 3)
    with torch.no_grad():
        change = (encoder(y) - encoder(x)).abs().sum(dim=1)[0]
    assert change.argmax().item() == 1 * 4 + 3
    assert change.flatten().topk(2).values[1] == 0


def test_forward_visible_equals_the_full_forward_when_every_patch_is_kept():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="vit_tiny"), (1, 64, 64)).eval()
    x = torch.randn(2, 1, 64, 64)
    order = torch.stack([torch.randperm(encoder.n_patches) for _ in range(2)])
    with torch.no_grad():
        tokens = encoder(x).flatten(2).transpose(1, 2)                       # (B, N, D)
        visible = encoder.forward_visible(x, order)
    expected = torch.gather(tokens, 1, order.unsqueeze(-1).expand_as(tokens))
    torch.testing.assert_close(visible, expected, rtol=1e-4, atol=1e-4)


def test_forward_visible_sees_only_the_kept_patches():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="vit_tiny"), (1, 64, 64)).eval()
    keep = torch.tensor([[0, 5, 17, 63]])
    x = torch.randn(1, 1, 64, 64)
    y = x.clone()
    y[..., 8:16, 8:16] = 100.0                 # patch 9: not kept
    with torch.no_grad():
        out = encoder.forward_visible(x, keep)
        assert out.shape == (1, 4, encoder.out_channels)
        torch.testing.assert_close(encoder.forward_visible(y, keep), out)
        y[..., 0:8, 40:48] = 100.0             # patch 5: kept
        assert not torch.allclose(encoder.forward_visible(y, keep), out)


@pytest.mark.parametrize(("patch", "shape"), [(7, (1, 64, 64)), (8, (1, 150, 150)), (6, (1, 64, 96))])
def test_vit_patch_size_must_divide_the_image_sides(patch, shape):
    with pytest.raises(ValueError, match=rf"model\.encoder\.patch_size={patch} must divide the image size "
                                         rf"{shape[1]}x{shape[2]}; divisors that fit"):
        build_encoder(EncoderConfig(name="vit_tiny", patch_size=patch), shape)


@pytest.mark.parametrize(("shape", "patch"), [((32, 32), 8), ((64, 64), 8), ((128, 128), 8), ((150, 150), 10),
                                              ((100, 150), 10), ((224, 224), 14)])
def test_default_patch_size_divides_the_image_and_gives_about_15_patches_a_side(shape, patch):
    assert default_patch_size(*shape) == patch


def test_image_size_without_a_default_patch_size_asks_for_one():
    with pytest.raises(ValueError, match=r"no default patch size for 67x67 images.*set model\.encoder\.patch_size"):
        build_encoder(EncoderConfig(name="vit_tiny"), (1, 67, 67))


def test_vit_needs_the_image_shape():
    with pytest.raises(ValueError, match="'vit_small' needs the image shape"):
        build_encoder(EncoderConfig(name="vit_small"))


def test_patch_size_is_refused_for_cnns():
    with pytest.raises(ValueError, match="patch_size=8 applies to ViT encoders"):
        build_encoder(EncoderConfig(name="small", patch_size=8), (1, 64, 64))


def test_image_shape_channels_must_match_in_channels():
    with pytest.raises(ValueError, match=r"image_shape \(3, 64, 64\) has 3 channels, model\.encoder\.in_channels"):
        build_encoder(EncoderConfig(name="small"), (3, 64, 64))


@pytest.mark.parametrize("name", ["vit_tiny", "convnext_nano"])
def test_three_channel_inputs(name):
    encoder = build_encoder(EncoderConfig(name=name, in_channels=3), (3, 64, 64)).eval()
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 64)).shape[:2] == (1, encoder.out_channels)


def test_cnn_state_dict_keys_are_unchanged():
    """Old encoder.pt files keep loading: torchvision names for resnet18, nn.Sequential indices for small."""
    from torchvision.models import resnet18
    for stem in (False, True):
        resnet = build_encoder(EncoderConfig(name="resnet18", small_input_stem=stem)).state_dict()
        assert list(resnet) == [key for key in resnet18().state_dict() if not key.startswith("fc.")]
    small = build_encoder(EncoderConfig(name="small", width=8)).state_dict()
    assert list(small) == [f"{block}.{key}" for block in range(3) for key in
                           ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                            "1.num_batches_tracked")]


def test_vit_weights_round_trip_through_init_from(tmp_path):
    from dlscale.data.classes import CLASSES
    from dlscale.train.model import init_encoder
    source = build_encoder(EncoderConfig(name="vit_tiny"), (1, 64, 64))
    path = tmp_path / "vit.pt"
    torch.save(source.state_dict(), path)
    loaded = build_encoder(EncoderConfig(name="vit_tiny"), (1, 64, 64))
    init_encoder(loaded, path, EncoderConfig(name="vit_tiny"), (1, 64, 64), CLASSES)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(ValueError, match=r"vit\.pt.*shape mismatch: pos_embed"):
        init_encoder(build_encoder(EncoderConfig(name="vit_tiny"), (1, 128, 128)), path,
                     EncoderConfig(name="vit_tiny"), (1, 128, 128), CLASSES)


# ---- decoder ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("in_channels", "map_side", "scale", "out_shape", "out_stride"), [
    (128, 8, 8, (1, 64, 64), 1),        # small encoder, 64x64
    (512, 5, 32, (1, 150, 150), 1),     # resnet18, 150x150: 160 -> 150
    (192, 15, 10, (1, 150, 150), 1),    # ViT patch 10: not a power of two
    (192, 8, 8, (3, 64, 64), 2),        # reconstructed at 32x32, upsampled
    (16, 10, 8, (2, 75, 93), 1),        # sizes that are not multiples of the scale
    (16, 12, 1, (1, 12, 12), 1),        # no upsampling at all
])
def test_decoder_output_has_exactly_the_image_shape(in_channels, map_side, scale, out_shape, out_stride):
    decoder = Decoder(in_channels, out_shape, scale=scale, out_stride=out_stride)
    image = decoder(torch.randn(2, in_channels, map_side, map_side))
    assert image.shape == (2, *out_shape)
    image.square().mean().backward()
    assert all(p.grad is not None for p in decoder.parameters())


def test_decoder_is_much_lighter_than_the_encoder_it_serves():
    """The reconstruction head of the small encoder costs fewer multiply-adds than the encoder (was ~6x more)."""
    def conv_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
        total = 0

        def count(conv, inputs, output):
            nonlocal total
            total += output.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            module(x)
        for hook in hooks:
            hook.remove()
        return total
    encoder = build_encoder(EncoderConfig(name="small"))
    x = torch.randn(1, 1, 64, 64)
    decoder = Decoder(encoder.out_channels, (1, 64, 64), scale=encoder.downsample)
    assert conv_macs(decoder, encoder(x)) < conv_macs(encoder, x)


def test_decoder_sub_pixel_layer_starts_without_checkerboard():
    decoder = Decoder(32, (1, 32, 32), scale=4).eval()
    with torch.no_grad():
        image = decoder(torch.randn(1, 32, 8, 8))[0, 0]
    # each 2x2 block of the pixel-shuffled output is one value before any training
    blocks = image.unfold(0, 2, 2).unfold(1, 2, 2).reshape(16, 16, 4)
    assert torch.allclose(blocks, blocks[..., :1].expand_as(blocks))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scale": 0}, "scale and out_stride must be >= 1"),
    ({"out_stride": 0}, "scale and out_stride must be >= 1"),
    ({"width": 0}, "width and min_channels must be >= 1"),
])
def test_decoder_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Decoder(16, (1, 64, 64), **kwargs)



# ---- what each registered backbone declares: options, layer groups, labels ----------------------------------------

@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_layer_groups_hold_every_parameter_once_in_the_order_the_forward_pass_reaches_them(encoders, name):
    encoder = encoders[name, 64]
    groups = layer_groups(encoder)
    names = [n for n, _ in encoder.named_parameters()]
    assert sorted(n for group in groups for n in group) == sorted(names) and all(groups)
    order = {}

    def reached_by(path):
        def hook(module, args):
            order.setdefault(path, len(order))
        return hook
    hooks = [module.register_forward_pre_hook(reached_by(path)) for path, module in encoder.named_modules()
             if path and any(True for _ in module.parameters(False))]
    with torch.no_grad():
        encoder(torch.randn(1, 1, 64, 64))
    for hook in hooks:
        hook.remove()
    reached = [[order[n.rpartition(".")[0]] for n in group if n.rpartition(".")[0] in order] for group in groups]
    assert all(reached)                                    # each group holds a layer the forward pass runs
    assert all(max(a) < min(b) for a, b in zip(reached, reached[1:]))
    assert len(groups) >= 3


def test_layer_groups_name_the_stem_stages_blocks_and_norm(encoders):
    resnet, vit = layer_groups(encoders["resnet18", 64]), layer_groups(encoders["vit_tiny", 64])
    assert resnet[0] == ["conv1.weight", "bn1.weight", "bn1.bias"] and len(resnet) == 5
    assert {n.split(".")[0] for n in vit[0]} == {"patch_embed", "pos_embed"} and len(vit) == 12 + 2
    assert all(n.startswith(f"blocks.{i}.") for i, group in enumerate(vit[1:-1]) for n in group)
    assert vit[-1] == ["norm.weight", "norm.bias"]


def test_layer_groups_of_a_model_name_its_encoder_parameters():
    from dlscale.train.model import build_model
    model = build_model("supervised", EncoderConfig(name="small", width=4), (1, 16, 16))
    assert layer_groups(model) == [[f"encoder.{n}" for n in group] for group in layer_groups(model.encoder)]


@pytest.mark.parametrize(("cfg", "label"), [
    (dict(name="small", width=8), "small-w8"), (dict(name="resnet18"), "resnet18"),
    (dict(name="resnet18", small_input_stem=True), "resnet18-s"), (dict(name="vit_tiny"), "vit_tiny"),
    (dict(name="vit_small", patch_size=8), "vit_small-p8"), (dict(name="convnext_nano"), "convnext_nano")])
def test_architecture_labels_are_the_ones_transfer_studies_key_their_rows_by(cfg, label):
    from dlscale.transfer.features import EncoderSource
    source = EncoderSource("x", None, EncoderConfig(**cfg), (1, 64, 64), "minmax", "supervised")
    assert source.arch_label == f"{label}-64x64-minmax"


@pytest.mark.parametrize(("cfg", "text"), [(dict(name="small", width=8), "small CNN width 8"),
                                         (dict(name="resnet18", small_input_stem=True), "ResNet18 3x3 stem"),
                                         (dict(name="convnext_nano"), "convnext_nano")])
def test_the_quickstart_report_describes_a_run_s_encoder_in_words(tmp_path, cfg, text):
    from dlscale.export import save_encoder
    from dlscale.quickstart_report import encoder_text
    encoder = build_encoder(EncoderConfig(**cfg), (1, 32, 32))
    save_encoder(tmp_path / "encoder.pt", encoder, EncoderConfig(**cfg), {"image_shape": [1, 32, 32]})
    assert encoder_text(tmp_path) == f"{text} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M)"


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_each_backbone_config_holds_its_own_options_and_survives_copies(name):
    cfg = EncoderConfig(name=name)
    assert type(cfg) is backbone_class(name).Config and cfg.name == name
    assert copy.deepcopy(cfg) == cfg == pickle.loads(pickle.dumps(cfg))   # Ray trials get pickled configs
    assert dataclasses.replace(cfg, in_channels=3).in_channels == 3


def test_print_config_shows_the_chosen_backbone_s_options_with_their_docs_and_loads_back(tmp_path):
    from dlscale.train.config import load_config, print_config
    cfg = load_config(None, ["--model.encoder.name=vit_tiny", "--model.encoder.patch_size=8"])
    text = print_config(cfg)
    encoder = text[text.index("  encoder:"):text.index("  tasks:")]
    assert "patch_size: 8" in encoder and "# Side of the square patches" in encoder
    assert "width" not in encoder and "small_input_stem" not in encoder
    (tmp_path / "printed.yaml").write_text(text)
    assert load_config(tmp_path / "printed.yaml") == cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["--model.encoder.name=resnet18", "--model.encoder.width=8"],
     r"model\.encoder\.width=8 applies to small CNN.* encoders \(small.*\), not to 'resnet18'"),   # + registered ones
    (["--model.encoder.name=small", "--model.encoder.small_input_stem=true"],
     r"model\.encoder\.small_input_stem=True applies to ResNet encoders \(resnet18\), not to 'small'"),
    (["--model.encoder.name=small", "--model.encoder.depth=3"], r"unknown config key 'model\.encoder\.depth'"),
    (["--model.encoder.name=resnet50"], r"model\.encoder\.name: unknown encoder 'resnet50'"),
])
def test_another_backbone_s_option_is_refused_naming_the_key(overrides, message):
    from dlscale.train.config import load_config
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_naming_another_backbone_drops_the_options_of_the_one_it_replaces(tmp_path):
    """A file's resnet18 options do not follow an override (or a sweep trial) to another backbone."""
    from dlscale.recipes import config_path
    from dlscale.sweep.spec import DEFAULT_SWEEP_FILE, load_sweep, trial_config
    from dlscale.train.config import load_config
    full = config_path("full")
    assert load_config(full).model.encoder == EncoderConfig(name="resnet18", small_input_stem=True)
    assert load_config(full, ["--model.encoder.name=vit_small"]).model.encoder == EncoderConfig(name="vit_small")
    base = load_config(full, ["--model.encoder.name=small", "--model.encoder.width=8"], stage="multitask")
    assert base.model.encoder == EncoderConfig(name="small", width=8)
    trial = trial_config(base, {"model.encoder.name": "resnet18"})
    assert trial.model.encoder == EncoderConfig(name="resnet18")
    sweep = load_sweep(DEFAULT_SWEEP_FILE,                                             # its base: resnet18
                       ["--model.encoder.width=8", "--model.encoder.name=small"], data_dir=str(tmp_path))
    assert sweep.base.model.encoder == EncoderConfig(name="small", width=8)


# ---- files of format 2 (every backbone's options in every encoder config) still load --------------------------------

FORMAT_2_ENCODER = {"small_input_stem": False, "width": 32, "patch_size": None}


def test_a_format_2_config_yaml_with_the_flat_encoder_fields_loads(tmp_path):
    from dlscale.configtree import dump_yaml
    from dlscale.train.config import load_config
    tree = {"format_version": 2, "stage": "supervised",
            "model": {"encoder": {**FORMAT_2_ENCODER, "name": "small", "in_channels": 1, "width": 8}}}
    (tmp_path / "config.yaml").write_text(dump_yaml(tree))
    assert load_config(tmp_path / "config.yaml").model.encoder == EncoderConfig(name="small", width=8)
    tree["model"]["encoder"]["patch_size"] = 8       # set for a backbone that never read it: refused, named
    (tmp_path / "config.yaml").write_text(dump_yaml(tree))
    with pytest.raises(ValueError, match=r"model\.encoder\.patch_size=8 applies to ViT encoders"):
        load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize("portable", [False, True])
def test_a_format_2_encoder_with_the_flat_encoder_fields_loads(tmp_path, portable):
    import json
    from dlscale.export import FORMAT, load_encoder, save_encoder, save_portable_encoder
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="vit_tiny", patch_size=8), (1, 32, 32)).eval()
    info = {"image_shape": [1, 32, 32], "classes": ["no_sub", "cdm", "axion"]}
    flat = {**FORMAT_2_ENCODER, "name": "vit_tiny", "in_channels": 1, "patch_size": 8}
    if portable:
        save_portable_encoder(tmp_path, encoder, EncoderConfig(name="vit_tiny", patch_size=8), info)
        meta = json.loads((tmp_path / "encoder.json").read_text())
        (tmp_path / "encoder.json").write_text(json.dumps({**meta, "format_version": 2, "encoder_config": flat}))
    else:
        save_encoder(tmp_path / "encoder.pt", encoder, EncoderConfig(name="vit_tiny", patch_size=8), info)
        payload = torch.load(tmp_path / "encoder.pt", weights_only=True)
        torch.save({**payload, "format_version": 2, "encoder_config": flat}, tmp_path / "encoder.pt")
        assert torch.load(tmp_path / "encoder.pt", weights_only=True)["format"] == FORMAT
    loaded = load_encoder(tmp_path / ("encoder.json" if portable else "encoder.pt"))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))
    assert loaded.patch_size == 8
