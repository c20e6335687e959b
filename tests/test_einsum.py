"""Weights used through torch.einsum: a linear layer written as an einsum is a HAT layer (XLNet's attention), one
with an axis shared with the data (experts, groups) is left as it is; open masks equal the original and finished
tasks stay bit-identical."""
import torch
import torch.nn.functional as F
from torch import nn

import hatify


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
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))                                          # (b, s, h)
        heads = F.relu(torch.einsum("bsh,hnd->bnsd", h, self.q))         # (b, n, s, d)
        h = h + torch.einsum("bnsd,ndh->bsh", heads, self.o)
        mixed = torch.einsum("bsh,khg->bskg", h, self.mix).mean(2)
        per_expert = torch.einsum("bskh,khg->bskg", h[:, :, None].expand(-1, -1, 3, -1), self.experts)
        mixed = mixed + per_expert.mean(2)
        h = F.gelu(torch.einsum("bsh,eh->bse", h + mixed, self.w))
        return self.head(h.mean(1))


def test_einsum_linear_layers_are_hat_layers_and_old_tasks_stay_bit_identical():
    torch.manual_seed(0)
    model, x, y = Einsums(), torch.randn(6, 5, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    hat = hatify.hatify(model, 2, example_inputs=(x[:2],))
    roles = {layer.name: (layer.role, layer.units, layer.input_units) for layer in hat.plan.layers}
    assert roles["q"] == ("masked", 8, 8) and roles["o"] == ("masked", 8, 8) and roles["w"] == ("masked", 5, 8)
    assert roles["mix"] == ("masked", 24, 8)
    assert "experts" not in roles and {p.name: p.policy for p in hat.plan.params}["experts"] == "per_task"
    with torch.no_grad(), hatify.masks_open(hat):
        assert torch.allclose(hat(x, task_id=1), model(x), atol=1e-5)
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(5):
            loss = F.cross_entropy(hat(x, task_id=t, mask_scale=hat.mask_scale(b, 5)), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        if t == 0:
            with torch.no_grad():
                after = hat(x, task_id=0)
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), after) and not torch.equal(hat(x, task_id=1), after)
