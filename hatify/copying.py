"""Copies of models that hold cached activations: `copy.deepcopy` refuses tensors that are not graph leaves
(timm's levit caches attention biases computed in its last forward), so such caches are copied detached."""
from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def _cached_non_leaves(value: Any, depth: int = 0):
    """Non-leaf tensors in an attribute value (a tensor, or one inside a dict, list or tuple)."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _cached_non_leaves(item, depth + 1)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _cached_non_leaves(item, depth + 1)


def detached_deepcopy(obj: T, memo: dict[int, Any] | None = None) -> T:
    """`copy.deepcopy`, with every non-leaf tensor a module holds in a plain attribute copied detached. `memo`:
    objects by id that the copy takes as they are (`copy.deepcopy`'s memo).

    Example:
        >>> net = nn.Linear(2, 2); net.cache = net(torch.ones(1, 2))   # a cached activation
        >>> detached_deepcopy(net).cache.requires_grad
        False
    """
    memo = dict(memo or {})
    modules = obj.modules() if isinstance(obj, nn.Module) else ()
    for module in modules:
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):  # leaves: deepcopy handles them
                continue
            for tensor in _cached_non_leaves(value):
                memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(obj, memo)
