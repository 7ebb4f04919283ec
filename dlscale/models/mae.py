"""Masked-autoencoder pre-training pieces: patch masking, patch <-> image reshaping, the masked-patch loss, a light
transformer decoder for ViT tokens, and the head that runs either path.

ViT encoders see only the visible patches (`forward_visible`: the cost of the encoder scales with 1 - ratio); CNN
encoders get the whole image with the masked patches zeroed and the reconstruction decoder rebuilds it. Both are
scored on the masked patches only, so copying visible pixels earns nothing. Everything stays on the images'
device: masks come from a torch.Generator there, without host round trips.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlscale.models.timm_backbones import check_patch_size, default_patch_size
from dlscale.models.heads import Decoder


@dataclass
class MAEConfig:
    """Masking and decoder of MAE pre-training."""

    mask_ratio: float = 0.75
    """Fraction of the patches hidden from the encoder (exactly round(ratio * patches) per image)."""
    norm_pix: bool = False
    """Score each patch after normalising its target pixels to zero mean, unit variance (MAE's `norm_pix_loss`):
    faint arcs then weigh as much as the bright lens galaxy."""
    patch_size: int | None = None
    """CNN encoders only: side of the masked squares (None: as a ViT would patch the image). ViTs mask their own
    patches."""
    decoder_dim: int = 128
    """ViT only: width of the transformer decoder."""
    decoder_depth: int = 2
    """ViT only: transformer blocks of the decoder."""
    decoder_heads: int = 4
    """ViT only: attention heads of the decoder blocks (must divide decoder_dim)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"MAE mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1:
            raise ValueError(f"MAE decoder_dim, decoder_depth and decoder_heads must be >= 1, got "
                             f"{self.decoder_dim}, {self.decoder_depth}, {self.decoder_heads}")


def random_masking(batch: int, n_patches: int, ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw which patches every image keeps: `keep_index` (batch, n_keep) in increasing order and `mask`
    (batch, n_patches), True where hidden. Exactly round(ratio * n_patches) patches are hidden in each image.

    Drawn on `generator`'s device (else `device`), so a CUDA generator never waits on the host.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_keep = n_patches - round(ratio * n_patches)
    if n_keep < 1:
        raise ValueError(f"mask ratio {ratio} hides all {n_patches} patches: lower it or use smaller patches")
    device = generator.device if generator is not None else device
    noise = torch.rand(batch, n_patches, generator=generator, device=device)
    keep_index = noise.topk(n_keep, dim=1, largest=False).indices.sort(dim=1).values
    mask = torch.ones(batch, n_patches, dtype=torch.bool, device=noise.device).scatter_(1, keep_index, False)
    return keep_index, mask


def _grid(images_shape: torch.Size | tuple[int, ...], patch_size: int) -> tuple[int, int]:
    height, width = images_shape[-2:]
    check_patch_size(patch_size, height, width, field="patch_size")
    return height // patch_size, width // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * p * p): patches in row-major grid order (a ViT's token order)."""
    b, c = images.shape[:2]
    gh, gw = _grid(images.shape, patch_size)
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, gh * gw, c * patch_size * patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, C * p * p) -> (B, C, H, W)."""
    c, height, width = image_shape
    gh, gw = _grid((height, width), patch_size)
    if patches.shape[1:] != (gh * gw, c * patch_size * patch_size):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not tile a {tuple(image_shape)} image with "
                         f"patch size {patch_size}: expected (B, {gh * gw}, {c * patch_size * patch_size})")
    images = patches.reshape(-1, gh, gw, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(-1, c, height, width)


def mask_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero the hidden patches (`mask` (B, N) True) of normalised images: the CNN encoders' masked input."""
    b, c, height, width = images.shape
    gh, gw = _grid(images.shape, patch_size)
    hidden = mask.reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch_size, gw, patch_size)
    return images.masked_fill(hidden.reshape(b, 1, height, width), 0.0)


