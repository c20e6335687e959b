"""Task scores, one small class each (OpenOOD's shape): `setup(context)` once per set of statistics, then
`score(logits, features)` -> (batch, tasks), higher meaning "more likely this task". `logits` is
(tasks, batch, classes) and `features` (tasks, batch, features), each row computed under that task's masks.
Adding a score is adding a class with `@register`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HatifyError
from .forward import TaskOutputs
from .statistics import TaskStatistics

SCORES: dict[str, type["Score"]] = {}
# Shrinkage of the tied covariance towards its mean variance (MORE/ROW use 0.8 S + 0.2 I).
SHRINK = 0.2


def register(name: str):
    def add(cls: type["Score"]) -> type["Score"]:
        if name in SCORES:
            raise ValueError(f"score {name!r} registered twice")
        cls.name = name
        SCORES[name] = cls
        return cls
    return add


@dataclass
class Context:
    """What a score may read at setup: the statistics, the tasks scored (in order), and a function that runs
    inputs under all those tasks (for scores fitted on the kept samples)."""

    stats: TaskStatistics
    tasks: list[int]
    run: Callable[[tuple, dict], TaskOutputs]


class Score:
    name = ""
    needs_features = False
    needs_buffer = False
    temperature = 1.0  # probs = softmax(score / temperature) over tasks

    def setup(self, context: Context) -> None:
        self.tasks = context.tasks

    def score(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _per_task(context: Context, name: str) -> torch.Tensor:
    values = [context.stats.get(t, name) for t in context.tasks]
    if any(v is None for v in values):
        missing = [t for t, v in zip(context.tasks, values) if v is None]
        raise HatifyError(f"tasks {missing} have no recorded {name.replace('_', ' ')} (their head inputs could "
                          "not be read, or are too wide): use a logit score such as method='max_logit'")
    return torch.stack(values)


def squared_distances(x: torch.Tensor, centres: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(batch, centres) squared Mahalanobis distances, expanded (no batch x centres x features tensor), in
    float64 against the cancellation of the expansion."""
    x, centres, precision = x.double(), centres.to(x.device, torch.float64), precision.to(x.device, torch.float64)
    xp = x @ precision
    d = (xp * x).sum(-1, keepdim=True) - 2 * xp @ centres.T + ((centres @ precision) * centres).sum(-1)
    return d.clamp_min(0).float()


@register("max_softmax")
class MaxSoftmax(Score):
    def score(self, logits, features):
        return logits.softmax(-1).amax(-1).T


@register("max_logit")
class MaxLogit(Score):
    def score(self, logits, features):
        return logits.amax(-1).T


@register("energy")
class Energy(Score):
    def score(self, logits, features):
        return logits.logsumexp(-1).T


@register("normalized_max_logit")
class NormalizedMaxLogit(Score):
    """Max logit over its mean on the task's own training data: heads of different tasks have different scales."""

    temperature = 0.05

    def setup(self, context):
        super().setup(context)
        self.mean = _per_task(context, "logit_moments")[:, 0].clamp_min(1e-6)

    def score(self, logits, features):
        return (logits.amax(-1) / self.mean.to(logits)[:, None]).T


@register("mahalanobis")
class Mahalanobis(Score):
    """Minus the smallest Mahalanobis distance to the task's class means (its tied, shrunk covariance) of the
    features entering its head, over the distance's expected value on its own data (the number of features
    for an unshrunk covariance)."""

    needs_features = True

    def setup(self, context):
        super().setup(context)
        self.means = _per_task(context, "class_means")
        covariance = _per_task(context, "covariance").double()
        dim = covariance.shape[-1]
        eye = torch.eye(dim, dtype=covariance.dtype)
        scale = covariance.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
        shrunk = (1 - SHRINK) * covariance + SHRINK * scale * eye
        self.precision = torch.linalg.inv(shrunk)
        self.expected = (self.precision * covariance).sum((-2, -1)).clamp_min(1e-6).float()
        self.precision = self.precision.float()

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, tasks) smallest distance over each task's classes, over its expected value."""
        d = torch.stack([squared_distances(features[i], self.means[i], self.precision[i]).amin(-1)
                         for i in range(len(self.tasks))], 1)
        return d / self.expected.to(d)

    def score(self, logits, features):
        return -self.distances(features)


@register("combined")
class Combined(Score):
    """The normalised max logit plus the normalised Mahalanobis score, each in units of its spread on the
    task's own data (TPL's pairing of a logit and a feature score, replay-free)."""

    needs_features = True
    temperature = 0.5

    def setup(self, context):
        super().setup(context)
        self.logit = NormalizedMaxLogit()
        self.logit.setup(context)
        self.features = Mahalanobis()
        self.features.setup(context)
        moments = _per_task(context, "logit_moments")
        self.logit_spread = (moments[:, 1] / moments[:, 0].abs().clamp_min(1e-6)).clamp_min(1e-3)

    def score(self, logits, features):
        return self.logit.score(logits, features) / self.logit_spread.to(logits) \
            + self.features.score(logits, features)


def kept_samples(context: Context) -> tuple[tuple, dict, torch.Tensor]:
    """Every scored task's kept samples together, with the position of their task in `context.tasks`."""
    parts = [context.stats.buffer(t) for t in context.tasks]
    if any(p is None for p in parts):
        raise HatifyError("this method needs kept samples of every observed task: observe them with keep=n")
    args = tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0])))
    kwargs = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    owner = torch.cat([torch.full_like(p[2], i) for i, p in enumerate(parts)])
    return args, kwargs, owner


@register("knn")
class NearestOthers(Score):
    """Mahalanobis to the task's own class means against the mean distance to the k nearest kept samples of
    the other tasks, both seen through the task's masks in its metric (TPL's likelihood ratio with a kNN
    estimate of "the other tasks"): a task must score its own data high and what it saw of the others low."""

    needs_features = True
    needs_buffer = True
    k = 5

    def setup(self, context):
        super().setup(context)
        self.own = Mahalanobis()
        self.own.setup(context)
        args, kwargs, owner = kept_samples(context)
        features = context.run(args, kwargs).features
        self.others = [features[i][owner.to(features.device) != i] for i in range(len(context.tasks))]

    def score(self, logits, features):
        near = []
        for i, others in enumerate(self.others):
            d = squared_distances(features[i], others, self.own.precision[i])
            near.append(d.topk(min(self.k, d.shape[1]), largest=False).values.mean(-1) / self.own.expected[i])
        return torch.stack(near, 1) - self.own.distances(features)
