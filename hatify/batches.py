"""Batches of a task's data as the model takes them: one reader for every place that replays a task's data
(task statistics at `end_task(data=...)`, `observe`)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .errors import HatifyError

LABELS = "labels"


def model_device(module: torch.nn.Module) -> torch.device | None:
    """Where a model's tensors live (its first parameter or buffer): batches of a loader are moved there."""
    return next((v.device for v in (*module.parameters(), *module.buffers())), None)


def iterate_batches(data: Iterable[Any], device: torch.device | None = None, classes: bool = True
                    ) -> Iterator[tuple[tuple, dict, Any]]:
    """(positional inputs, keyword inputs, labels) per batch of `data`: each batch is `(inputs, labels)` with
    `inputs` a tensor or a tuple/list of them, or a dict of keyword inputs holding `labels`. With `classes`
    the labels must be 1-D within-task classes; without (norm statistics need only the inputs), the labels may
    be anything (detection targets, masks) or missing from a dict, and are passed on as they are.

    Example:
        >>> next(iterate_batches([(torch.zeros(2, 4), torch.tensor([0, 1]))]))[2]
        tensor([0, 1])
    """
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise HatifyError(f"data must be an iterable of batches ((inputs, labels) or a dict with 'labels'), "
                          f"got {type(data).__name__}")
    for i, batch in enumerate(data):
        if isinstance(batch, Mapping):
            if classes and LABELS not in batch:
                raise HatifyError(f"batch {i} is a dict without 'labels': task data needs each sample's class")
            kwargs = {k: v for k, v in batch.items() if k != LABELS}
            inputs, labels = (), batch.get(LABELS)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, labels, kwargs = batch[0], batch[1], {}
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        else:
            raise HatifyError(f"batch {i} is a {type(batch).__name__}: each batch must be (inputs, labels) or a "
                              "dict of keyword inputs holding 'labels'")
        if classes and (not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point()):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else ""
            raise HatifyError(f"batch {i}: labels must be a 1-D integer tensor of within-task classes, got "
                              f"{type(labels).__name__}{shape}")
        if device is not None:
            move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
            inputs, kwargs = tuple(move(v) for v in inputs), {k: move(v) for k, v in kwargs.items()}
        yield inputs, kwargs, labels
