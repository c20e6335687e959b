"""Norm statistics that match inference: a task's running statistics re-estimated under its final binary masks.

While a task trains, its BatchNorm copies gather running statistics under soft masks (annealed from s = 1/s_max in
every epoch) and from weights that keep moving; inference uses binary masks and the final weights. On a short
schedule the two differ enough to lose most of the eval-mode accuracy (the README loop on timm resnet18: 0.49 on a
later task, 1.0 after re-estimation). `end_task(data=...)` re-estimates them with the standard remedy ("precise
BN"): the task's data passed through once more, norms in train mode, everything else in eval, no gradient.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .batches import iterate_batches, model_device
from .errors import HatifyError
from .layers import TaskIndexed

_StatsNorm = nn.modules.batchnorm._NormBase


def task_norms(hat, t: int) -> list[_StatsNorm]:
    """Task t's own norm modules that keep running statistics: its copies in every task-indexed module, unless a
    finished task owns the copy already (a shared copy, frozen by the first task)."""
    return [norm for module in hat.net.modules() if isinstance(module, TaskIndexed)
            and (0 if module.shared else t) not in module.frozen for norm in module.pick(t).modules()
            if isinstance(norm, _StatsNorm) and norm.track_running_stats and norm.running_mean is not None]


def has_running_statistics(hat, t: int) -> bool:
    return bool(task_norms(hat, t))


def reestimate_norm_statistics(hat, t: int, data: Iterable[Any]) -> int:
    """Reset task t's running statistics and average them over `data` (batches as `end_task` takes them) under
    t's binary masks, with the weights as they are now. Returns the number of batches read.

    Example:
        >>> reestimate_norm_statistics(hat, 0, loader)   # what end_task(data=loader) does first
        12
    """
    norms = task_norms(hat, t)
    if not norms:
        return 0
    batches = iterate_batches(data, model_device(hat), classes=False)
    first = next(batches, None)
    if first is None:
        raise HatifyError(f"end_task(data=...) for task {t}: the data held no batch; pass the task's training data "
                          "(its norm statistics are left as they were)")
    was_training, momenta = hat.training, [norm.momentum for norm in norms]
    saved = [{k: v.clone() for k, v in norm.state_dict().items()} for norm in norms]
    count, done = 0, False
    try:
        hat.eval()  # dropout and every other mode-dependent op as in inference; only t's norms gather statistics
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches, not a moving one
            norm.train(True)
        with torch.no_grad():
            for args, kwargs, _ in _chain(first, batches):
                hat(*args, **kwargs, task_id=t)
                count += 1
        done = True
    finally:
        for norm, momentum, state in zip(norms, momenta, saved):
            norm.momentum = momentum
            if not done:  # a bad batch midway: the statistics as they were
                norm.load_state_dict(state)
        hat.train(was_training)
    return count


def _chain(first: Any, rest: Iterable[Any]):
    yield first
    yield from rest
