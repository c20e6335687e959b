"""HATConfig.task_outputs on a plain model that returns (logits, features): heads are only the layers reaching the
task outputs; the auxiliary output is gated and stays bit-identical for finished tasks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify
from soundness_models import two_tasks


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        features = self.body(x)
        return self.head(F.relu(features)), {"features": features}


def test_only_layers_reaching_the_task_outputs_are_heads_and_the_other_output_stays_bit_identical():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    every = hatify.explain(TwoOutputs(), 2, (x,))  # no `logits`: every returned tensor is a task output
    assert {layer.name: layer.role for layer in every.layers} == {"body.0": "masked", "body.2": "head", "head": "head"}
    hat = hatify.hatify(TwoOutputs(), 2, example_inputs=(x,), config=hatify.HATConfig(task_outputs=(0,)))
    assert {layer.name: layer.role for layer in hat.plan.layers} == {"body.0": "masked", "body.2": "masked",
                                                                     "head": "head"}
    assert hat.report.validation["passed"] and hat.report.validation["probe_violations"] == 0
    (logits0, aux0), (logits, aux), (_, other) = two_tasks(
        hat, lambda t, scale: hat(x, task_id=t, mask_scale=scale),
        lambda out: F.cross_entropy(out[0], y) + out[1]["features"].square().mean(), 5,
        torch.optim.SGD(hat.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    other = other["features"]
    assert torch.equal(logits, logits0) and torch.equal(aux["features"], aux0["features"])
    assert not torch.equal(other, aux0["features"])
    assert hat.plan.config.task_outputs == (0,)
    with pytest.raises(hatify.HatifyError, match="task_outputs names 2.*its outputs: 0, 1"):
        hatify.explain(TwoOutputs(), 2, (x,), hatify.HATConfig(task_outputs=(2,)))
    assert {layer.name: layer.role for layer in hatify.explain(
        TwoOutputs(), 2, (x,), hatify.HATConfig(task_outputs=("[1]['features']",))).layers}["body.2"] == "head"
