"""Per-task copies that share their initial values until their task begins.

`TaskIndexed` (heads, norms) and `TaskParameter` hold one copy per task, and every copy starts from the converted
model's values. The parameters of the copies whose task has not begun ("pending") share one storage, so a
converted 134M Llama holds one untied lm_head, not one per task. A pending copy gets storage of its own
("materialises") at `begin_task(t)`, and before anything could write it: when a gradient is accumulated into it (a
hook), before any optimizer step while it holds a gradient (a step pre-hook: gradients set by other means), and
before `load_state_dict` writes values into it that the other pending copies do not get. The Parameter objects stay
the same (their storage is swapped), so an optimizer built before `begin_task(t)` trains task t's copy; the last
pending copy keeps the shared storage. Outside, the sharing does not show: `state_dict()` gives each copy a
tensor of its own (safetensors refuses shared storage), `.to()` / `.half()` keep one storage for the pending
copies, a deep copy or a sharded model (FSDP2 shards each parameter into storage of its own) shares nothing.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import HatifyError

# Modules with pending copies, materialised before any optimizer step where one holds a gradient.
_LIVE: "weakref.WeakSet[TaskCopies]" = weakref.WeakSet()


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for module in list(_LIVE):
        for t, params in module.__dict__.get("_pending_params", ()):  # (listed by `watch`: every step reads it)
            if any(p.grad is not None for p in params):
                module.materialise(t)


register_optimizer_step_pre_hook(_before_step)


def _storage(p: torch.Tensor) -> int | None:
    """The address of `p`'s storage; None for a tensor without one of its own (a DTensor shard wrapper)."""
    return p.untyped_storage().data_ptr() if type(p.data) is torch.Tensor else None


def _accumulated(ref: "weakref.ref[TaskCopies]", t: int, param: torch.Tensor) -> None:
    module = ref()
    if module is not None:
        module.materialise(t)


def _after_load(module: "TaskCopies", incompatible_keys) -> None:
    module.watch()  # `load_state_dict(assign=True)` puts new Parameter objects in place


class TaskCopies(nn.Module):
    """Base of the modules that hold one copy per task: `task_parameters(t)` lists copy t's parameters as
    (state dict key below this module, role, parameter), the role naming the same parameter in every copy."""

    def task_parameters(self, t: int) -> list[tuple[str, str, nn.Parameter]]:
        raise NotImplementedError

    def share_pending(self, tasks: range) -> None:
        """Call once the copies of `tasks` alias one another's parameters: they are pending."""
        self.pending: set[int] = set(tasks) if len(tasks) > 1 else set()
        self.register_load_state_dict_post_hook(_after_load)
        self.watch()

    def watch(self) -> None:
        """Hook the pending parameters (once each): a gradient accumulated into one materialises its copy."""
        self.__dict__["_pending_params"] = [(t, [p for _, _, p in self.task_parameters(t)])
                                            for t in sorted(self.pending)]
        self.__dict__["_versions"] = {id(p): p._version for _, params in self._pending_params for p in params}
        if not self.pending:
            _LIVE.discard(self)
            return
        _LIVE.add(self)
        watched = self.__dict__.setdefault("_watched", {})  # id -> weakref (tensors compare by value)
        for t in self.pending:
            for _, _, p in self.task_parameters(t):
                ref = watched.get(id(p))
                if p.requires_grad and (ref is None or ref() is not p):
                    p.register_post_accumulate_grad_hook(functools.partial(_accumulated, weakref.ref(self), t))
                    watched[id(p)] = weakref.ref(p)

    def aliases(self) -> list[list[tuple[int, str, nn.Parameter]]]:
        """Groups of pending copies' parameters (task, key, parameter) that share one storage."""
        groups: dict[tuple[str, int], list] = {}
        for t in sorted(self.pending):
            for key, role, p in self.task_parameters(t):
                if (address := _storage(p)) is not None:
                    groups.setdefault((role, address), []).append((t, key, p))
        return [members for members in groups.values() if len(members) > 1]

    @torch.no_grad()
    def materialise(self, t: int) -> None:
        """Copy t gets storage of its own (the same values), unless no other pending copy shares it."""
        if t not in self.pending:
            return
        self._check_unwritten()
        shared = {id(p) for members in self.aliases() for u, _, p in members if u == t}
        self.pending.discard(t)
        for _, _, p in self.task_parameters(t):
            if id(p) in shared:
                p.data = p.data.clone()
        self.watch()

    def _check_unwritten(self) -> None:
        """An in-place write by hand into one pending copy (`nn.init`, `p.mul_(...)`) also wrote the copies that
        share its storage: it bumped that parameter's version and not theirs. Writes into every copy alike (DDP's
        broadcast of rank 0's values) bump them all and pass; no step, gradient or load of ours bumps any."""
        versions = self.__dict__.get("_versions", {})
        for members in self.aliases():
            moved = {t: p._version - versions[id(p)] for t, _, p in members if id(p) in versions}
            if len(set(moved.values())) > 1:
                t, key = max(((t, key) for t, key, _ in members if t in moved), key=lambda m: moved[m[0]])
                others = sorted(u for u, _, _ in members if u != t)
                raise HatifyError(
                    f"task {t}'s copy `{key}` was written in place before begin_task({t}); its storage is shared "
                    f"with the copies of tasks {others} (not begun), whose starting values changed with it. "
                    f"Convert the model again and write a task's copy only after begin_task(t).")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Before the copies load (in place): a pending copy whose incoming values differ from the others' written
        into the shared storage, or that gets none while others do, materialises first."""
        for members in self.aliases():
            incoming = [state_dict.get(prefix + key) for _, key, _ in members]
            written = [value for value in incoming if value is not None]
            if not written:
                continue
            ref = written[-1]
            for (t, _, _), value in zip(members, incoming):
                if value is None or not _same(value, ref):
                    self.materialise(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not keep_vars:  # each copy a tensor of its own, as before the sharing
            for members in self.aliases():
                for _, key, _ in members[1:]:
                    state[prefix + key] = state[prefix + key].clone()
        return state

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.half()`, ...: `fn` converts one storage per group of aliases; the others take its result."""
        for t in sorted(self.pending):  # a gradient set by hand: that copy is written next
            if any(p.grad is not None for _, _, p in self.task_parameters(t)):
                self.materialise(t)
        groups = self.aliases()
        hidden = [(p, p.data) for members in groups for _, _, p in members[1:]]
        for p, data in hidden:
            p.data = data.new_empty(0)  # converted as well, so the parameter's dtype and device follow
        try:
            result = super()._apply(fn, recurse)
        except BaseException:
            for p, data in hidden:
                p.data = data
            raise
        params = {key: p for t in self.pending for key, _, p in self.task_parameters(t)}
        for members in groups:
            first = params[members[0][1]]
            for _, key, _ in members[1:]:
                params[key].data = first.data
        self.watch()
        return result

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k not in ("_watched", "_pending_params")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.watch()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
