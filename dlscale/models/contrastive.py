"""Contrastive and self-distillation pre-training pieces: SimCLR's NT-Xent with negatives from every rank, a
projection head, and BYOL (predictor, EMA target network, its update rule and schedule).

Both work at the small per-rank batches of lensing runs: NT-Xent gathers the other ranks' embeddings as extra
negatives (gradients flow back to the rank that made them), and BYOL needs no negatives at all. The heads default
to LayerNorm, which, unlike BatchNorm, does not depend on the batch.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the summed gradient of its own slice.

    Every rank's loss depends on every rank's embeddings; summing the gradients (an all_reduce, which every backend
    has, then the own slice) makes the data-parallel average of the ranks' gradients that of the global loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (equal shapes on every rank) from all ranks in rank order, differentiably; the tensor
    itself in a world of one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy of two views' embeddings (B, D) of the same B images.

    Each of the 2B local embeddings must pick its other view among all 2 W B embeddings of the W ranks but itself
    (cosine similarity / temperature). Returns the mean over the local anchors, so the ranks' average is the loss
    of the concatenated global batch (`gather=False`: local negatives only).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent takes two (B, D) embeddings of equal shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)    # float32 even in bf16 runs
    queries = torch.cat([z1, z2])                                       # (2B, D)
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        k1, k2 = gather_with_grad(z1), gather_with_grad(z2)            # (W B, D) each
    else:
        rank, k1, k2 = 0, z1, z2
    keys = torch.cat([k1, k2])                                          # (2 W B, D): view 1 of all, then view 2
    b, n = z1.shape[0], k1.shape[0]
    local = torch.arange(b, device=z1.device) + rank * b                # global index of the local images
    own = torch.cat([local, local + n])                                 # each query's own column among the keys
    positive = torch.cat([local + n, local])                            # its other view's column
    logits = queries @ keys.T / temperature
    logits = logits.masked_fill(own[:, None] == torch.arange(2 * n, device=z1.device), float("-inf"))
    return F.cross_entropy(logits, positive)


def _norm1d(kind: str, features: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(features)
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"projection norm must be 'layer', 'batch' or 'none', got {kind!r}")


class ProjectionHead(nn.Module):
    """MLP from pooled encoder features to the space the contrastive loss compares: Linear, norm, ReLU, Linear
    (SimCLR's projector; also BYOL's projector and predictor). Takes (B, C) or a (B, C, h, w) map (pooled)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, norm: str = "layer") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), _norm1d(norm, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.mean(dim=(2, 3)) if features.dim() == 4 else features)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online for every parameter; buffers (BatchNorm statistics) copied.

    The two modules must have the same structure (the target is a copy of the online network)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA tau must be in [0, 1], got {tau}")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    t_buffers, o_buffers = dict(target.named_buffers()), dict(online.named_buffers())
    if t_params.keys() != o_params.keys() or t_buffers.keys() != o_buffers.keys():
        raise ValueError("EMA target and online networks differ in structure: "
                         f"{sorted(set(t_params) ^ set(o_params) | set(t_buffers) ^ set(o_buffers))[:10]}")
    names = list(t_params)
    torch._foreach_lerp_([t_params[k].data for k in names], [o_params[k].data for k in names], 1.0 - tau)
    for name, buffer in t_buffers.items():
        buffer.copy_(o_buffers[name])


def byol_tau(step: int, total_steps: int, base_tau: float = 0.996) -> float:
    """BYOL's cosine schedule: tau rises from `base_tau` at step 0 to 1 at `total_steps` (the target freezes as
    training converges)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target), averaged over the batch; the target carries no gradient."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()


class BYOLHead(nn.Module):
    """BYOL on a shared encoder: online projector and predictor, and a target (a copy of the encoder and the
    projector) that follows the online network by EMA and is never trained by gradients.

    The online encoder is passed to `forward` rather than held, so a model with several heads keeps one copy of
    it; call `update_target(encoder, tau)` after every optimiser step.
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 512, out_dim: int = 128, norm: str = "layer") -> None:
        super().__init__()
        self.projector = ProjectionHead(encoder.out_channels, hidden_dim, out_dim, norm)
        self.predictor = ProjectionHead(out_dim, hidden_dim, out_dim, norm)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for module in (self.target_encoder, self.target_projector):
            module.requires_grad_(False)

    def forward(self, encoder: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """The symmetric BYOL loss of two views of the same images: each view's prediction of the other's target."""
        online = self.predictor(self.projector(encoder(torch.cat([view1, view2]))))
        with torch.no_grad():
            target = self.target_projector(self.target_encoder(torch.cat([view2, view1])))
        return byol_loss(online, target)

    @torch.no_grad()
    def update_target(self, encoder: nn.Module, tau: float) -> None:
        ema_update(self.target_encoder, encoder, tau)
        ema_update(self.target_projector, self.projector, tau)
