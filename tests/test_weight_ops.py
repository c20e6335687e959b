"""Weights used through torch.einsum and stacked expert weights: a linear layer written as an einsum is a HAT
layer (XLNet's attention), one with an axis shared with the data (experts, groups) is left as it is; a stacked
(experts, out, in) weight used by bmm, matmul or a grouped matmul (Mixtral's experts) is a HAT layer whose experts
share the units. Open masks equal the original and finished tasks stay bit-identical."""
import torch
import torch.nn.functional as F
from torch import nn

import hatify
from soundness_models import train_two_tasks


class Einsums(nn.Module):
    """Every form: output axes reordered, two contracted axes with the data permuted, a 2-D weight, and an expert
    axis shared with the data (not a linear layer: left as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.q = nn.Parameter(torch.randn(8, 2, 4) / 3)     # (h, n, d)
        self.o = nn.Parameter(torch.randn(2, 4, 8) / 3)     # (n, d, h)
        self.w = nn.Parameter(torch.randn(5, 8) / 3)        # (e, h)
        self.mix = nn.Parameter(torch.randn(3, 8, 8) / 3)    # (k, h, g): output units k * g
        self.experts = nn.Parameter(torch.randn(3, 8, 8) / 3)  # (k, h, g) with k shared with the data
        self.t = nn.Parameter(torch.randn(8, 8) / 3)        # also a Linear's weight: tied, so left as it is
        self.tied = nn.Linear(8, 8, bias=False)
        self.tied.weight = self.t
        self.p1, self.p2 = nn.Parameter(torch.randn(8) / 3), nn.Parameter(torch.randn(8, 8) / 3)  # no data operand
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))                                          # (b, s, h)
        h = h + torch.einsum("bsh,gh->bsg", h, self.t) + self.tied(h)
        h = h + torch.einsum("h,hj->j", self.p1, self.p2)
        heads = F.relu(torch.einsum("bsh,hnd->bnsd", h, self.q))         # (b, n, s, d)
        h = h + torch.einsum("bnsd,ndh->bsh", heads, self.o)
        mixed = torch.einsum("bsh,khg->bskg", h, self.mix).mean(2)
        per_expert = torch.einsum("bskh,khg->bskg", h[:, :, None].expand(-1, -1, 3, -1), self.experts)
        mixed = mixed + per_expert.mean(2)
        h = F.gelu(torch.einsum("bsh,eh->bse", h + mixed, self.w))
        return self.head(h.mean(1))


class Stacked(nn.Module):
    """Expert weights stacked on a leading axis: bmm on (E, out, in) transposed, matmul on (E, in, out), a grouped
    matmul over rows sorted by expert, and a transpose that moves the expert axis (not a linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.up = nn.Parameter(torch.randn(3, 12, 8) / 3)      # (E, out, in)
        self.down = nn.Parameter(torch.randn(3, 12, 8) / 3)    # (E, in, out)
        self.grouped = nn.Parameter(torch.randn(3, 8, 8) / 3)  # (E, out, in)
        self.swapped = nn.Parameter(torch.randn(8, 3, 8) / 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))                                               # (b, 8)
        per_expert = h.expand(3, -1, -1)                                      # (E, b, 8)
        h3 = F.relu(torch.bmm(per_expert, self.up.transpose(-2, -1)))         # (E, b, 12)
        h3 = torch.matmul(h3, self.down).mean(0)                              # (b, 8)
        offs = torch.tensor([2, 4, h3.shape[0]], dtype=torch.int32)           # rows 0-1 expert 0, 2-3 expert 1, ...
        h = h3 + torch._grouped_mm(h3, self.grouped.mT, offs=offs)
        h = h + torch.matmul(h.expand(3, -1, -1), self.swapped.transpose(0, 1)).mean(0)
        return self.head(h)


def _train_two_tasks(hat, x, y):
    after, again, other = train_two_tasks(hat, x, y)
    assert torch.equal(again, after) and not torch.equal(other, after)
    return hat


def _reloaded_equal(hat, fresh, x, tmp_path):
    """Saved and loaded into a fresh instance (converted again: the same layouts), every task's outputs equal."""
    hatify.save(hat, tmp_path / "model.hat")
    again = hatify.load(tmp_path / "model.hat", model=fresh)
    with torch.no_grad():
        assert all(torch.equal(again(x, task_id=t), hat(x, task_id=t)) for t in range(2))


def test_einsum_linear_layers_are_hat_layers_and_old_tasks_stay_bit_identical(tmp_path):
    torch.manual_seed(0)
    model, x, y = Einsums(), torch.randn(6, 5, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(model, 2, example_inputs=(x[:2],))
    roles = {layer.name: (layer.role, layer.units, layer.input_units) for layer in hat.plan.layers}
    assert roles["q"] == ("masked", 8, 8) and roles["o"] == ("masked", 8, 8) and roles["w"] == ("masked", 5, 8)
    assert roles["mix"] == ("masked", 24, 8)
    assert "experts" not in roles and {p.name: p.policy for p in hat.plan.params}["experts"] == "per_task"
    assert not {"t", "p1", "p2"} & set(roles)  # the einsum on the tied weight is left as it is
    with torch.no_grad(), hatify.masks_open(hat):
        assert torch.allclose(hat(x, task_id=1), model(x), atol=1e-5)
    _reloaded_equal(_train_two_tasks(hat, x, y), Einsums(), x, tmp_path)


def test_stacked_expert_weights_are_hat_layers_sharing_units_across_experts(tmp_path):
    torch.manual_seed(0)
    model, x, y = Stacked(), torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(model, 2, example_inputs=(x,))
    layers = {layer.name: layer for layer in hat.plan.layers}
    assert (layers["up"].kind, layers["up"].units, layers["up"].input_units) == ("linear", 12, 8)
    assert (layers["down"].kind, layers["down"].units, layers["down"].input_units) == ("linear_t", 8, 12)
    assert (layers["grouped"].kind, layers["grouped"].units) == ("linear", 8)
    assert "swapped" not in layers and {p.name: p.policy for p in hat.plan.params}["swapped"] == "per_task"
    assert hat.report.validation["passed"]
    hat = _train_two_tasks(hat, x, y)
    _reloaded_equal(hat, Stacked(), x, tmp_path)
    protect = hat.net.parametrizations.up[0].protect if hasattr(hat.net, "parametrizations") else \
        hat.net.hat_root_params.parametrizations.up[0].protect
    assert protect.shape == (1, 12, 8) and protect.any() and not protect.all()
    with torch.no_grad():
        before = hat(x, task_id=0)
        hat.forget_task(1)  # releases task 1's entries in every expert; task 0 untouched
        assert torch.equal(hat(x, task_id=0), before)
