"""Self-supervised pieces: NT-Xent (against the formula, and 2 real gloo ranks against one), MAE masking and loss,
the MAE head on ViT and CNN encoders, BYOL's EMA rule and schedule, and the lensing views."""
import json
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlscale.data.views import ViewConfig, random_view, robust_std, two_views
from dlscale.models.contrastive import BYOLHead, ProjectionHead, byol_tau, ema_update, gather_with_grad, nt_xent
from dlscale.models import EncoderConfig, build_encoder
from dlscale.models.mae import (MAEConfig, MAEHead, mask_patches, masked_patch_loss, patchify, random_masking,
                                unpatchify)


# ---- NT-Xent ---------------------------------------------------------------------------------------------------

def nt_xent_by_hand(z1: list[list[float]], z2: list[list[float]], temperature: float) -> float:
    """The SimCLR loss written out: anchors are both views of every image; the positive is the other view."""
    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]
    z = [unit(v) for v in z1 + z2]
    b = len(z1)
    total = 0.0
    for i in range(2 * b):
        sim = [sum(p * q for p, q in zip(z[i], z[k])) / temperature for k in range(2 * b)]
        positive = (i + b) % (2 * b)
        total += -sim[positive] + math.log(sum(math.exp(sim[k]) for k in range(2 * b) if k != i))
    return total / (2 * b)


def test_nt_xent_equals_the_formula_on_a_hand_built_batch():
    z1 = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
    z2 = [[0.9, 0.1, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]]
    for temperature in (0.1, 0.5, 2.0):
        got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature)
        assert got.item() == pytest.approx(nt_xent_by_hand(z1, z2, temperature), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_works_on_tiny_batches():
    torch.manual_seed(0)
    z = torch.randn(4, 8)
    assert nt_xent(z, z + 0.01 * torch.randn(4, 8)) < nt_xent(z, torch.randn(4, 8))
    one = nt_xent(torch.randn(1, 8, requires_grad=True), torch.randn(1, 8))   # no negatives: log(1) = 0
    assert torch.isfinite(one) and one.item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)


def test_gather_with_grad_is_the_identity_in_a_world_of_one():
    z = torch.randn(3, 4)
    assert gather_with_grad(z) is z


WORLD, PER_RANK, DIM, TEMPERATURE = 2, 3, 6, 0.3
TIMEOUT_S = 60


def _data():
    generator = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, WORLD * PER_RANK, DIM, generator=generator)
    torch.manual_seed(2)
    projection = torch.nn.Linear(DIM, 4)
    return x1, x2, projection


def _nt_xent_rank(rank, port, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        x1, x2, projection = _data()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        x1, x2 = x1[part].clone().requires_grad_(), x2[part].clone().requires_grad_()
        loss = nt_xent(projection(x1), projection(x2), TEMPERATURE)
        loss.backward()
        # what data-parallel training does with the ranks' losses and parameter gradients: average them
        averaged = [loss.detach().clone(), projection.weight.grad, projection.bias.grad]
        for tensor in averaged:
            dist.all_reduce(tensor)
            tensor /= WORLD
        inputs = [torch.cat([x1.grad, x2.grad]) for _ in range(WORLD)]
        dist.all_gather(inputs, torch.cat([x1.grad, x2.grad]))
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"loss": averaged[0].item(), "weight_grad": averaged[1].tolist(),
                           "bias_grad": averaged[2].tolist(), "input_grads": [g.tolist() for g in inputs]}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nt_xent_on_two_ranks_equals_one_rank_on_the_concatenated_batch(tmp_path):
    result_file = tmp_path / "ranks.json"
    # Ranks fork from a fork server that imported torch once (a clean process: no process group of an earlier test)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "dlscale.models.contrastive"])
    context = mp.start_processes(_nt_xent_rank, args=(_free_port(), str(result_file)), nprocs=WORLD, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            assert time.monotonic() < deadline, f"{WORLD} ranks still running after {2 * TIMEOUT_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = json.loads(result_file.read_text())

    x1, x2, projection = _data()
    x1.requires_grad_(), x2.requires_grad_()
    loss = nt_xent(projection(x1), projection(x2), TEMPERATURE)
    loss.backward()
    assert ranks["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(ranks["weight_grad"]), projection.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks["bias_grad"]), projection.bias.grad, rtol=1e-4, atol=1e-6)
    # each rank's input gradient is the global loss's, times the world (the data-parallel average divides it)
    for rank, grads in enumerate(ranks["input_grads"]):
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        expected = torch.cat([x1.grad[part], x2.grad[part]]) * WORLD
        torch.testing.assert_close(torch.tensor(grads), expected, rtol=1e-4, atol=1e-6)
    # the other rank's embeddings were negatives: local-only losses average to something else
    local = sum(nt_xent(projection(x1[p]), projection(x2[p]), TEMPERATURE).item()
                for p in (slice(0, PER_RANK), slice(PER_RANK, None))) / WORLD
    assert abs(local - ranks["loss"]) > 1e-3


# ---- MAE -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_patches", "ratio", "hidden"), [(64, 0.75, 48), (225, 0.75, 169), (16, 0.5, 8),
                                                           (10, 0.0, 0), (7, 0.9, 6)])
