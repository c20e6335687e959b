"""Data-dependent Python in a model's own code: never taken for a constant, and a method of the root (or one a
forward calls directly) that cannot be traced becomes one opaque call (torchvision's detectors decode their
boxes so), with zero forgetting, save/load and extract."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify


class Detector(nn.Module):
    """HAT layers, then a decoding method with a Python branch on the number of scores above a threshold."""

    def __init__(self, top: int = 100) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 6)
        self.top = top

    def decode(self, scores):
        kept = scores[scores > 0]
        k = min(self.top, kept.shape[0])  # data-dependent: the number of detections
        return kept.topk(k).values

    def forward(self, x):
        scores = self.head(F.relu(self.body(x)))
        return scores, self.decode(scores)


class NeedsWeights(Detector):
    def decode(self, scores):
        kept = scores[scores > 0]
        return kept.topk(min(self.top, kept.shape[0])).values * self.head.weight.sum()


def _loss(out):
    scores, decoded = out
    return scores.square().mean() + decoded.sum()


def _train(hat, x, tasks):
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    for t in tasks:
        hat.train()
        hat.begin_task(t)
        for b in range(3):
            loss = _loss(hat(x, task_id=t, mask_scale=hat.mask_scale(b, 3))) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()


def _equal(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_untraceable_root_method_becomes_one_opaque_call(tmp_path):
    torch.manual_seed(0)
    model, x = Detector().eval(), torch.randn(4, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    why = hat.plan.opaque["decode()"]
    assert why.startswith(f"untraceable at test_opaque_methods.py:{Detector.decode.__code__.co_firstlineno + 2}")
    assert {layer.name for layer in hat.plan.masked_layers} == {"body.0", "body.2"}
    # other inputs keep fewer or more scores: the count was not baked in
    other = torch.randn(4, 4) * 3
    with torch.no_grad():
        assert len(model(other)[1]) != len(model(x)[1])
    assert hatify.validate(model, hat, (other,)).passed

    _train(hat, x, [0])
    hat.eval()
    with torch.no_grad():
        first = hat(x, task_id=0)
    _train(hat, x, [1])
    with torch.no_grad():
        assert _equal(hat.eval()(x, task_id=0), first)

    hatify.save(hat, tmp_path / "detector.hat")
    loaded = hatify.load(tmp_path / "detector.hat", model=Detector())
    alone = hat.extract(0)
    with torch.no_grad():
        assert _equal(loaded.eval()(x, task_id=0), first)
        assert _equal(alone(x), first)


def test_opaque_method_that_needs_parameters_is_refused():
    model, x = NeedsWeights().eval(), torch.randn(4, 4)
    with pytest.raises(hatify.HatifyError, match="NeedsWeights.decode cannot run as one opaque call") as info:
        hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert "test_opaque_methods.py:" in str(info.value)


class StaticScale(nn.Module):
    def forward(self, h):
        return h * float(h.shape[1]) ** -0.5  # a size: resolved at the example's shape


class CountScale(nn.Module):
    def forward(self, h):
        return h / float(h[h > 0].shape[0] + 1)  # the number of positive values: data


class ItemBranch(nn.Module):
    def forward(self, h):
        if h.mean().item() > 0:  # a branch on data
            h = h * 2
        return h


class ListOfValues(nn.Module):
    def forward(self, h):
        return sum(h * v for v in h.sum(0).tolist())  # as many terms as columns, each a value of the data


@pytest.mark.parametrize("module", [CountScale, ItemBranch, ListOfValues])
def test_python_values_read_from_data_are_never_constants(module):
    model = nn.Sequential(nn.Linear(4, 8), StaticScale(), module(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert set(hat.plan.opaque) == {"2"}, hat.plan.opaque
    assert "depends on tensor data" in hat.plan.opaque["2"] or "control flow" in hat.plan.opaque["2"]
    assert any(e["use"] == "float" for e in hat.plan.specialized)  # StaticScale's size
    assert hatify.validate(model, hat, (torch.randn(5, 4) * 2,)).passed
