"""Small architectures for the command-line tests, importable as `cli_factories:<name>`."""
from __future__ import annotations

import random

import torch
from torch import nn


def small_cnn(width: int = 8, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class DataDependent(nn.Module):
    """Branches on tensor values, so torch.fx cannot trace through it: hatify keeps it as an opaque leaf."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x) if x.sum() > 0 else x


class WithOpaque(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.middle = DataDependent(width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.middle(torch.relu(self.inp(x))))


def with_opaque(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return WithOpaque(width)


class Noisy(nn.Module):
    """Adds a number Python draws on every call, even in eval mode: the trace keeps the one drawn while tracing,
    so no conversion can reproduce its outputs. (Torch's own random ops are reproduced: validation runs the
    original and the conversion under one seed.)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + random.random()


def noisy() -> nn.Module:
    return Noisy()


class LooseParam(nn.Module):
    """A parameter read directly by forward (outside any layer), and a BatchNorm: per-task copies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 12)
        self.offset = nn.Parameter(torch.zeros(12))
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.hidden(x) + self.offset))


def loose_param_net() -> nn.Module:
    torch.manual_seed(0)
    return LooseParam()


class Tied(nn.Module):
    """Two layers sharing one weight tensor: its state dict holds two names for one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


def tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied()
