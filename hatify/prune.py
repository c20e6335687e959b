"""Physically remove the units a task does not use from an extracted plain model.

Each tensor downstream of a prunable layer carries `segments` along its channel axis: runs of channels that
come from one layer group (or from something unprunable, None), repeated `rep` times by flatten. Residual
adds and products tie layer groups together (they must keep the same positions); concatenation joins
segments; a tensor reaching anything else (the output, a reshape, a grouped convolution, an unknown op)
makes its groups unprunable. A group keeps the union of the units its layers use.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .flow import producer_input
from .inplace import writes_input
from .rules import PER_CHANNEL_MODULES, RULES, RuleContext, _canon, _keeps_zero, _window_axes
from .shapes import TensorSpec

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Segments:
    axis: int
    runs: list = field(default_factory=list)   # [(group or None, size, rep)]

    @property
    def size(self) -> int:
        return sum(size * rep for _, size, rep in self.runs)

    def groups(self) -> set:
        return {g for g, _, _ in self.runs if g is not None}


class _Groups:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


# Rules of ops that act per element or per spatial window: the channel axis passes unchanged.
_CHANNEL_PRESERVING = {"passthrough", "window"}


def _is_passthrough(node: fx.Node, net: nn.Module, axis: int) -> bool:
    """A per-element op that keeps zero (checked on its own arguments, as the mask-flow rule does), or a window op
    whose window does not span the unit axis `axis`: removed units would have read as zero anyway."""
    module = net.get_submodule(node.target) if node.op == "call_module" else None
    if node.op == "call_module":
        rule = RULES.get(type(module))
    elif node.op in ("call_function", "call_method"):
        rule = RULES.get(_canon(node.target))
    else:
        return False
    if rule is None or rule.id not in _CHANNEL_PRESERVING:
        return False
    ctx = RuleContext(node, {}, module, 1)
    spec = _spec(node.args[0] if node.args else None)
    if spec is None or (rule.id == "window" and axis % spec.ndim in _window_axes(ctx, spec.ndim)):
        return False
    return _keeps_zero(ctx, node.args[0])


def _operands(node: fx.Node) -> list:
    """Positional and keyword operands of an elementwise op (`torch.add(a, other=b)`), `alpha` aside."""
    return list(node.args) + [v for k, v in node.kwargs.items() if k not in ("alpha", "out")]


def _is_shape_query(node: fx.Node) -> bool:
    """size(), shape, dim(): reads shapes only, returns no tensor."""
    spec = node.meta.get("hat_spec")
    return spec is not None and not isinstance(spec, TensorSpec) and not any(
        isinstance(s, TensorSpec) for s in (spec if isinstance(spec, (tuple, list)) else ()))


def seg_shape(node: fx.Node) -> tuple[int, ...]:
    spec = _spec(node)
    return spec.shape if spec is not None else (0,)


def _spec(node: Any) -> TensorSpec | None:
    spec = node.meta.get("hat_spec") if isinstance(node, fx.Node) else None
    return spec if isinstance(spec, TensorSpec) else None


def _analyse(net: fx.GraphModule, layers: dict, unsafe: set, groups: _Groups) -> tuple[dict, dict, set]:
    """One propagation pass: segments per node, consumers' input segments, and newly found conflicts."""
    seg: dict[fx.Node, Segments | None] = {}
    consumers: dict[str, Segments] = {}
    conflicts: set = set()

    def spoil(*values: Any) -> None:
        for v in values:
            if isinstance(v, Segments):
                conflicts.update(v.groups())

    for node in net.graph.nodes:
        inputs = [seg.get(n) for n in node.all_input_nodes]
        live = [s for s in inputs if s is not None]
        module = net.get_submodule(node.target) if node.op == "call_module" else None
        layer = layers.get(node.name)
        out = None
        if layer is not None:
            data = producer_input(node)
            single = len(layer.sites) == 1  # a layer called twice keeps its shape: every call must fit it
            if isinstance(data, fx.Node) and seg.get(data) is not None:
                # the axis this layer reads its input units from (a Linear output read by a Conv1d: another one)
                in_axis = (-1 if isinstance(module, nn.Linear) else 1) % len(seg_shape(data))
                if getattr(module, "groups", 1) != 1 or not isinstance(module, _PRUNABLE) or not single \
                        or seg[data].axis != in_axis:
                    spoil(seg[data])
                else:
                    consumers[node.name] = seg[data]
            spec = _spec(node)
            if layer.role == "masked" and isinstance(module, _PRUNABLE) and getattr(module, "groups", 1) == 1 \
                    and single and spec is not None and groups.find(layer.name) not in unsafe:
                out = Segments((-1 if isinstance(module, nn.Linear) else 1) % spec.ndim,
                               [(layer.name, layer.units, 1)])
        elif not live or (node.op != "output" and _is_shape_query(node)):
            out = None
        elif node.op == "output":
            spoil(*live)
        elif writes_input(node, module) and not _is_passthrough(node, net, live[0].axis):
            spoil(*live)  # an in-place write changes a tensor other readers hold
        # (a BatchNorm's features are axis 1: units on another axis, a Linear's behind a permute, are spoiled)
        elif _is_passthrough(node, net, live[0].axis) or \
                (module is not None and type(module) in PER_CHANNEL_MODULES and live[0].axis == 1) or \
                (node.target is operator.mul and str(getattr(node.args[1], "target", "")).startswith("hat_mask_")):
            src, spec_in, spec_out = inputs[0], _spec(node.all_input_nodes[0]), _spec(node)
            if src is not None and spec_in and spec_out and spec_in.ndim == spec_out.ndim and \
                    spec_in.shape[src.axis] == spec_out.shape[src.axis] and len(live) == 1:
                out = src
            else:
                spoil(*live)
        elif node.op in ("call_function", "call_method") and _canon(node.target) in ("add", "sub", "mul") and not (
                _canon(node.target) != "mul" and any(not isinstance(a, fx.Node) and a != 0 for a in _operands(node))):
            # (a non-zero offset, `h + 0.5`, would make removed units non-zero)
            tensors = [n for n in _operands(node) if _spec(n) is not None]
            specs = [_spec(n) for n in tensors]
            full = [s for s in specs if s is not None and s.ndim == _spec(node).ndim]
            segs = [seg.get(n) for n in tensors]
            known = [s for s in segs if s is not None]
            axis = known[0].axis
            wide = [(s, sp) for s, sp in zip(segs, specs) if sp.ndim == len(_spec(node).shape)
                    and sp.shape[axis] == _spec(node).shape[axis] and sp.shape[axis] != 1]
            if all(s is not None for s, _ in wide) and all(
                    [(sz, rep) for _, sz, rep in s.runs] == [(sz, rep) for _, sz, rep in known[0].runs]
                    and s.axis == axis for s, _ in wide) and len(full) == len(tensors):
                for s, _ in wide:
                    for (a, _, _), (b, _, _) in zip(s.runs, known[0].runs):
                        if (a is None) != (b is None):
                            spoil(s, known[0])
                        elif a is not None:
                            groups.union(a, b)
                out = known[0]
            else:
                spoil(*live)
        elif node.op in ("call_function", "call_method") and _canon(node.target) == "cat":
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            axis = live[0].axis
            spec_out = _spec(node)
            if dim % spec_out.ndim == axis:
                runs = []
                for p in parts:
                    s = seg.get(p)
                    runs += s.runs if s is not None and s.axis == axis else [(None, _spec(p).shape[axis], 1)]
                out = Segments(axis, runs)
            else:
                spoil(*live)
        elif node.op in ("call_function", "call_method") and _canon(node.target) in ("flatten", "view", "reshape"):
            src, spec_in, spec_out = inputs[0], _spec(node.all_input_nodes[0]), _spec(node)
            if src is not None and src.axis == 1 and spec_out.ndim == 2 and spec_out.shape[0] == spec_in.shape[0]:
                rep = math.prod(spec_in.shape[2:])
                out = Segments(1, [(g, size, r * rep) for g, size, r in src.runs])
            else:
                spoil(*live)
        else:
            spoil(*live)
        seg[node] = out
    return seg, consumers, conflicts


