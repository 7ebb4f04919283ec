"""Loss weightings: fixed sums, learned uncertainty weights, DWA's formula and its checkpointed history."""

import io
import math

import pytest
import torch

from dlscale.models import EncoderConfig
from dlscale.train.model import build_model
from dlscale.train.weighting import DynamicWeightAverage, UncertaintyWeighting, build_weighting


TASKS = ("recon", "classification")


def losses(recon: float, classification: float) -> dict[str, torch.Tensor]:
    return {"recon": torch.tensor(recon), "classification": torch.tensor(classification)}


def test_fixed_weighting_sums_weighted_losses():
    weighting = build_weighting("fixed", TASKS, weights={"recon": 0.5, "classification": 2.0})
    total, weights = weighting(losses(4.0, 3.0))
    assert total.item() == pytest.approx(0.5 * 4.0 + 2.0 * 3.0)
    assert weights == {"recon": 0.5, "classification": 2.0}


def test_fixed_weighting_defaults_to_ones():
    total, weights = build_weighting("fixed", TASKS)(losses(4.0, 3.0))
    assert total.item() == pytest.approx(7.0)
    assert weights == {"recon": 1.0, "classification": 1.0}


def test_fixed_weights_for_other_tasks_are_refused():
    with pytest.raises(ValueError, match="regression"):
        build_weighting("fixed", TASKS, weights={"recon": 1.0, "regression": 1.0})


@pytest.mark.parametrize("method", ["fixed", "uncertainty", "dwa"])
def test_losses_with_wrong_tasks_are_refused_naming_them(method):
    with pytest.raises(ValueError, match=r"missing \['classification'\], unexpected \['regression'\]"):
        build_weighting(method, TASKS)({"recon": torch.tensor(1.0), "regression": torch.tensor(1.0)})


def test_unknown_method_lists_known_methods():
    with pytest.raises(ValueError, match="fixed, uncertainty, dwa"):
        build_weighting("gradnorm", TASKS)


def test_uncertainty_total_and_gradients_follow_kendall_form():
    weighting = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([0.5, -1.0]))
    total, weights = weighting(losses(4.0, 3.0))
    weights = {task: float(w) for task, w in weights.items()}   # 0-dim tensors: read at the logging interval
    assert total.item() == pytest.approx(math.exp(-0.5) * 4.0 + 0.5 + math.exp(1.0) * 3.0 - 1.0, rel=1e-6)
    assert weights == pytest.approx({"recon": math.exp(-0.5), "classification": math.exp(1.0)})
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    expected = [1 - math.exp(-0.5) * 4.0, 1 - math.exp(1.0) * 3.0]
    assert weighting.log_variances.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_uncertainty_weights_are_trained_by_the_model_optimizer():
    weighting = build_weighting("uncertainty", TASKS)
    model = build_model("multitask", EncoderConfig(name="small", width=8), (1, 32, 32))
    model.weighting = weighting
    assert any(p is weighting.log_variances for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.rand(4, 1, 32, 32))
    task_losses = {
        "recon": torch.nn.functional.mse_loss(out["recon"], torch.rand(4, 1, 32, 32)),
        "classification": torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 0])),
    }
    total, _ = model.weighting(task_losses)
    total.backward()
    optimizer.step()
    assert weighting.log_variances.detach().abs().min() > 0


def test_dwa_weights_are_one_for_the_first_two_epochs():
    dwa = DynamicWeightAverage(TASKS)
    assert dwa(losses(2.0, 1.0))[1] == {"recon": 1.0, "classification": 1.0}
    assert dwa.end_epoch({"recon": 2.0, "classification": 1.0}) == {"recon": 1.0, "classification": 1.0}


def test_dwa_weights_follow_hand_computed_example():
    dwa = build_weighting("dwa", TASKS, temperature=2.0)
    dwa.end_epoch({"recon": 2.0, "classification": 1.0})
    dwa.end_epoch({"recon": 1.0, "classification": 1.0})
    # r = (0.5, 1.0); w = 2 * softmax(r / 2) = 2 * (e^0.25, e^0.5) / (e^0.25 + e^0.5) = (0.875647, 1.124353)
    total, weights = dwa(losses(3.0, 5.0))
    assert weights == pytest.approx({"recon": 0.875647, "classification": 1.124353}, abs=1e-6)
    assert total.item() == pytest.approx(0.875647 * 3.0 + 1.124353 * 5.0, abs=1e-5)
    # The third epoch replaces the oldest: r = (4.0 / 1.0, 0.5 / 1.0) = (4, 0.5), r / 2 = (2, 0.25)
    # -> w = 2 * (e^2, e^0.25) / (e^2 + e^0.25) = (1.703906, 0.296094).
    assert dwa.end_epoch({"recon": 4.0, "classification": 0.5}) == pytest.approx(
        {"recon": 1.703906, "classification": 0.296094}, abs=1e-6)


def test_dwa_refuses_non_positive_epoch_means():
    with pytest.raises(ValueError, match="recon"):
        DynamicWeightAverage(TASKS).end_epoch({"recon": 0.0, "classification": 1.0})