def test_random_masking_hides_exactly_the_rounded_ratio(n_patches, ratio, hidden):
    keep, mask = random_masking(32, n_patches, ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (32, n_patches)
    assert (mask.sum(dim=1) == hidden).all()
    assert keep.shape == (32, n_patches - hidden)
    assert (keep.diff(dim=1) > 0).all()                                   # sorted, no repeats
    assert not mask.gather(1, keep).any()                                 # kept = not hidden


def test_random_masking_is_random_per_image_and_reproducible_per_seed():
    draw = lambda seed: random_masking(8, 64, 0.75, torch.Generator().manual_seed(seed))[1]   # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert len({tuple(row.tolist()) for row in draw(3)}) == 8


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.99])
def test_random_masking_refuses_ratios_that_leave_nothing_or_are_out_of_range(ratio):
    with pytest.raises(ValueError, match="mask ratio"):
        random_masking(2, 16, ratio)


def test_patchify_takes_row_major_patches_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 3 * 64)
    torch.testing.assert_close(patches[1, 4], images[1, :, 8:16, 8:16].reshape(-1))   # row 1, column 1
    assert torch.equal(unpatchify(patches, 8, (3, 16, 24)), images)
    with pytest.raises(ValueError, match="patch_size=5 must divide the image size 16x24"):
        patchify(images, 5)


def test_mask_patches_zeroes_exactly_the_hidden_patches():
    images = torch.rand(2, 1, 16, 16) + 1.0
    _, mask = random_masking(2, 4, 0.5, torch.Generator().manual_seed(0))
    masked = patchify(mask_patches(images, mask, 8), 8)
    assert (masked[mask] == 0).all()
    assert torch.equal(masked[~mask], patchify(images, 8)[~mask])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_loss_ignores_visible_patches(norm_pix):
    torch.manual_seed(0)
    pred, target = torch.randn(4, 16, 12), torch.randn(4, 16, 12)
    _, mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    loss = masked_patch_loss(pred, target, mask, norm_pix)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~mask], target2[~mask] = 100.0, -7.0
    assert masked_patch_loss(pred2, target2, mask, norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)
    pred2[mask.nonzero()[0].tolist()] += 1.0                   # one hidden patch: the loss moves
    assert masked_patch_loss(pred2, target2, mask, norm_pix).item() != pytest.approx(loss.item(), rel=1e-6)


def test_masked_patch_loss_values():
    target = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[True, False]])
    assert masked_patch_loss(pred, target, mask).item() == pytest.approx(5.0)            # (1 + 9) / 2
    assert masked_patch_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(1.0, rel=1e-5)  # (-1, 1)


