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