def test_dwa_history_survives_a_model_checkpoint_round_trip():
    def model_with_dwa():
        model = build_model("multitask", EncoderConfig(name="small", width=8), (1, 32, 32))
        model.weighting = DynamicWeightAverage(TASKS)
        return model

    trained = model_with_dwa()
    trained.weighting.end_epoch({"recon": 2.0, "classification": 1.0})
    trained.weighting.end_epoch({"recon": 1.0, "classification": 1.0})
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = model_with_dwa()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.weighting.weights == trained.weighting.weights
    assert resumed.weighting.weights != {"recon": 1.0, "classification": 1.0}


# ---- FAMO (Liu et al. 2023) ---------------------------------------------------------------------------------------

def famo_step(famo, recon: float, classification: float):
    """One training forward: the total, the weights, and d total / d L_i (the gradient weights)."""
    values = {"recon": torch.tensor(recon, requires_grad=True),
              "classification": torch.tensor(classification, requires_grad=True)}
    total, weights = famo(values)
    weights = {task: float(w) for task, w in weights.items()}   # 0-dim tensors: read at the logging interval
    total.backward()
    return total, weights, {t: v.grad.item() for t, v in values.items()}


def test_famo_starts_with_equal_logits_and_gradient_weights_c_z_over_loss():
    famo = build_weighting("famo", TASKS)
    total, weights, grads = famo_step(famo, 4.0, 1.0)
    # z = (1/2, 1/2); c = 1 / (0.5/4 + 0.5/1) = 1.6; w = c z / L = (0.2, 0.8); total = c sum z log L
    assert famo.logits == [0.0, 0.0]
    assert weights == pytest.approx({"recon": 0.2, "classification": 0.8}, rel=1e-6)
    assert grads == pytest.approx(weights, rel=1e-6)
    assert total.item() == pytest.approx(1.6 * 0.5 * (math.log(4.0) + math.log(1.0)), rel=1e-6)


def test_famo_logits_follow_the_papers_update_rule():
    beta, gamma = 0.5, 0.1
    famo = build_weighting("famo", TASKS, lr=beta, weight_decay=gamma, eps=1e-12)
    famo_step(famo, 4.0, 1.0)
    famo_step(famo, 2.0, 0.9)     # recon's log-loss fell by log 2, classification's by log(1/0.9)
    gain = [math.log(4.0 / 2.0), math.log(1.0 / 0.9)]
    z = [0.5, 0.5]
    mean = sum(zi * g for zi, g in zip(z, gain))
    delta = [zi * (g - mean) for zi, g in zip(z, gain)]          # J_softmax(xi)^T gain
    expected = [0.0 - beta * (d + gamma * 0.0) for d in delta]    # xi <- xi - beta (delta + gamma xi)
    assert famo.logits == pytest.approx(expected, rel=1e-6)   # the losses are float32
    # the task that improved less (classification) gains weight
    assert famo.z[1] > 0.5 > famo.z[0]
    famo_step(famo, 2.0, 0.9)     # no change: only the decay acts on the logits
    assert famo.logits == pytest.approx([x - beta * gamma * x for x in expected], rel=1e-6)


def test_famo_state_survives_a_model_checkpoint_round_trip():
    def model_with_famo():
        model = build_model("multitask", EncoderConfig(name="small", width=8), (1, 32, 32))
        model.weighting = build_weighting("famo", TASKS)
        return model

    trained = model_with_famo()
    famo_step(trained.weighting, 4.0, 1.0)
    famo_step(trained.weighting, 2.0, 0.9)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = model_with_famo()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.weighting.logits == trained.weighting.logits != [0.0, 0.0]
    assert resumed.weighting.previous == trained.weighting.previous


def test_famo_options_are_checked_naming_the_key():
    with pytest.raises(ValueError, match="unknown config key 'loss.famo.step'"):
        build_weighting("famo", TASKS, {"step": 0.1})
    with pytest.raises(ValueError, match="loss.famo.min_losses"):
        build_weighting("famo", TASKS, min_losses={"recon": 0.0})


# ---- UPGrad through torchjd: the backward hook ----------------------------------------------------------------------

class PlainEngine:
    """What the backward hook uses of a DeepSpeed engine: `.module` and `.backward(loss)`."""

    def __init__(self, module):
        self.module = module

    def backward(self, loss):
        loss.backward()


def test_upgrad_backward_gives_the_encoder_torchjds_aggregate_of_the_task_gradients():
    from torchjd.aggregation import UPGrad
    torch.manual_seed(0)
    model = build_model("multitask", EncoderConfig(name="small", width=4), (1, 16, 16))
    images, batch = torch.rand(6, 1, 16, 16), {"label": torch.tensor([0, 1, 2, 0, 1, 2])}
    shared = list(model.encoder.parameters())
    out = model(images, batch)
    losses = model.losses(out, images, batch)
    jacobian = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared,
                                                                               retain_graph=True)]) for t in TASKS])
    statistics = {k: v.clone() for k, v in model.named_buffers()}
    weighting = build_weighting("upgrad", TASKS)
    total, _ = weighting(losses)
    weighting.backward(PlainEngine(model), losses, total, images, batch)
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, UPGrad()(jacobian), atol=1e-5)
    assert all(torch.equal(v, statistics[k]) for k, v in model.named_buffers())   # BN statistics moved once
    weights = weighting.weights
    assert set(weights) == set(TASKS) and all(w > 0 for w in weights.values())
