"""Running a batch under several tasks' masks at once, with the logits and the features entering the heads.

The batch is repeated once per task and given one task id per row (`hat(x_rep, task_id=ids)`): one call of the
model for all tasks. The features are read by forward pre-hooks on the head modules the plan names."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import HatifyError
from ..inputs import inputs_device


@dataclass
class TaskOutputs:
    """The model's outputs for `tasks` (leading dimension tasks x batch, task-major), the logits
    (tasks, batch, classes) and the head-input features (tasks, batch, features) or None."""

    tasks: list[int]
    outputs: Any
    logits: torch.Tensor
    features: torch.Tensor | None


def head_modules(hat) -> list[tuple[str, torch.nn.Module]]:
    """The head layers that are modules of the converted graph (a head read as loose parameters has none)."""
    found = []
    for layer in hat.plan.layers:
        if layer.role == "head":
            try:
                found.append((layer.name, hat.net.get_submodule(layer.name)))
            except AttributeError:
                continue
    return found


@contextlib.contextmanager
def head_features(hat) -> Iterator[list[list[torch.Tensor]]]:
    """Collect, per head module, the (batch, features) inputs of its calls, in call order."""
    heads = head_modules(hat)
    seen: list[list[torch.Tensor]] = [[] for _ in heads]

    def hook(i: int):
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].ndim:
                seen[i].append(args[0].detach().flatten(1))
        return record

    handles = [module.register_forward_pre_hook(hook(i)) for i, (_, module) in enumerate(heads)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def pick_logits(output: Any, logits: str | int | None) -> torch.Tensor:
    """The tensor of class scores in a model output: `output[logits]` / `output.logits` when named, else the
    output itself when it is a tensor, else its `logits` field."""
    if logits is not None:
        try:
            value = output[logits] if isinstance(logits, int) or isinstance(output, dict) else getattr(output, logits)
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise HatifyError(f"logits={logits!r}: the model's output ({type(output).__name__}) has no such "
                              "field") from exc
    elif isinstance(output, torch.Tensor):
        value = output
    elif isinstance(output, dict) and "logits" in output or hasattr(output, "logits"):
        value = output["logits"] if isinstance(output, dict) else output.logits
    else:
        raise HatifyError(f"cannot tell which output holds the class scores: the model returns a "
                          f"{type(output).__name__} that is neither a tensor nor has a 'logits' field; pass logits="
                          "the field name (or tuple position)")
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise HatifyError(f"task inference needs logits of shape (batch, classes), got {shape}")
    return value


def run_tasks(hat, inputs: tuple, kwargs: dict, tasks: list[int], logits: str | int | None = None,
              features: bool = True) -> TaskOutputs:
    """The batch under every task in `tasks`, as one model call on the batch repeated len(tasks) times."""
    batch = _batch_size(inputs, kwargs)
    count = len(tasks)
    repeat = lambda v: v.repeat(count, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim \
        and v.shape[0] == batch else v
    device = inputs_device(inputs, kwargs)
    ids = torch.tensor(tasks, device=device).repeat_interleave(batch)
    context = head_features(hat) if features else contextlib.nullcontext([])
    with context as seen:
        out = hat(*pytree.tree_map(repeat, inputs), task_id=ids, **pytree.tree_map(repeat, kwargs))
    scores = pick_logits(out, logits).reshape(count, batch, -1)
    feats = None
    if seen and all(seen):
        parts = [torch.cat(calls) for calls in seen]
        if all(p.shape[0] == count * batch for p in parts):
            feats = torch.cat(parts, 1).reshape(count, batch, -1)
    return TaskOutputs(tasks, out, scores, feats)


def select_rows(outputs: Any, rows: torch.Tensor, total: int) -> Any:
    """Every batched leaf of `outputs` (leading dimension `total`) at `rows`; other leaves as they are."""
    take = lambda v: v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) and v.ndim \
        and v.shape[0] == total else v
    return pytree.tree_map(take, outputs)


def _batch_size(inputs: tuple, kwargs: dict) -> int:
    for leaf in pytree.tree_leaves((inputs, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return leaf.shape[0]
    raise HatifyError("task inference needs at least one batched tensor input")
