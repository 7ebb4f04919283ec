"""Encoders, heads and the multitask wrapper: shapes at DeepLense sizes, weight loading, gradients."""

import math
from dataclasses import replace

import pytest
import torch

from dlscale.models import Decoder, EncoderConfig, build_encoder
from dlscale.data.classes import CLASSES
from dlscale.train.model import build_model, init_encoder


ENCODERS = {
    "small": EncoderConfig(name="small", width=8),
    "resnet18": EncoderConfig(name="resnet18"),
    "resnet18_small_stem": EncoderConfig(name="resnet18", small_input_stem=True),
}


@pytest.mark.parametrize("size", [64, 150])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_feature_map_matches_out_channels_and_downsample(encoder, channels, size):
    net = build_encoder(replace(ENCODERS[encoder], in_channels=channels)).eval()
    with torch.no_grad():
        feature_map = net(torch.randn(1, channels, size, size))
    side = math.ceil(size / net.downsample)
    assert feature_map.shape == (1, net.out_channels, side, side)


@pytest.mark.parametrize("size", [64, 150])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_multitask_outputs_have_task_shapes_and_recon_matches_input(encoder, channels, size):
    cfg = replace(ENCODERS[encoder], in_channels=channels)
    model = build_model("multitask", cfg, (channels, size, size), n_classes=3, n_reg_targets=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert model.tasks == ("recon", "classification", "regression")
    assert {key: tuple(value.shape) for key, value in out.items()} == {
        "features": (2, model.encoder.out_channels),
        "recon": (2, channels, size, size),
        "logits": (2, 3),
        "regression": (2, 4),
    }


@pytest.mark.parametrize(("stage", "keys"), [
    ("autoencoder", {"features", "recon"}),
    ("supervised", {"features", "logits"}),
])
def test_single_task_stages_have_only_their_head(stage, keys):
    model = build_model(stage, ENCODERS["small"], (1, 64, 64)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert set(out) == keys


def test_multitask_builds_only_the_chosen_heads():
    model = build_model("multitask", ENCODERS["small"], (1, 64, 64), n_reg_targets=2,
                        tasks=["regression", "classification"])
    assert model.tasks == ("classification", "regression")
    assert "recon" not in model.heads
    assert set(model(torch.randn(2, 1, 64, 64))) == {"features", "logits", "regression"}


@pytest.mark.parametrize("encoder", ["small", "resnet18"])
def test_features_are_the_channel_means_of_the_encoder_feature_map(encoder):
    """`features` is the global average pool of the encoder's map, computed here without `global_pool`."""
    torch.manual_seed(0)
    model = build_model("supervised", ENCODERS[encoder], (1, 64, 64)).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        feature_map = model.encoder(x)
        by_hand = feature_map.flatten(2).sum(-1) / (feature_map.shape[-2] * feature_map.shape[-1])
        assert feature_map.shape[-2:] != (1, 1)
        torch.testing.assert_close(model.features(x), by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x)["features"], by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["small", "resnet18"])
def test_eval_features_of_an_image_do_not_depend_on_the_rest_of_the_batch(encoder):
    """In eval mode (running BatchNorm statistics) one image alone and inside a batch has the same features."""
    torch.manual_seed(0)
    model = build_model("supervised", ENCODERS[encoder], (1, 64, 64))
    with torch.no_grad():   # move the running statistics away from their initial (0, 1)
        model.train()(3.0 * torch.randn(8, 1, 64, 64) + 1.0)
    model.eval()
    x = torch.randn(5, 1, 64, 64)
    with torch.no_grad():
        alone = model.features(x[2:3])
        in_batch = model.features(x)[2:3]
        shuffled = model.features(x.flip(0))[2:3]
        assert not torch.allclose(alone, model.features(x[0:1]))
        torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shuffled, alone, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_gradient_in_multitask():
    torch.manual_seed(0)
    model = build_model("multitask", ENCODERS["small"], (1, 64, 64), n_reg_targets=2)
    out = model(torch.randn(4, 1, 64, 64))
    sum(value.square().mean() for key, value in out.items() if key != "features").backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_decoder_reaches_sizes_that_are_not_multiples_of_its_scale():
    decoder = Decoder(16, (2, 75, 93), scale=8)
    assert decoder(torch.randn(1, 16, 10, 12)).shape == (1, 2, 75, 93)


def test_decoder_takes_scales_that_are_not_powers_of_two():
    """A ViT's patch 10 on 150x150 images: its 15x15 token map is the decoder's input."""
    assert Decoder(16, (1, 150, 150), scale=10)(torch.randn(1, 16, 15, 15)).shape == (1, 1, 150, 150)


def test_unknown_encoder_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet18.*small"):
        build_encoder(EncoderConfig(name="vit"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stage": "pretrain"}, "unknown stage"),
    ({"image_shape": (3, 64, 64)}, "channels"),
    ({"stage": "multitask", "tasks": ["regression"]}, "n_reg_targets"),
    ({"stage": "multitask", "tasks": ["segmentation"]}, "unknown tasks"),
    ({"stage": "supervised", "tasks": ["recon"]}, "trains tasks"),
])
def test_build_model_rejects_bad_arguments(kwargs, message):
    arguments = {"stage": "autoencoder", "encoder_cfg": ENCODERS["small"], "image_shape": (1, 64, 64)} | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(**arguments)


def init(cfg: EncoderConfig, path) -> torch.nn.Module:
    """A fresh encoder of `cfg` started from `path` as `init_from` does (64x64 single-channel data)."""
    encoder = build_encoder(cfg)
    init_encoder(encoder, path, cfg, (1, 64, 64), CLASSES)
    return encoder


def test_init_from_loads_an_encoder_state_dict(tmp_path):
    source = build_encoder(ENCODERS["small"])
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_()
    path = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), path)
    loaded = init(ENCODERS["small"], path)
    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_init_from_takes_the_encoder_of_a_whole_model_state_dict(tmp_path):
    autoencoder = build_model("autoencoder", ENCODERS["small"], (1, 64, 64))
    path = tmp_path / "autoencoder.pt"
    torch.save(autoencoder.state_dict(), path)
    model = build_model("multitask", ENCODERS["small"], (1, 64, 64))
    init_encoder(model.encoder, path, ENCODERS["small"], (1, 64, 64), CLASSES)
    expected = autoencoder.encoder.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.encoder.state_dict().items())


def test_init_from_a_state_dict_of_other_widths_names_file_and_keys(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(build_encoder(replace(ENCODERS["small"], width=16)).state_dict(), path)
    with pytest.raises(ValueError, match=r"wide\.pt.*shape mismatch: 0\.0\.weight \(file \(16, 1, 3, 3\), model \(8"):
        init(ENCODERS["small"], path)


def test_init_from_a_state_dict_with_missing_and_unexpected_keys_names_them(tmp_path):
    state = build_encoder(ENCODERS["small"]).state_dict()
    state["head.weight"] = state.pop("2.1.weight")
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"partial\.pt.*missing keys: 2\.1\.weight; unexpected keys: head\.weight"):
        init(ENCODERS["small"], path)


def test_init_from_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        init(ENCODERS["small"], tmp_path / "nowhere.pt")
