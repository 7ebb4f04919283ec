"""Domain adaptation tasks: align the encoder's features of the labelled domain with those of an unlabelled target
domain (`data.target`; the batch carries its images under `TARGET_DOMAIN`). Combined with `classification` under
any loss weighting (stage `adapt`: classification + dann).

- `dann` (Ganin et al. 2016, "Domain-adversarial training of neural networks"): a domain classifier on the pooled
  features, behind a gradient-reversal layer. The classifier learns to tell the domains apart; the encoder receives
  the reversed gradient, scaled by lambda(p) = 2 / (1 + exp(-gamma p)) - 1 (gamma = 10) over training progress p in
  [0, 1], so it learns features the classifier cannot separate.
- `coral` (Sun & Saenko 2016, "Deep CORAL"): the squared Frobenius distance between the two domains' feature
  covariances, divided by 4 d^2. Blind to a shift of the mean.
- `mmd` (Long et al. 2015, "Learning transferable features with deep adaptation networks"): the squared maximum
  mean discrepancy under a sum of Gaussian kernels, which sees every moment of the two feature distributions.
- `sinkhorn` (Feydy et al. 2019, "Interpolating between optimal transport and MMDs using Sinkhorn divergences";
  `geomloss`): the debiased Sinkhorn divergence between the two domains' features (optimal transport with an
  entropic blur), which moves each target feature towards the labelled ones near it rather than matching averages.
- `adda` (Tzeng et al. 2017, "Adversarial discriminative domain adaptation"): the run's encoder is the target
  encoder (start it from the source run: `init_from`); a frozen copy of it, taken as the first training step
  starts, is the source encoder. A discriminator learns source features (frozen copy, labelled images) from target features
  (trained encoder, target images); the encoder is trained with the inverted-label GAN loss (its target features
  labelled "source"), which keeps its gradient when the discriminator wins, unlike a reversed one. The
  discriminator gets no gradient from the encoder's term. Give the encoder a much smaller learning rate than the
  discriminator with `optim.encoder_lr_scale` (e.g. 0.1).

All read the target's pooled features that `TaskModel` computes in the same encoder pass as the labelled images
(one BatchNorm statistic for both domains, in training as at evaluation; the tasks share that pass).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from geomloss import SamplesLoss
from torch import nn

from dlscale.models.heads import global_pool
from dlscale.models.model import TARGET_DOMAIN, TARGET_FEATURES
from dlscale.train.tasks.base import Task, register_task


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coefficient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
    return GradientReversal.apply(x, torch.as_tensor(coefficient, dtype=x.dtype, device=x.device))


def dann_coefficient(progress: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
    """Ganin et al.'s schedule, 2 / (1 + exp(-gamma p)) - 1: 0 at the start of training, towards 1 at its end
    (progress clipped to [0, 1]; a tensor, so the step never waits for the host)."""
    return 2.0 / (1.0 + torch.exp(-gamma * progress.float().clamp(0.0, 1.0))) - 1.0


def target_features(batch: dict) -> torch.Tensor:
    """Pooled encoder features (B', C) of the batch's target-domain images (`TaskModel` encodes them in the same
    pass as the labelled images)."""
    if TARGET_FEATURES not in batch:
        raise ValueError(f"this task adapts to a target domain and the batch has none ({TARGET_DOMAIN!r}): give the "
                         "target's images with --target-data DIR or data.target.source=simulate")
    return batch[TARGET_FEATURES]


def require_classifier(model: nn.Module, task: str) -> nn.Module:
    """The run's classifier head (task `classification`), which task `task` reads or trains; refused without it."""
    if "classification" not in model.heads:
        raise ValueError(f"task {task} works through the run's classifier: add task classification "
                         f"(model.tasks=[classification,{task},...])")
    return model.heads["classification"]


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: ||C_s - C_t||_F^2 / (4 d^2), C the unbiased covariance of (B, d) features."""
    d = source.shape[1]
    difference = torch.cov(source.float().T) - torch.cov(target.float().T)
    return difference.square().sum() / (4 * d * d)


def mmd_loss(source: torch.Tensor, target: torch.Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
             ) -> torch.Tensor:
    """Squared maximum mean discrepancy (biased estimate) under a sum of Gaussian kernels exp(-|x - y|^2 / (s h)),
    h the mean squared distance over both domains (detached; the bandwidth follows the features' scale) and s in
    `scales` (the multi-kernel MMD of Long et al. 2015). Unlike CORAL it sees every moment, the mean included."""
    x = torch.cat([source, target]).float()
    distances = torch.cdist(x, x).square()
    bandwidth = distances.detach().mean().clamp_min(1e-12)
    kernel = sum(torch.exp(-distances / (s * bandwidth)) for s in scales)
    n = len(source)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


@dataclass
class DANNConfig:
    hidden: int = 256
    """width of the domain classifier's two hidden layers"""
    gamma: float = 10.0
    """steepness of the reversal coefficient's ramp, 2 / (1 + exp(-gamma p)) - 1"""
    max_coefficient: float = 1.0
    """the coefficient's end value (its ramp is scaled by it)"""
    ramp_steps: int = 0
    """training batches over which p goes 0 -> 1; 0 = the whole run (epochs x batches per epoch)"""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.gamma <= 0 or self.max_coefficient < 0 or self.ramp_steps < 0:
            raise ValueError(f"model.task_options.dann: expected hidden >= 1, gamma > 0, max_coefficient >= 0 and "
                             f"ramp_steps >= 0 (got {self.hidden}, {self.gamma}, {self.max_coefficient}, "
                             f"{self.ramp_steps})")


    spectral_norm: bool = False
    """spectral normalisation of the domain classifier's layers (a Lipschitz critic: it cannot win outright, so
    the reversed gradient does not vanish)"""


class DomainClassifier(nn.Module):
    """Pooled features -> one logit (target domain), and the count of training batches seen, which sets the
    reversal coefficient (a buffer: checkpointed, so a resumed run continues the ramp exactly)."""

    def __init__(self, channels: int, hidden: int, spectral_norm: bool = False) -> None:
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        self.net = nn.Sequential(norm(nn.Linear(channels, hidden)), nn.ReLU(), norm(nn.Linear(hidden, hidden)),
                                 nn.ReLU(), norm(nn.Linear(hidden, 1)))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


@register_task
class DANN(Task):
    """Domain-adversarial training: a domain classifier behind a gradient-reversal layer (the loss reported is the
    classifier's binary cross-entropy; chance is log 2 = 0.693)."""
    name = "dann"
    Config = DANNConfig
    batch_keys = (TARGET_DOMAIN,)

    def build_head(self) -> nn.Module:
        o = self.ctx.options or DANNConfig()
        return DomainClassifier(self.ctx.encoder_channels, o.hidden, o.spectral_norm)

    def coefficient(self, batches_seen: torch.Tensor) -> torch.Tensor:
        """The reversal coefficient after `batches_seen` training batches."""
        o = self.ctx.options or DANNConfig()
        ramp = o.ramp_steps or self.ctx.total_steps
        if not ramp:   # no schedule known (a model built outside a run): the end value
            return torch.full((), o.max_coefficient, device=batches_seen.device)
        return o.max_coefficient * dann_coefficient(batches_seen / ramp, o.gamma)

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to adapt
            return {}
        coefficient = self.coefficient(head.batches_seen)
        if head.training:
            head.batches_seen += 1
        features = torch.cat([global_pool(feature_map), target_features(batch)])
        return {"domain_logits": head(reverse_gradient(features, coefficient))}

    def loss(self, out, images, batch):
        logits = out["domain_logits"].float()
        n_target = len(batch[TARGET_DOMAIN]["image"])
        domain = torch.zeros_like(logits)
        domain[len(logits) - n_target:] = 1.0   # source 0, target 1
        return F.binary_cross_entropy_with_logits(logits, domain)


@dataclass
class ADDAConfig:
    hidden: int = 256
    """width of the discriminator's two hidden layers"""
    spectral_norm: bool = True
    """spectral normalisation of the discriminator's layers"""

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"model.task_options.adda.hidden={self.hidden}: expected >= 1")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are buffers: checkpointed with the model, never seen by the optimizer."""
    frozen = copy.deepcopy(module)
    for m in frozen.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach())
    return frozen


class ADDAHead(nn.Module):
    """The discriminator (source 1, target 0), the frozen source encoder and whether it holds the source weights
    yet (`copied`: a buffer, so a resumed run keeps the copy of its first step)."""

    def __init__(self, encoder: nn.Module, channels: int, hidden: int, spectral_norm: bool) -> None:
        super().__init__()
        self.discriminator = DomainClassifier(channels, hidden, spectral_norm)
        self.source_encoder = frozen_copy(encoder)
        self.register_buffer("copied", torch.zeros((), dtype=torch.bool))

    def take_source(self, encoder: nn.Module) -> None:
        """Freeze the encoder's weights (as the run starts: those of `init_from`) as the source encoder."""
        self.source_encoder.load_state_dict(encoder.state_dict())   # (same names: parameters there, buffers here)
        self.copied.fill_(True)


@register_task
class ADDA(Task):
    """Adversarial discriminative adaptation with the inverted-label GAN loss (reported: the discriminator's
    binary cross-entropy plus the encoder's inverted-label one; each is log 2 = 0.693 at equilibrium)."""
    name = "adda"
    Config = ADDAConfig
    batch_keys = (TARGET_DOMAIN,)

    def build_head(self) -> nn.Module:
        o = self.ctx.options or ADDAConfig()
        encoder = self.ctx.encoder
        if encoder is None:
            raise ValueError("task adda needs the run's encoder to copy as its source encoder")
        head = ADDAHead(encoder, self.ctx.encoder_channels, o.hidden, o.spectral_norm)

        def take_source(module, args) -> None:
            """Before the first training pass of the encoder updates its BatchNorm statistics (which differ per rank
            from then on): copy it, unless a resumed checkpoint holds the copy already; then never again."""
            if module.training:
                if not bool(head.copied):
                    head.take_source(module)
                hook.remove()

        hook = encoder.register_forward_pre_hook(take_source)
        return head

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to adapt
            return {}
        with torch.no_grad():
            head.source_encoder.eval()   # the source model as trained: its own BatchNorm statistics
            source = global_pool(head.source_encoder(images))
        target = target_features(batch)
        critic = head.discriminator
        frozen = {k: v.detach() for k, v in critic.state_dict().items()}
        return {"adda_source": critic(source), "adda_target": critic(target.detach()),
                "adda_inverted": torch.func.functional_call(critic, frozen, (target,))}

    def loss(self, out, images, batch):
        bce = F.binary_cross_entropy_with_logits
        source, target, inverted = (out[k].float() for k in ("adda_source", "adda_target", "adda_inverted"))
        discriminator = bce(source, torch.ones_like(source)) + bce(target, torch.zeros_like(target))
        return discriminator / 2 + bce(inverted, torch.ones_like(inverted))


class StatisticsAlignment(Task):
    """A distance between the two domains' pooled features, minimised by the encoder (no head, no parameters);
    subclasses set `name` and `distance`."""
    batch_keys = (TARGET_DOMAIN,)
    distance = staticmethod(coral_loss)

    def build_head(self) -> nn.Module:
        return nn.Identity()

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to align
            return {}
        return {self.name: self.distance(global_pool(feature_map), target_features(batch))}

    def loss(self, out, images, batch):
        return out[self.name]


@register_task
class CORAL(StatisticsAlignment):
    """Deep CORAL: the distance between the two domains' feature covariances."""
    name = "coral"
    distance = staticmethod(coral_loss)


@register_task
class MMD(StatisticsAlignment):
    """Multi-kernel MMD between the two domains' pooled features."""
    name = "mmd"
    distance = staticmethod(mmd_loss)


@dataclass
class SinkhornConfig:
    blur: float = 0.1
    """the entropic blur (the transport's length scale), in units of the features' root-mean-square pairwise
    distance over both domains (so it follows the features' scale, as MMD's bandwidth does)"""

    def __post_init__(self) -> None:
        if self.blur <= 0:
            raise ValueError(f"model.task_options.sinkhorn.blur={self.blur}: expected > 0")


def sinkhorn_loss(source: torch.Tensor, target: torch.Tensor, blur: float = 0.1) -> torch.Tensor:
    """Debiased Sinkhorn divergence (p = 2, geomloss) between (B, d) and (B', d) features, both divided by their
    root-mean-square pairwise distance (detached), with uniform weights."""
    x = torch.cat([source, target]).float()
    scale = torch.cdist(x, x).square().mean().detach().sqrt().clamp_min(1e-12)
    return SamplesLoss("sinkhorn", p=2, blur=blur)(source.float() / scale, target.float() / scale)


@register_task
class Sinkhorn(StatisticsAlignment):
    """Sinkhorn divergence between the two domains' pooled features."""
    name = "sinkhorn"
    Config = SinkhornConfig

    def distance(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sinkhorn_loss(source, target, (self.ctx.options or SinkhornConfig()).blur)
