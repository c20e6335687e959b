"""Split Digits (scikit-learn, offline): 5 tasks of 2 classes, one AdamW optimizer reused across tasks."""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hatify
from hatify.metrics import summarize


def split_digits(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    tasks = []
    for t in range(5):
        idx = ((y == 2 * t) | (y == 2 * t + 1)).nonzero().squeeze(1)
        cut = int(0.7 * len(idx))
        tasks.append(((x[idx[:cut]], y[idx[:cut]] - 2 * t), (x[idx[cut:]], y[idx[cut:]] - 2 * t)))
    return tasks


def accuracy(hat, x, y, t):
    hat.eval()
    with torch.no_grad():
        return float((hat(x, task_id=t).argmax(1) == y).float().mean())


def test_split_digits_adamw_zero_forgetting_and_accuracy():
    torch.manual_seed(0)
    tasks = split_digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    hat = hatify.hatify(model, num_tasks=5, example_inputs=(torch.zeros(2, 64),))
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    acc = []
    for t, ((xtr, ytr), _) in enumerate(tasks):
        hat.train()
        hat.begin_task(t)
        batches = list(zip(xtr.split(32), ytr.split(32)))
        for epoch in range(10):
            for b, (xb, yb) in enumerate(batches):
                s = hat.mask_scale(b, len(batches))
                loss = F.cross_entropy(hat(xb, task_id=t, mask_scale=s), yb) + hat.regularization()
                opt.zero_grad()
                loss.backward()
                opt.step()
        hat.end_task()
        acc.append([accuracy(hat, xte, yte, j) for j, (_, (xte, yte)) in enumerate(tasks)])
    metrics = summarize(acc)
    print("accuracy matrix", acc, metrics, hat.capacity())
    assert metrics["bwt"] == 0.0
    assert metrics["acc"] >= 0.97
