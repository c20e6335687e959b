"""Small models, one per way a conversion used to go silently wrong (issue 14), and the two-task check."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import hatify

OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    "sgd_clip": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "fused_adamw": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
}


def two_tasks(hat, run: Callable, loss: Callable, steps: int, opt) -> tuple:
    """Tasks 0 and 1, `steps` batches each, one optimizer across them; `run(t, mask_scale)` is the model's call,
    `loss(output)` the task loss (the regulariser is added). Returns task 0's output right after it, and task 0's
    and task 1's at the end (eval, binary masks)."""
    after = None
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(steps):
            total = loss(run(t, hat.mask_scale(b, steps))) + hat.regularization()
            opt.zero_grad()
            total.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        if t == 0:
            with torch.no_grad():
                after = run(0, None)
    with torch.no_grad():
        return after, run(0, None), run(1, None)


def train_two_tasks(hat, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`two_tasks` on one input batch with cross-entropy, five batches a task, one AdamW(weight_decay)."""
    return two_tasks(hat, lambda t, scale: hat(x, task_id=t, mask_scale=scale), lambda out: F.cross_entropy(out, y),
                     5, torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1))


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def train_task(hat, t: int, inputs: tuple, opt, steps: int = 4, eval_steps: bool = False, clip: bool = False) -> None:
    """Train task t: half of its units (a fixed draw) on, so that later tasks have free units that move."""
    hat.train()
    hat.begin_task(t)
    with torch.no_grad():
        e = hat.masks.embedding(t)
        e.copy_(torch.where(torch.rand(e.shape, generator=torch.Generator().manual_seed(t)) < 0.5, 3.0, -3.0))
    for b in range(steps):
        if eval_steps:
            hat.eval()
        out = _output(hat(*inputs, task_id=t, mask_scale=hat.mask_scale(b, steps)))
        loss = out.float().square().mean() + (hat.regularization() if hat.training else 0)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(hat.parameters(), 0.1)
        opt.step()
    hat.end_task()


def task0_drift(model: nn.Module, inputs: tuple, optimizer: str = "adamw", eval_steps: bool = False) -> float:
    """Largest change of task 0's eval output after task 1 trains (0.0: bit-identical)."""
    hat = hatify.hatify(model, 2, inputs)
    opt = OPTIMIZERS[optimizer](hat.parameters())
    train_task(hat, 0, inputs, opt, clip=optimizer == "sgd_clip")
    hat.eval()
    with torch.no_grad():
        before = _output(hat(*inputs, task_id=0)).clone()
    train_task(hat, 1, inputs, opt, eval_steps=eval_steps, clip=optimizer == "sgd_clip")
    hat.eval()
    with torch.no_grad():
        after = _output(hat(*inputs, task_id=0))
    return 0.0 if torch.equal(before, after) else float((before - after).abs().max())


class TransformedWeight(nn.Module):
    """A functional layer whose weight passes through an op first (class 1)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(6, 6))
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        if self.kind == "t":
            w = self.w.t()
        elif self.kind == "flip":
            w = self.w.flip(0)
        elif self.kind == "norm":
            w = self.w / self.w.norm()
        else:  # "scale": rows stay in place, still a HAT layer
            w = self.w * 2
        return self.head(F.relu(F.linear(self.fc(x), w)))


class WeightReadOutside(nn.Module):
    """A layer's weight also read as a matrix elsewhere (class 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)) + F.relu(self.fc2(x)) @ self.fc.weight)


class TiedEmbedding(nn.Module):
    """Output projection tied to the input embedding (class 2; used to crash the rewrite with KeyError; now the
    embedding's tied read)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(10, 3)

    def forward(self, ids):
        return self.head(F.linear(F.relu(self.fc(self.emb(ids))), self.emb.weight))


class MaxNormEmbedding(nn.Module):
    """Embedding(max_norm=...) renormalises whole rows in place on every forward (class 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 6, max_norm=1.0), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.emb(ids))))


class RunningMean(nn.Module):
    """A parameter-free module with a running buffer it updates in training mode (class 4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.5).add_(0.5 * x.detach().mean(0))
        return x - self.mean


class WithRunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.centre, self.head = nn.Linear(6, 6), RunningMean(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.centre(F.relu(self.fc(x))))


class InPlace(nn.Module):
    """In-place ops and item assignment on a gated tensor (class 7)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h, y = F.relu(self.a(x)).clone(), self.b(x)
        if self.kind == "add_":
            h.add_(y)
        elif self.kind == "setitem":
            h[:, 0] = 1
        elif self.kind == "view_add_":
            h.view(-1, 6).add_(y)
        elif self.kind == "copy_":
            h.copy_(y)
        elif self.kind == "clamp_":
            h.clamp_(min=0.1)
        elif self.kind == "masked_fill_":
            h.masked_fill_(y > 0, 1.0)
        return self.head(F.relu(self.c(h)))


class KeywordAdd(nn.Module):
    """`torch.add(a, other=b)`: the second operand as a keyword (class 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.relu(self.c(torch.add(F.relu(self.a(x)), other=F.relu(self.b(x))))))


class Branchy(nn.Module):
    """Data-dependent control flow: an opaque leaf whose untaken branch gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.taken, self.untaken = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.taken(x) if bool(x.sum() > -1e9) else self.untaken(x)


class UntakenBranch(nn.Module):
    """Parameters that get no gradient in the original either (class 12): an untaken branch, a detached path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.branchy, self.frozen_path, self.head = nn.Linear(6, 6), Branchy(), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.relu(self.branchy(self.fc(x))) + self.frozen_path(x).detach())


class CachesActivation(nn.Module):
    """Caches a non-leaf tensor from its last forward, as timm's levit does in eval mode (class 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(6))
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.cache: dict = {}

    def forward(self, x):
        self.cache["bias"] = self.bias * 2
        return self.head(F.relu(self.fc(x) + self.cache["bias"]))


class NamedLikeGraphModule(nn.Module):
    """A submodule whose name is also a GraphModule attribute (class 10)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.add_module(name, nn.Linear(6, 3))
        self.last = name

    def forward(self, x):
        return getattr(self, self.last)(F.relu(self.fc(x)))


class PruneShapes(nn.Module):
    """Shapes where extract(t, prune=True) used to give wrong numbers or crash (classes 6 and 9)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.norm, self.conv = nn.LayerNorm(8), nn.Conv1d(8, 3, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.kind == "offset":
            h = h + 0.5
        elif self.kind == "one_minus":
            h = 1 - h
        elif self.kind == "clamp":
            h = h.clamp(min=0.1)
        elif self.kind == "hardtanh":
            h = F.hardtanh(h, 0.1, 1.0)
        elif self.kind == "pool_over_units":
            h = F.max_pool1d(h.unsqueeze(1), 3, 1, padding=1).squeeze(1)
        elif self.kind == "in_place":
            h = h.clone()
            h.add_(0.5)
        elif self.kind == "layer_twice":
            h = F.relu(self.c(F.relu(self.c(h))))
        elif self.kind == "norm_twice":
            h = self.norm(self.norm(h))
        elif self.kind == "linear_into_conv1d":
            return self.conv(self.c(h).unsqueeze(-1)).squeeze(-1)
        elif self.kind == "keyword_add":
            h = torch.add(h, other=F.relu(self.b(x)))
        return self.head(F.relu(self.c(h)))
