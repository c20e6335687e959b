"""Gates folded into the module they follow (a norm's affine parameters, a linear layer's rows) compute what the
separate gate computes: the same outputs and gradients, bit-identical outputs with binary masks."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import hatify
from hatify.layers import FoldedGate


class FoldNet(nn.Module):
    """Conv + BatchNorm without affine parameters, conv + GroupNorm (its mask applied again after the norm), a
    linear layer without bias over tokens (more rows than inputs: folded into its rows) + LayerNorm (mask applied
    again), a wide linear layer (fewer rows than inputs: gated on its output), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)
        self.c2, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.tok, self.ln = nn.Linear(8, 12, bias=False), nn.LayerNorm(12)
        self.wide = nn.Linear(12 * 16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = F.max_pool2d(F.relu(self.gn(self.c2(h))), 2)
        t = F.gelu(self.ln(self.tok(h.flatten(2).transpose(1, 2))))
        return self.head(F.relu(self.wide(t.flatten(1))))


def _converted(validate=False):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    model = FoldNet()
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    if validate:
        result = hatify.validate(model, hat, (x[:2],))
        assert result.passed, result
    with torch.no_grad():
        hat.masks.embedding(0).normal_()
    return hat, x


def _unfolded(hat):
    """A copy whose folded modules carry a forward hook: FoldedGate then calls them as they are and gates after."""
    twin = copy.deepcopy(hat)
    calls = []
    for gate in twin.net.hat_gates.values():
        if isinstance(gate, FoldedGate):
            gate.target.register_forward_hook(lambda *args: calls.append(1))
    return twin, calls


def test_gates_after_norms_and_linear_layers_are_folded_and_validate():
    hat, _ = _converted(validate=True)
    folded = {name for name, gate in hat.net.hat_gates.items() if isinstance(gate, FoldedGate)}
    assert folded == {"bn", "gn", "tok", "ln", "wide"}  # c2's gate follows a convolution: applied on its own


def test_folded_gates_match_gates_on_the_outputs_in_training_and_eval():
    hat, x = _converted()
    twin, calls = _unfolded(hat)
    hat.train(), twin.train()
    hat.begin_task(0), twin.begin_task(0)
    outs, grads = [], []
    for model in (hat, twin):
        out = model(x, task_id=0, mask_scale=3.0)
        (out.square().sum() + model.regularization()).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls, "the hooked copy did not take the unfolded path"
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and "net.hat_masks.task0" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    bn, bn_twin = hat.net.bn.copies[0], twin.net.bn.copies[0]
    assert torch.equal(bn.running_mean, bn_twin.running_mean) and torch.equal(bn.running_var, bn_twin.running_var)
    assert int(bn.num_batches_tracked) == int(bn_twin.num_batches_tracked) == 1

    hat.end_task(), twin.end_task()
    hat.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), twin(x, task_id=0))
        assert torch.equal(hat.extract(0)(x), hat(x, task_id=0))
