"""A mixed-task batch in one pass: each row of the batch under its own task's binary masks (eval only).

The converted graph is run once by an interpreter that gives the task-dependent modules a task id per row:
the mask bank returns one mask row per sample, gates scale each sample by its own row, and per-task modules
(norm copies, heads) run each task's rows through that task's copy. Everything else runs once on the whole
batch. Where a gated activation does not carry the batch on its first axis (as traced), or a per-task
parameter is read directly, the batch goes the per-task way instead (`Unsupported`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .layers import FoldedGate, Gate, MaskBank, TaskIndexed, TaskParameter
from .nested import call_opaque
from .rewrite import SCALE_ARG, TASK_ARG
from .shapes import TensorSpec


_MISSING = object()


class Unsupported(Exception):
    """This graph (or this batch) cannot take the per-sample path; the caller splits the batch by task."""


def run(net: fx.GraphModule, inputs: tuple, kwargs: dict, ids: torch.Tensor) -> Any:
    """The outputs of `net` with row i under task ids[i] and binary masks; raises `Unsupported`."""
    reason = net.meta.get("hat_per_sample")
    if reason is None:
        reason = net.meta["hat_per_sample"] = _static_reason(net)
    if reason:
        raise Unsupported(reason)
    values, positional = [], iter(inputs)
    for node in (n for n in net.graph.nodes if n.op == "placeholder"):
        if node.target in (TASK_ARG, SCALE_ARG):
            values.append(ids if node.target == TASK_ARG else None)
        elif (value := next(positional, _MISSING)) is not _MISSING:
            values.append(value)
        elif node.target in kwargs or node.args:
            values.append(kwargs[node.target] if node.target in kwargs else node.args[0])
        else:
            raise Unsupported(f"input {node.target} is missing")
    return _PerSample(net, ids).run(*values)


def batch_size(net: fx.GraphModule) -> int | None:
    """The leading size of the first tensor input, as traced (None: no tensor input has one)."""
    return next((n.meta["hat_spec"].shape[0] for n in net.graph.nodes if n.op == "placeholder"
                 and isinstance(n.meta.get("hat_spec"), TensorSpec) and n.meta["hat_spec"].ndim), None)


def _static_reason(net: fx.GraphModule, one_task: bool = False) -> str:
    """Why this graph can never take the per-sample path ('' if it can). `one_task`: every row runs the same
    task (only the masks differ per row), so a per-task parameter read by the graph is that task's."""
    batch = batch_size(net)
    from_inputs: set[fx.Node] = set()
    for node in net.graph.nodes:
        if (node.op == "placeholder" and node.target not in (TASK_ARG, SCALE_ARG)) or \
                any(n in from_inputs for n in node.all_input_nodes):
            from_inputs.add(node)
        if node.op == "call_function" and node.target is call_opaque:
            return f"{node.args[0].target} calls nested HAT subgraphs with one task's masks"
        if node.op != "call_module":
            continue
        module = net.get_submodule(node.target)
        if isinstance(module, TaskParameter) and not module.shared and not one_task:
            return f"{node.target} is a per-task parameter read by the graph"
        if isinstance(module, Gate):
            spec = node.meta.get("hat_spec")   # the gated activation, as traced
            if not isinstance(spec, TensorSpec) or not spec.ndim or spec.shape[0] != batch:
                return f"the activation gated at {node.target} does not carry the batch on its first axis"
        if isinstance(module, TaskIndexed) and node.args and node.args[0] not in from_inputs:
            # its input's rows are split by task: they must be samples (a held norm reads a parameter's rows)
            return f"the per-task module {node.target} reads a tensor that is not made from the model's inputs"
    return ""


@dataclass
class _TaskMasks:
    """The binary mask vector of every task (tasks, units + 1) and each sample's task."""

    table: torch.Tensor
    ids: torch.Tensor


class _PerSample(fx.Interpreter):
    def __init__(self, net: fx.GraphModule, ids: torch.Tensor) -> None:
        super().__init__(net)
        self.ids = ids
        self.tasks = ids.unique().tolist()

    def call_function(self, target, args, kwargs):
        self._no_ids(args, kwargs, target)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        self._no_ids(args, kwargs, target)
        return super().call_method(target, args, kwargs)

    def _no_ids(self, args, kwargs, target) -> None:
        if any(leaf is self.ids or isinstance(leaf, _TaskMasks) for leaf in pytree.tree_leaves((args, kwargs))):
            raise Unsupported(f"the task id or the masks reach {target} directly")

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, MaskBank):
            return self.masks(module)
        if isinstance(module, FoldedGate):
            owner = module.__dict__["target"]
            y = self.per_task(owner, args[0]) if isinstance(owner, TaskIndexed) else owner(args[0])
            return self.gate(module, y, args[1])
        if isinstance(module, Gate):
            return self.gate(module, *args)
        if isinstance(module, TaskIndexed):
            return self.per_task(module, *args, **{k: v for k, v in kwargs.items() if k != TASK_ARG})
        if isinstance(module, TaskParameter):
            return module(self.tasks[0])   # shared, or the one task of every row (else refused up front)
        self._no_ids(args, kwargs, target)
        return module(*args, **kwargs)

    def masks(self, bank: MaskBank) -> "_TaskMasks":
        if bank.override is not None:
            raise Unsupported("a mask override is set")
        rows = torch.stack([bank.embedding(t).detach() for t in range(bank.num_tasks)])
        binary = torch.ones_like(rows) if bank.open else (rows > 0).to(rows.dtype)
        return _TaskMasks(torch.cat([binary, binary.new_ones(bank.num_tasks, 1)], 1), self.ids.to(rows.device))

    def gate(self, gate: Gate, x: torch.Tensor, masks: "_TaskMasks") -> torch.Tensor:
        """x times each sample's gate: the gate's shape (right-aligned with x, as it broadcasts) with the batch
        axis, which it must not span, taken by the samples. Gathered per task first, then per sample."""
        if gate.span is not None:
            g = masks.table[:, gate.span[0]:gate.span[1]]
            shape = gate.span_shape if gate.span_shape is not None else tuple(gate.index.shape)
        else:
            g = masks.table[:, gate.index]
            g = g.amax(1) if gate.union else g
            shape = tuple(gate.index.shape[1:] if gate.union else gate.index.shape)
        batch = masks.ids.shape[0]
        shape = (1,) * (x.ndim - len(shape)) + shape
        if len(shape) != x.ndim or shape[0] != 1 or x.shape[0] != batch:
            raise Unsupported(f"an activation of shape {tuple(x.shape)} does not lead with the batch ({batch})")
        g = g.reshape(len(masks.table), *shape[1:]).to(x.dtype).index_select(0, masks.ids)
        y = x * g
        if bool(y.isnan().any()):  # as `_gated`: zero where the gate is zero, even where x is inf or NaN
            y = torch.where(g == 0, y.new_zeros(()), y)
        return y

    def per_task(self, module: TaskIndexed, x: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
        """Each task's rows through that task's copy (called as a module: hooks see each task's rows)."""
        if rest or kwargs or not isinstance(x, torch.Tensor) or not x.ndim or x.shape[0] != self.ids.shape[0]:
            raise Unsupported("a per-task module takes more than one batched tensor")
        if len(self.tasks) == 1:
            return module(x, hat_task_id=self.tasks[0])
        out = None
        for t in self.tasks:
            where = (self.ids == t).nonzero().squeeze(1).to(x.device)
            y = module(x.index_select(0, where), hat_task_id=t)
            if not isinstance(y, torch.Tensor):
                raise Unsupported("a per-task module returns more than one tensor")
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out.index_copy_(0, where, y)
        return out
