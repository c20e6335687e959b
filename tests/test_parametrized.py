"""Parametrized modules (torch's weight_norm and spectral_norm): traced into, a HAT layer where the computed weight
keeps rows in place, not one (and said why) where it mixes rows; finished tasks stay bit-identical either way."""
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import hatify
from soundness_models import train_two_tasks


def _net(wrap):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), wrap(nn.Conv1d(8, 8, 3, padding=1)), nn.ReLU(),
                         nn.Flatten(), wrap(nn.Linear(80, 16)), nn.ReLU(), nn.Linear(16, 3))


def test_weight_norm_layers_are_hat_layers_and_old_tasks_stay_bit_identical(tmp_path):
    x, y = torch.randn(6, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(_net(weight_norm), 2, example_inputs=(x[:2],))
    layers = {layer.name: layer for layer in hat.plan.layers}
    assert layers["2"].role == layers["5"].role == "masked"
    assert layers["2"].weight == "2.parametrizations_weight_original1"    # v: protected by output row
    assert {p.name: p.policy for p in hat.plan.params} == {"2.parametrizations_weight_original0": "per_task",
                                                           "5.parametrizations_weight_original0": "per_task"}
    assert not hat.plan.opaque and hat.report.validation["passed"]
    after, again, other = train_two_tasks(hat, x, y)
    assert torch.equal(after, again) and not torch.equal(after, other)
    hatify.save(hat, tmp_path / "wn.hat")
    loaded = hatify.load(tmp_path / "wn.hat", model=_net(weight_norm))
    with torch.no_grad():
        assert torch.equal(loaded(x, task_id=0), again) and torch.equal(loaded(x, task_id=1), other)


@pytest.mark.parametrize("wrap", [lambda m: weight_norm(m, dim=1), spectral_norm], ids=["weight_norm_dim1", "spectral"])
def test_row_mixing_parametrizations_are_no_hat_layers_and_say_why(wrap):
    """A norm over another axis, or spectral_norm's sigma, makes every row depend on every other: protecting rows
    of the parameters would not freeze the weight, so those layers are not HAT layers."""
    x, y = torch.randn(6, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(_net(wrap), 2, example_inputs=(x[:2],))
    assert {layer.name for layer in hat.plan.layers} == {"0", "7"}
    reasons = [u.reason for u in hat.plan.unknown if "not a HAT layer" in u.reason]
    assert len(reasons) == 2 and all("not provably row-local" in r for r in reasons)
    after, again, other = train_two_tasks(hat, x, y)
    assert torch.equal(after, again) and not torch.equal(after, other)


def test_spectral_norm_keeps_its_power_iteration_in_train_mode():
    """spectral_norm updates its singular vectors on every training forward: its parametrization stays a module
    (one per task), so the converted model with open masks follows the original in train mode too."""
    model = _net(spectral_norm)
    x = torch.randn(6, 4, 10)
    hat = hatify.hatify(model, 2, example_inputs=(x[:2],))
    model.train()
    hat.train()
    with hatify.masks_open(hat):
        for _ in range(3):
            assert torch.allclose(hat(x, task_id=0), model(x), atol=1e-5)