@pytest.mark.parametrize(("name", "size"), [("vit_tiny", 64), ("small", 64), ("vit_tiny", 150)])
def test_mae_head_reconstructs_from_visible_patches_only(name, size):
    """The prediction does not depend on the hidden pixels (ViT: never encoded; CNN: zeroed), and training
    reaches the encoder and the decoder."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name=name, width=8), (1, size, size)) if name == "small" else \
        build_encoder(EncoderConfig(name=name), (1, size, size))
    head = MAEHead(encoder, (1, size, size), MAEConfig(decoder_dim=32, decoder_depth=1))
    patch = 8 if size == 64 else 10
    assert head.patch_size == patch and head.n_patches == (size // patch) ** 2
    images = torch.randn(2, 1, size, size)
    out = head(encoder, images, torch.Generator().manual_seed(5))
    assert out["pred"].shape == (2, head.n_patches, patch * patch) and out["mask"].sum() == 2 * round(
        0.75 * head.n_patches)
    loss = head.loss(images, **out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in list(encoder.parameters()) + list(head.parameters()))
    encoder.eval(), head.eval()
    changed = unpatchify(patchify(images, patch).masked_fill(out["mask"].unsqueeze(-1), 50.0), patch,
                         (1, size, size))
    with torch.no_grad():
        first = head(encoder, images, torch.Generator().manual_seed(5))
        second = head(encoder, changed, torch.Generator().manual_seed(5))
    assert torch.equal(first["mask"], out["mask"])
    torch.testing.assert_close(first["pred"], second["pred"])
    shown = head.reconstruction(images, first["pred"], first["mask"])
    assert shown.shape == images.shape
    assert torch.equal(patchify(shown, patch)[~first["mask"]], patchify(images, patch)[~first["mask"]])


def test_mae_head_rejects_a_patch_size_that_contradicts_the_vit():
    encoder = build_encoder(EncoderConfig(name="vit_tiny"), (1, 64, 64))
    with pytest.raises(ValueError, match="MAE patch_size=16 differs from the ViT's own patch size 8"):
        MAEHead(encoder, (1, 64, 64), MAEConfig(patch_size=16))
    with pytest.raises(ValueError, match="MAE patch_size=7 must divide"):
        MAEHead(build_encoder(EncoderConfig(name="small", width=8)), (1, 64, 64), MAEConfig(patch_size=7))


# ---- BYOL ------------------------------------------------------------------------------------------------------

def test_ema_update_follows_its_rule():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="small", width=8))
    head = BYOLHead(encoder, hidden_dim=16, out_dim=8)
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(head.projector.parameters()):
            p.add_(torch.randn_like(p))
    encoder(torch.randn(4, 1, 16, 16))                      # moves the online BatchNorm statistics
    before = {k: v.clone() for k, v in head.target_encoder.state_dict().items()}
    head.update_target(encoder, tau=0.9)
    online = encoder.state_dict()
    for key, value in head.target_encoder.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, online[key])           # buffers copied
        else:
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key])
    ema_update(head.target_projector, head.projector, tau=0.0)             # tau 0: a copy
    copied = {k: v.clone() for k, v in head.target_projector.state_dict().items()}
    assert all(torch.equal(v, head.projector.state_dict()[k]) for k, v in copied.items())
    with torch.no_grad():
        head.projector.net[0].weight.add_(1.0)
    ema_update(head.target_projector, head.projector, tau=1.0)             # tau 1: frozen
    assert all(torch.equal(v, copied[k]) for k, v in head.target_projector.state_dict().items())
    with pytest.raises(ValueError, match="differ in structure"):
        ema_update(head.target_projector, head.predictor.net[:2], 0.5)
    with pytest.raises(ValueError, match="tau must be in"):
        ema_update(head.target_projector, head.projector, 1.5)


def test_byol_trains_the_online_network_only_at_batch_two():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="small", width=8))
    head = BYOLHead(encoder, hidden_dim=16, out_dim=8)
    views = two_views(torch.randn(2, 1, 32, 32), ViewConfig(), torch.Generator().manual_seed(0))
    loss = head(encoder, *views)
    loss.backward()
    assert 0.0 <= loss.item() <= 4.0
    online = list(encoder.parameters()) + list(head.projector.parameters()) + list(head.predictor.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    target = list(head.target_encoder.parameters()) + list(head.target_projector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in target)


def test_byol_tau_rises_from_base_to_one_on_a_cosine():
    assert byol_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert byol_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert byol_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert byol_tau(250, 100, 0.99) == pytest.approx(1.0)
    assert byol_tau(25, 100, 0.99) < byol_tau(26, 100, 0.99)


def test_projection_head_takes_maps_and_single_samples():
    head = ProjectionHead(16, 32, 8)
    assert head(torch.randn(1, 16, 3, 3)).shape == (1, 8)
    with pytest.raises(ValueError, match="projection norm"):
        ProjectionHead(16, norm="group")


# ---- views -----------------------------------------------------------------------------------------------------

def lens_like(batch: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Background noise of std 0.05 around 0.1 plus a bright off-centre blob: no symmetry."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    blob = torch.exp(-((x - side * 0.6) ** 2 + (y - side * 0.4) ** 2) / 8.0)
    return 0.1 + 0.05 * torch.randn(batch, 1, side, side, generator=generator) + blob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_views_keep_shape_dtype_device_and_differ(dtype):
    images = lens_like().to(dtype)
    a, b = two_views(images, ViewConfig(), torch.Generator().manual_seed(0))
    for view in (a, b):
        assert view.shape == images.shape and view.dtype == dtype and view.device == images.device
        assert not torch.allclose(view, images)
    assert not torch.allclose(a, b)


def test_views_are_deterministic_per_generator_seed():
    images, cfg = lens_like(), ViewConfig()
    first = two_views(images, cfg, torch.Generator().manual_seed(7))
    again = two_views(images, cfg, torch.Generator().manual_seed(7))
    other = two_views(images, cfg, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])


OFF = dict(dihedral=False, max_shift=0, blur_prob=0.0, noise_level=0.0, flux_scale=1.0)


def test_dihedral_views_are_symmetries_of_the_image():
    images = lens_like(batch=16)
    view = random_view(images, ViewConfig(**(OFF | {"dihedral": True})), torch.Generator().manual_seed(0))
    seen = set()
    for image, v in zip(images, view):
        symmetries = [image.rot90(k, (-2, -1)) for k in range(4)]
        symmetries += [s.flip(-1) for s in symmetries]
        matches = [k for k, s in enumerate(symmetries) if torch.equal(v, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 4


def test_shifted_views_are_the_image_moved_by_at_most_max_shift():
    images = lens_like(batch=8)
    view = random_view(images, ViewConfig(**(OFF | {"max_shift": 3})), torch.Generator().manual_seed(0))
    for image, v in zip(images, view):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(v[:, 3:-3, 3:-3], image[:, 3 + dy:29 + dy, 3 + dx:29 + dx])]
        assert len(found) == 1


def test_blur_keeps_flux_and_smooths():
    images = lens_like()
    cfg = ViewConfig(**(OFF | {"blur_prob": 1.0, "blur_sigma": (1.0, 1.5)}))
    view = random_view(images, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(view.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)), rtol=1e-2, atol=0)
    assert (view.diff(dim=-1).abs().mean(dim=(1, 2, 3)) < 0.6 * images.diff(dim=-1).abs().mean(dim=(1, 2, 3))).all()


def test_noise_follows_each_images_own_level():
    images = lens_like(batch=64, side=64)
    images[32:] *= 10.0                                      # ten times the noise and the flux
    cfg = ViewConfig(**(OFF | {"noise_level": 0.5}))
    added = (random_view(images, cfg, torch.Generator().manual_seed(0)) - images).flatten(1).std(dim=1)
    level = robust_std(images).flatten()
    torch.testing.assert_close(level[:32].mean() * 10, level[32:].mean(), rtol=0.05, atol=0)
    assert (added <= 0.5 * level * 1.1).all()
    assert added[32:].mean() / added[:32].mean() == pytest.approx(10.0, rel=0.3)


def test_flux_scaling_is_about_the_background():
    images = lens_like()
    view = random_view(images, ViewConfig(**(OFF | {"flux_scale": 1.5})), torch.Generator().manual_seed(0))
    median = images.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    factor = ((view - median).flatten(1) / (images - median).flatten(1)).nanmedian(dim=1).values
    assert ((factor >= 1 / 1.5 - 1e-4) & (factor <= 1.5 + 1e-4)).all() and factor.std() > 0
    torch.testing.assert_close(view, median + factor.view(-1, 1, 1, 1) * (images - median))


def test_view_config_and_input_are_checked():
    with pytest.raises(ValueError, match="max_shift must be >= 0.*flux_scale must be >= 1"):
        ViewConfig(max_shift=-1, flux_scale=0.5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) batch"):
        random_view(torch.randn(1, 8, 8), ViewConfig(), torch.Generator())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on cuda"):
            random_view(torch.randn(1, 1, 8, 8), ViewConfig(), torch.Generator(device="cuda"))
