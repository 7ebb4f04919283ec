"""Every registered stage on every backbone: the model builds the way a run builds it (`build_run_model`: encoder,
task heads, loss weighting), one training forward + backward of its weighted losses reaches every trainable
parameter, and the evaluation forward gives the pooled features and what each task collects.

Parametrised from the registries (`STAGES`, `ENCODER_NAMES`), so a new stage or backbone is covered without
editing this file. Stages that let the run choose its tasks (multitask) train every registered task at once,
under a learned weighting; contrastive runs each of its methods. Tiny batches: 1x32x32 images (ViTs: patch 8).
"""
import math

import pytest
import torch

from dlscale.models.encoders import ENCODER_NAMES
from dlscale.models.timm_backbones import VIT_ARCHITECTURES
from dlscale.models.model import TARGET_DOMAIN
from dlscale.train.config import load_config
from dlscale.train.model import build_run_model
from dlscale.train.stages import STAGES
from dlscale.train.tasks import TASKS
from dlscale.train.tasks.contrastive import METHODS

SHAPE = (1, 32, 32)
BATCH = 4
TARGETS = ["theta_E", "e1"]
STATS = {"mean": [1.0, 0.0], "std": [0.5, 0.1]}
VARIANTS = {"contrastive": {method: [f"--model.task_options.contrastive.method={method}"] for method in METHODS}}
"""Stages whose options choose between methods: each method is a case of its own."""
ZERO_OUTPUT = {"superres"}
"""Stages whose output layer starts at zero (a fresh SR network returns bicubic exactly): the first backward only
reaches that layer with a non-zero gradient, so the encoder is checked after one plain gradient step."""


MATRIX_STAGES, MATRIX_TASKS = tuple(STAGES), tuple(TASKS)
"""The registries as this module finds them when it is collected: a test module collected later may register parts
of its own (which its tests cover), and the matrix must not depend on the order pytest collects files in."""


def stage_cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    for stage in MATRIX_STAGES:
        spec = STAGES[stage]
        base = [] if spec.tasks is not None else [f"--model.tasks=[{','.join(MATRIX_TASKS)}]",
                                                  "--loss.method=uncertainty"]
        for variant, extra in VARIANTS.get(stage, {"default": []}).items():
            cases.append((stage, variant, base + extra))
    return cases


CASES = [(stage, variant, extra, backbone) for stage, variant, extra in stage_cases() for backbone in ENCODER_NAMES]