def prune(net: fx.GraphModule, plan, mask: torch.Tensor) -> dict:
    """Prune `net` (an extracted task model, edited in place) to the units `mask` marks; returns a summary."""
    layers = {site.node: layer for layer in plan.layers for site in layer.sites}
    unsafe: set = set()
    while True:
        groups = _Groups()
        seg, consumers, conflicts = _analyse(net, layers, unsafe, groups)
        bad = {groups.find(g) for g in conflicts} | unsafe
        members = {}
        for layer in plan.masked_layers:
            members.setdefault(groups.find(layer.name), []).append(layer)
        for root, group in members.items():
            if len({layer.units for layer in group}) > 1:
                bad.add(root)
        bad = {groups.find(g) for g in bad}
        if bad <= unsafe:
            break
        unsafe |= bad
    keep: dict[str, torch.Tensor] = {}
    for root, group in members.items():
        if root in unsafe or not any(layer.name in {r[0] for s in seg.values() if s for r in s.runs}
                                     for layer in group):
            continue
        used = torch.zeros(group[0].units, dtype=torch.bool)
        for layer in group:
            used |= mask[layer.offset: layer.offset + layer.units] > 0
        if not used.any():
            used[0] = True  # keep one unit so shapes stay valid
        keep[root] = used

    def vector(s: Segments) -> torch.Tensor:
        return torch.cat([keep[groups.find(g)].repeat_interleave(rep) if g is not None and groups.find(g) in keep
                          else torch.ones(size * rep, dtype=torch.bool) for g, size, rep in s.runs])

    summary = {}
    with torch.no_grad():
        for node in net.graph.nodes:
            s = seg.get(node)
            layer = layers.get(node.name)
            if node.op == "call_module" and layer is not None:
                module = net.get_submodule(node.target)
                rows = keep.get(groups.find(layer.name)) if layer.role == "masked" else None
                cols = vector(consumers[node.name]) if node.name in consumers else None
                _slice_layer(module, rows, cols)
                summary[layer.name] = {"units": layer.units, "kept": int(rows.sum()) if rows is not None
                                       else layer.units, "pruned": rows is not None}
            elif s is not None and node.op == "call_module" and \
                    type(net.get_submodule(node.target)) in PER_CHANNEL_MODULES:
                _slice_norm(net.get_submodule(node.target), vector(s))
            elif s is not None and node.target is operator.mul and isinstance(node.args[1], fx.Node) \
                    and node.args[1].op == "get_attr" and node.args[1].target.startswith("hat_mask_"):
                const = getattr(net, node.args[1].target)
                axis = s.axis - (_spec(node).ndim - const.ndim)
                if axis >= 0 and const.shape[axis] > 1:
                    setattr(net, node.args[1].target, const.index_select(axis, vector(s).nonzero().squeeze(1)))
    return summary


def _slice_layer(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    weight = module.weight
    if rows is not None:
        weight = weight[rows]
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[rows], requires_grad=False)
    if cols is not None:
        weight = weight[:, cols]
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape[0], weight.shape[1]
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]


def _slice_norm(module: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(module, name, None)
        if value is None:
            continue
        if isinstance(value, nn.Parameter):
            setattr(module, name, nn.Parameter(value[keep], requires_grad=False))
        else:
            module._buffers[name] = value[keep]
    module.num_features = int(keep.sum())
