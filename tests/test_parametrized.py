"""Parametrized modules (torch's weight_norm and spectral_norm): traced into, a HAT layer where the computed weight
keeps rows in place or where weight_norm's norm runs across rows (held per task), not one (and said why) where it
mixes rows otherwise (spectral_norm); finished tasks stay bit-identical either way."""
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


def _conv_net(dim):
    """HuBERT's positional conv in small: a grouped Conv1d under weight_norm over its kernel axis."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), weight_norm(nn.Conv1d(8, 8, 4, padding=2,
                         groups=2), dim=dim), nn.ReLU(), nn.Flatten(), nn.Linear(88, 3))


_CROSS_ROW = {"dim1": lambda: _net(lambda m: weight_norm(m, dim=1)), "whole": lambda: _net(lambda m: weight_norm(
    m, dim=None)), "conv_dim2": lambda: _conv_net(2)}


def _live_and_held_norms(hat, t):
    """Per weight-normed layer: the norm its parameter v has now, and the one task t holds."""
    from hatify.layers import TaskIndexed
    from hatify.parametrized import HeldNorm

    found = []
    for name, module in hat.net.named_modules():
        if isinstance(module, TaskIndexed) and isinstance(module.copies[0], HeldNorm):
            owner = hat.net.get_submodule(name.rpartition(".")[0])
            v = getattr(owner, name.rpartition(".")[2][: -len("_norm")])
            found.append((torch.norm_except_dim(v.detach(), 2, module.copies[0].dim), module.pick(t).value))
    return found


@pytest.mark.parametrize("build", _CROSS_ROW.values(), ids=_CROSS_ROW)
def test_weight_norm_across_rows_is_a_hat_layer_with_its_norm_held_per_task(build, tmp_path):
    """weight_norm over another axis than the rows (HuBERT/WavLM's positional conv: dim=2) couples the rows through
    the norm: the norm is held per task, so the layer is a HAT layer and task 0 stays bit-identical, though task 1
    moved v's free rows and with them the norm v has now; save and load keep the held norms."""
    x, y = torch.randn(6, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(build(), 2, example_inputs=(x[:2],))
    weighted = [layer for layer in hat.plan.layers if "parametrizations_weight_original1" in layer.weight]
    assert weighted and all(layer.role == "masked" for layer in weighted)
    held = [m for m in hat.plan.modules if m.name.endswith("_norm")]
    assert len(held) == len(weighted) and all(m.policy == "per_task" for m in held)
    assert not hat.plan.opaque and hat.report.validation["passed"]
    after, again, other = train_two_tasks(hat, x, y)
    assert torch.equal(after, again) and not torch.equal(after, other)
    assert all(not torch.equal(live, held) for live, held in _live_and_held_norms(hat, 0))
    hatify.save(hat, tmp_path / "wn.hat")
    loaded = hatify.load(tmp_path / "wn.hat", model=build())
    with torch.no_grad():
        assert torch.equal(loaded(x, task_id=0), again) and torch.equal(loaded(x, task_id=1), other)


def test_without_the_held_norm_task_1_would_move_task_0(monkeypatch):
    """The hold is what keeps task 0: a norm computed from v on every forward follows task 1's free rows."""
    monkeypatch.setattr(hatify.model, "hold_norms", lambda net, t: None)
    x, y = torch.randn(6, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(_conv_net(2), 2, example_inputs=(x[:2],))
    after, again, _ = train_two_tasks(hat, x, y)
    assert not torch.equal(after, again)


def test_spectral_norm_mixes_rows_and_is_no_hat_layer_and_says_why():
    """spectral_norm's sigma makes every row depend on every other, and is updated in training: protecting rows of
    the parameters would not freeze the weight, so those layers are not HAT layers."""
    wrap = spectral_norm
    x, y = torch.randn(6, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(_net(wrap), 2, example_inputs=(x[:2],))
    assert {layer.name for layer in hat.plan.layers} == {"0", "7"}
    assert not any(m.name.endswith("_norm") for m in hat.plan.modules)
    reasons = [u.reason for u in hat.plan.unknown if "not a HAT layer" in u.reason]
    assert len(reasons) == 2 and all("by _SpectralNorm at" in r and "not provably row-local" in r for r in reasons)
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


def test_a_held_norm_keeps_mixed_task_batches_off_the_per_sample_path():
    """The per-sample path splits a per-task module's input rows by task: the held norm's input is the parameter v,
    whose rows are no samples (even where their count equals the batch's), so mixed-task batches go per task."""
    from hatify import per_sample

    x, y = torch.randn(8, 4, 10), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    hat = hatify.hatify(_conv_net(2), 2, example_inputs=(x,), config=hatify.HATConfig(loose_params="freeze"))
    _, again, other = train_two_tasks(hat, x, y)
    ids = torch.tensor([0, 1] * 4)
    with pytest.raises(per_sample.Unsupported, match="is not made from the model.s inputs"):
        per_sample.run(hat.net, (x,), {}, ids)
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=ids), torch.where((ids == 0)[:, None], again, other))
