"""What task inference keeps about each finished task, as buffers of one module (`hat.task_stats`), so that
`state_dict`, `hatify.save` and `hatify.load` carry them and `forget_task` drops them.

Per observed task t (buffer names `t{t}_<name>`):
- `logit_moments`: mean and std of the max logit and of the energy (logsumexp) of its head on its own data;
- `class_means` (classes, features), `covariance` (features, features, one tied within-class covariance) and
  `class_counts` of the features that enter its head(s), under its own masks;
- with `keep=n`: `buffer_labels` and `buffer_arg{i}` / `buffer_kw_{name}`, n samples per class.
Buffers are created when a task is observed, and by `_load_from_state_dict` from the incoming state, so a
rebuilt model (hatify.load) takes them with strict loading.
"""
from __future__ import annotations

import re

import torch
from torch import nn

_NAME = re.compile(r"t(\d+)_(\w+)$")


class TaskStatistics(nn.Module):
    """Per-task statistics for task inference; `version` changes whenever they do (scores cache on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def tasks(self) -> list[int]:
        """The observed tasks, in order."""
        return sorted({int(m.group(1)) for name in self._buffers if (m := _NAME.match(name))
                       and m.group(2) == "logit_moments"})

    def get(self, t: int, name: str) -> torch.Tensor | None:
        return self._buffers.get(f"t{t}_{name}")

    def put(self, t: int, name: str, value: torch.Tensor) -> None:
        self.register_buffer(f"t{t}_{name}", value)
        self.version += 1

    def drop(self, t: int) -> None:
        for name in [n for n in self._buffers if (m := _NAME.match(n)) and int(m.group(1)) == t]:
            del self._buffers[name]
        self.version += 1

    def buffer(self, t: int) -> tuple[tuple, dict, torch.Tensor] | None:
        """Task t's kept samples as (positional inputs, keyword inputs, labels), or None."""
        labels = self.get(t, "buffer_labels")
        if labels is None:
            return None
        args: list[torch.Tensor] = []
        while (arg := self.get(t, f"buffer_arg{len(args)}")) is not None:
            args.append(arg)
        prefix = f"t{t}_buffer_kw_"
        kwargs = {n[len(prefix):]: v for n, v in self._buffers.items() if n.startswith(prefix)}
        return tuple(args), kwargs, labels

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The observed tasks (and their shapes) are in the incoming state: make the buffers match it.
        for name in [n for n in self._buffers if _NAME.match(n)]:
            del self._buffers[name]
        for key, value in state_dict.items():
            if key.startswith(prefix) and _NAME.match(key[len(prefix):]) and "." not in key[len(prefix):]:
                self.register_buffer(key[len(prefix):], torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.version += 1