def make_batch(model, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Images plus every batch entry the model's tasks read (a task needing an entry not known here fails)."""
    images = torch.rand(BATCH, *SHAPE, generator=generator)
    known = {"label": lambda: torch.arange(BATCH) % 3,
             "target": lambda: torch.randn(BATCH, len(TARGETS), generator=generator),
             TARGET_DOMAIN: lambda: {"image": torch.rand(BATCH, *SHAPE, generator=generator) * 2,
                                     "ids": torch.zeros(BATCH, 3, dtype=torch.long)}}
    needed = {key for task in model.task_specs.values() for key in task.batch_keys}
    unknown = sorted(needed - set(known))
    if unknown:
        pytest.fail(f"tasks of this model read batch entries {unknown} that this test does not make: add them")
    batch = {"image": images, "ids": torch.zeros(BATCH, 3, dtype=torch.long)}
    return images, {**batch, **{key: known[key]() for key in needed}}


@pytest.mark.parametrize(("stage", "variant", "extra", "backbone"), CASES,
                         ids=[f"{s}-{v}-{b}" if v != "default" else f"{s}-{b}" for s, v, _, b in CASES])
def test_stage_builds_and_trains_one_step_on_backbone(stage, variant, extra, backbone):
    torch.manual_seed(0)
    overrides = [f"--model.encoder.name={backbone}", f"--data.targets=[{','.join(TARGETS)}]",
                 "--data.target.source=simulate", *extra]   # a target domain, for the tasks that adapt to one
    if backbone in VIT_ARCHITECTURES:
        overrides.append("--model.encoder.patch_size=8")
    cfg = load_config(None, overrides, stage=stage, data_dir="-", run_dir="-")
    model = build_run_model(cfg, SHAPE, STATS)
    assert model.encoder.out_channels > 0 and set(model.weighting.tasks) == set(model.tasks)
    if STAGES[stage].tasks is not None:
        assert set(model.tasks) == set(STAGES[stage].tasks)
    else:
        assert set(model.tasks) == set(MATRIX_TASKS)
    images, batch = make_batch(model, torch.Generator().manual_seed(1))

    model.train()
    out = model(images, batch)
    losses = model.losses(out, images, batch)
    assert list(losses) == list(model.tasks)
    bad = {task: loss for task, loss in losses.items() if loss.dim() != 0 or not torch.isfinite(loss)}
    assert not bad, f"losses not finite scalars: {bad}"
    total, weights = model.weighting(losses)
    assert torch.isfinite(total) and set(weights) == set(model.tasks)
    total.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_grad = [name for name, p in trainable if p.grad is None]
    assert not no_grad, f"parameters the losses do not reach: {no_grad[:10]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    if stage in ZERO_OUTPUT:
        with torch.no_grad():
            for _, p in trainable:
                p -= 0.01 * p.grad
                p.grad = None
        total, _ = model.weighting(model.losses(model(images, batch), images, batch))
        total.backward()
    encoder_norm = math.sqrt(sum(float(p.grad.square().sum()) for _, p in model.encoder.named_parameters()))
    assert encoder_norm > 0

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["features"].shape == (BATCH, model.encoder.out_channels)
    for name, task in model.task_specs.items():
        for key, value in task.collect(out, images, batch).items():
            assert value.shape[0] == BATCH and torch.isfinite(value.float()).all(), f"{name} collects {key}"


def test_the_matrix_covers_every_stage_and_backbone():
    assert set(MATRIX_STAGES) >= {"autoencoder", "supervised", "multitask", "adapt", "superres"}
    assert {case[0] for case in CASES} == set(MATRIX_STAGES)
    assert {case[3] for case in CASES} == set(ENCODER_NAMES)
    assert len(CASES) == sum(len(VARIANTS.get(stage, {0: 0})) for stage in MATRIX_STAGES) * len(ENCODER_NAMES)


@pytest.mark.parametrize("method", METHODS)
def test_a_replayed_batch_redraws_the_same_masks_and_views_and_moves_byol_once(method):
    """UPGrad takes its per-task gradients on a second forward of the step's batch: the self-supervised tasks replay
    that step's masks and views (one draw per step, as a resume expects) and BYOL's target moves once per step."""
    torch.manual_seed(0)
    cfg = load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--loss.method=upgrad",
                             "--model.tasks=[classification,mae,contrastive]",
                             "--model.task_options.contrastive.tau=0.5",
                             f"--model.task_options.contrastive.method={method}"],
                      stage="multitask", data_dir="-", run_dir="-")
    model = build_run_model(cfg, SHAPE, None)
    generator = torch.Generator().manual_seed(1)

    class Engine:                      # what the weighting's backward hook uses of a DeepSpeed engine
        module = model

        @staticmethod
        def backward(loss):
            loss.backward()

    def step(images, batch):
        out = model(images, batch)
        losses = model.losses(out, images, batch)
        total, _ = model.weighting(losses)
        model.weighting.backward(Engine, losses, total, images, batch)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad.sign()
                    p.grad = None
        return out

    images, batch = make_batch(model, generator)
    first = step(images, batch)
    assert [model.heads[t].draws for t in ("mae", "contrastive")] == [1, 1]
    again = model(images, batch)                                           # the step's batch, replayed
    assert torch.equal(first["mae_mask"], again["mae_mask"])
    assert [model.heads[t].draws for t in ("mae", "contrastive")] == [1, 1]
    fresh = model(images, {k: v for k, v in batch.items() if not k.startswith("_draw/")})   # a new batch: new draws
    assert not torch.equal(first["mae_mask"], fresh["mae_mask"])
    assert [model.heads[t].draws for t in ("mae", "contrastive")] == [2, 2]

    if method == "byol":
        head = model.heads["contrastive"]
        images, batch = make_batch(model, generator)
        target = {k: v.clone() for k, v in head.target_encoder.state_dict().items()}
        online = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        step(images, batch)                                                # forward + UPGrad's replayed forward
        moved = head.target_encoder.state_dict()
        weights = [k for k in target if k.endswith("weight")]
        assert weights and all(torch.allclose(moved[k], 0.5 * target[k] + 0.5 * online[k]) for k in weights)