def _patch_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool,
                  eps: float) -> torch.Tensor:
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
                         "must be (B, N, P), (B, N, P) and (B, N)")
    pred, target = pred.float(), target.float()     # float32 even in bf16 runs
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, correction=0)
        target = (target - mean) / (var + eps).sqrt()
    return (pred - target).square().mean(dim=-1)     # (B, N)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False,
                      eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over the hidden patches only (`mask` (B, N) True); `pred`, `target` (B, N, P).

    `norm_pix`: each target patch is standardised over its own pixels first (flat patches: eps keeps it finite).
    """
    weight = mask.float()
    return (_patch_errors(pred, target, mask, norm_pix, eps) * weight).sum() / weight.sum().clamp_min(1.0)


def masked_patch_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False,
                       eps: float = 1e-6) -> torch.Tensor:
    """Per image (B,): the mean squared error of its hidden patches, as `masked_patch_loss` scores them."""
    weight = mask.float()
    return (_patch_errors(pred, target, mask, norm_pix, eps) * weight).sum(1) / weight.sum(1).clamp_min(1.0)


class MAEDecoder(nn.Module):
    """MAE's light decoder: visible tokens projected to `dim`, a shared learned mask token at every hidden
    position, fixed 2-D sin-cos position embeddings, a few transformer blocks, a linear layer to patch pixels."""

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], patch_dim: int, dim: int = 128,
                 depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        if dim % 4 or dim % num_heads:
            raise ValueError(f"MAE decoder_dim={dim} must be divisible by 4 (2-D sin-cos positions) and by "
                             f"decoder_heads={num_heads}")
        self.grid_size = tuple(grid_size)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        # a pure function of the grid: not saved in checkpoints
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(self.grid_size), dim).unsqueeze(0),
                             persistent=False)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, visible: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """(B, n_keep, encoder_dim) tokens of the patches `keep_index` names -> (B, N, patch_dim) for all patches."""
        tokens = self.embed(visible)
        b, n = tokens.shape[0], self.pos_embed.shape[1]
        index = keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        full = self.mask_token.to(tokens.dtype).expand(b, n, -1).scatter(1, index, tokens)
        return self.pred(self.norm(self.blocks(full + self.pos_embed.to(tokens.dtype))))


class MAEHead(nn.Module):
    """The MAE pretext task on a shared encoder: masking, encoder pass, decoder, loss.

    The encoder is passed to `forward` rather than held, so a model with several heads keeps one copy of it. ViT
    encoders (those with `forward_visible`) get the `MAEDecoder`; CNNs the zeroed-patch input and the light
    reconstruction `Decoder`.
    """

    def __init__(self, encoder: nn.Module, image_shape: tuple[int, int, int], cfg: MAEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MAEConfig()
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        channels, height, width = self.image_shape
        self.vit = hasattr(encoder, "forward_visible")
        if self.vit:
            if cfg.patch_size is not None and cfg.patch_size != encoder.patch_size:
                raise ValueError(f"MAE patch_size={cfg.patch_size} differs from the ViT's own patch size "
                                 f"{encoder.patch_size}: leave the MAE patch_size unset for ViT encoders")
            self.patch_size = encoder.patch_size
            self.decoder: nn.Module = MAEDecoder(encoder.out_channels, encoder.grid_size,
                                                 channels * self.patch_size ** 2, cfg.decoder_dim,
                                                 cfg.decoder_depth, cfg.decoder_heads)
        else:
            self.patch_size = cfg.patch_size or default_patch_size(height, width)
            check_patch_size(self.patch_size, height, width, field="MAE patch_size")
            self.decoder = Decoder(encoder.out_channels, self.image_shape, scale=encoder.downsample)
        self.n_patches = (height // self.patch_size) * (width // self.patch_size)
        random_masking(1, self.n_patches, cfg.mask_ratio, device="cpu")     # refuse a bad ratio at build time

    def forward(self, encoder: nn.Module, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`pred` (B, N, C * p * p): every patch as reconstructed; `mask` (B, N): True where hidden."""
        keep_index, mask = random_masking(images.shape[0], self.n_patches, self.cfg.mask_ratio, generator,
                                          device=images.device)
        if self.vit:
            pred = self.decoder(encoder.forward_visible(images, keep_index), keep_index)
        else:
            pred = patchify(self.decoder(encoder(mask_patches(images, mask, self.patch_size))), self.patch_size)
        return {"pred": pred, "mask": mask}

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(pred, patchify(images, self.patch_size), mask, self.cfg.norm_pix)

    def reconstruction(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images with the hidden patches replaced by their reconstruction, for display (in the input's units
        unless `norm_pix`, whose patches are standardised)."""
        target = patchify(images, self.patch_size)
        merged = torch.where(mask.unsqueeze(-1), pred.to(target.dtype), target)
        return unpatchify(merged, self.patch_size, self.image_shape)
