"""The networks the benchmarks share: an MLP, a small CNN (1-D or 2-D) and timm's resnet18."""
from __future__ import annotations

import timm
from torch import nn


def mlp(inputs: int, classes: int, hidden: int = 256, layers: int = 2) -> nn.Module:
    """inputs -> hidden (x layers, ReLU) -> classes; flattens image inputs first."""
    body: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for _ in range(layers):
        body += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*body, nn.Linear(width, classes))


class SmallCNN(nn.Module):
    """Two conv -> BatchNorm -> ReLU -> max-pool blocks, then Linear -> ReLU -> Linear. `dims` 1 or 2."""

    def __init__(self, in_channels: int, size: int, classes: int, dims: int = 2, width: int = 32,
                 hidden: int = 128) -> None:
        super().__init__()
        conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if dims == 1
                            else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
        self.features = nn.Sequential(
            conv(in_channels, width, 3, padding=1), norm(width), nn.ReLU(), pool(2),
            conv(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), pool(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 4) ** dims, hidden), nn.ReLU(),
                                        nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet18(in_channels: int, classes: int) -> nn.Module:
    return timm.create_model("resnet18", num_classes=classes, in_chans=in_channels)
