"""BatchNorm statistics that match inference (issue 20): `end_task(data=...)` re-estimates a task's running
statistics under its final binary masks, so eval-mode accuracy is what the task learned, on a short schedule too;
finished tasks stay bit-identical; without data a warning says what to pass."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify
from test_split_digits import split_digits


class BNNet(nn.Module):
    """conv-BN-ReLU(inplace) twice, a residual add_, max-pool, linear head: torchvision's spelling, 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.act, self.head = nn.ReLU(inplace=True), nn.Linear(16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        h = self.bn2(self.conv2(h)).add_(h)
        return self.head(F.max_pool2d(self.act(h), 2).flatten(1))


def _accuracy(hat, x, y, t, mode):
    hat.train(mode == "train")
    with torch.no_grad():
        return float((hat(x, task_id=t, mask_scale=None).argmax(1) == y).float().mean())


def _train(with_data: bool, tasks: int = 3):
    torch.manual_seed(0)
    data = split_digits()[:tasks]
    hat = hatify.hatify(BNNet(), tasks, (torch.zeros(2, 64),))
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    train_mode, outputs = [], []
    for t, ((x, y), _) in enumerate(data):
        hat.train()
        hat.begin_task(t)
        batches = list(zip(x.split(16), y.split(16)))[:8]  # a short schedule: 8 batches, one epoch
        for b, (xb, yb) in enumerate(batches):
            loss = F.cross_entropy(hat(xb, task_id=t, mask_scale=hat.mask_scale(b, len(batches))), yb)
            opt.zero_grad()
            (loss + hat.regularization()).backward()
            opt.step()
        train_mode.append(_accuracy(hat, x, y, t, "train"))  # batch statistics: what the weights learned
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hat.end_task(data=batches) if with_data else hat.end_task()
        assert any(issubclass(w.category, hatify.HatifyWarning) for w in caught) is not with_data
        hat.eval()
        with torch.no_grad():
            outputs.append(hat(data[0][1][0], task_id=0).clone())
    eval_mode = [_accuracy(hat, xte, yte, t, "eval") for t, (_, (xte, yte)) in enumerate(data)]
    return hat, train_mode, eval_mode, outputs


def test_eval_mode_accuracy_matches_what_the_task_learned():
    hat, train_mode, eval_mode, outputs = _train(with_data=True)
    print("train-mode", train_mode, "eval-mode", eval_mode)
    assert min(train_mode) >= 0.9
    assert all(e >= tr - 0.05 for e, tr in zip(eval_mode, train_mode)), (train_mode, eval_mode)
    assert all(torch.equal(o, outputs[0]) for o in outputs), "re-estimating a later task moved task 0"


def test_without_data_the_statistics_are_those_of_training_and_a_warning_says_so():
    _, _, with_data, _ = _train(with_data=True)
    _, _, without, _ = _train(with_data=False)
    print("eval-mode with data", with_data, "without", without)
    assert sum(with_data) > sum(without)


def test_bad_task_data_is_refused_and_leaves_the_statistics():
    hat = hatify.hatify(BNNet(), 2, (torch.zeros(2, 64),))
    hat.train()
    hat.begin_task(0)
    hat(torch.randn(4, 64), task_id=0, mask_scale=1.0)
    before = {k: v.clone() for k, v in hat.state_dict().items() if "running" in k}
    for bad in ([], [(torch.randn(4, 64), torch.zeros(4, dtype=torch.long)), torch.randn(4, 64)]):
        with pytest.raises(hatify.HatifyError):
            hat.end_task(data=bad)
        assert all(torch.equal(v, hat.state_dict()[k]) for k, v in before.items())
    assert hat.current_task == 0  # still open: end_task can be called again with good data
    hat.end_task(data=[(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))])
    assert hat.trained_tasks == [0]
