"""Stage 4, plan: per HAT layer its own mask, the masks feeding its input (index maps), where its mask
is applied, its role, status and reason; per other parameter its policy. The single source of truth
for the rewrite, the report, saving and reloading."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import Capture
from .config import HATConfig
from .errors import source_line
from .flow import Flow, Producer, UnknownOp, op_name
from .maps import ONES, UnitMap, per_unit
from .shapes import TensorSpec


@dataclass
class LayerPlan:
    name: str
    op: str
    kind: str
    role: str                      # "masked" or "head"
    units: int
    offset: int | None             # first unit in the model-wide mask vector
    weight: str
    bias: str | None
    groups: int
    sites: list                    # CallSite per call of the layer
    input_units: int | None
    params: int = 0
    input_index: torch.Tensor | None = None   # (rows, input_units) global unit ids, ONES = -1
    input_producers: list[str] = field(default_factory=list)
    input_map: str = "ones"
    rule: str = ""
    status: str = "converted"
    reason: str = ""
    frozen: list[str] = field(default_factory=list)   # its parameters with requires_grad=False: not protected

    @property
    def protected(self) -> list[str]:
        """The layer's parameters that `Protect` guards (the trainable ones)."""
        return [q for q in (self.weight, self.bias) if q and q not in self.frozen]

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "kind": self.kind, "role": self.role, "units": self.units,
                "offset": self.offset, "weight": self.weight, "bias": self.bias, "groups": self.groups,
                "calls": [vars(s) for s in self.sites], "input_units": self.input_units, "params": self.params,
                "input_producers": self.input_producers, "input_map": self.input_map, "rule": self.rule,
                "status": self.status, "reason": self.reason, "frozen": self.frozen}


@dataclass
class ModulePlan:
    """A leaf module kept whole and given one copy per task (norms, heads, opaque leaves)."""

    name: str
    op: str
    # "task_indexed" | "statistics_per_task" (frozen affine) | "head" | "per_task" | "freeze" | "frozen" | "shared"
    policy: str
    reason: str
    params: int


@dataclass
class ParamPlan:
    """A parameter read directly by the graph outside any HAT layer (position embedding, layer scale...)."""

    name: str
    shape: tuple
    policy: str                    # "per_task" | "freeze" | "head" | "frozen" | "shared"
    reason: str


@dataclass
class Plan:
    num_tasks: int
    config: HATConfig
    layers: list[LayerPlan]
    modules: list[ModulePlan]
    params: list[ParamPlan]
    gates: dict[str, torch.Tensor]      # node name -> index map of the mask applied after it
    remask: dict[str, torch.Tensor]     # node name -> index map re-applied after a norm
    unknown: list[UnknownOp]
    opaque: dict[str, str]
    mode_leaves: list[str]
    total_units: int
    node_count: int
    # Where the trace resolved Python control flow at the example inputs' shapes (reason, node, line).
    specialized: list[dict] = field(default_factory=list)
    # Parameters that had requires_grad=False at conversion (kept as they are; recorded so that `load` rebuilds
    # the same plan from a fresh architecture).
    frozen: list[str] = field(default_factory=list)
    # alias -> the user's top-level name, where the graph holds a module under another name (hatify.naming).
    renamed: dict[str, str] = field(default_factory=dict)
    # Opaque modules' submodules converted as HAT subgraphs (`hatify.nested`): path -> NestedPart.
    nested: dict = field(default_factory=dict)

    def is_nested(self, name: str) -> bool:
        """Whether `name` (a module or parameter) lies inside a nested subgraph, which its own plan rewrites."""
        return any(name.startswith(f"{path}.") for path in self.nested)

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def masked_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.role == "masked"]

    def to_dict(self) -> dict:
        from .nested import nested_paths

        return {"num_tasks": self.num_tasks, "config": self.config.to_dict(),
                "layers": [layer.to_dict() for layer in self.layers],
                "modules": [vars(m) for m in self.modules], "params": [
                    {**vars(p), "shape": list(p.shape)} for p in self.params],
                "remask": sorted(self.remask), "unknown": [vars(u) for u in self.unknown],
                "opaque": self.opaque, "mode_leaves": self.mode_leaves, "total_units": self.total_units,
                "node_count": self.node_count, "specialized": self.specialized,
                "frozen": self.frozen, "nested": nested_paths(self)}


def stacked_index(unit_map: UnitMap, ones_index: int) -> torch.Tensor:
    """(terms, *shape) long tensor for gathering from the mask vector; ONES points at the trailing 1."""
    terms = list(unit_map.terms)
    shape = torch.broadcast_shapes(*(t.shape for t in terms))
    stacked = torch.stack([t.expand(shape) for t in terms])
    return stacked.masked_fill(stacked == ONES, ones_index).contiguous()


def _owners(used: torch.Tensor, producers: list[Producer]) -> list[str]:
    """Names of the producers (in their order) whose unit ranges hold any of the `used` units: each unit's range
    found by a binary search over the ranges (disjoint: `find_producers` lays them out one after another)."""
    masked = sorted((p for p in producers if p.offset is not None), key=lambda p: p.offset)
    if not masked or not len(used):
        return []
    starts = torch.tensor([p.offset for p in masked])
    ends = torch.tensor([p.offset + p.units for p in masked])
    at = torch.searchsorted(starts, used, right=True) - 1
    held = {masked[i].name for i in at[(at >= 0) & (used < ends[at.clamp(min=0)])].unique().tolist()}
    return [p.name for p in producers if p.offset is not None and p.name in held]


def _describe(index: torch.Tensor, producers: list[Producer]) -> tuple[list[str], str]:
    """Names of the masks feeding an input, and a short description of the index map."""
    used = index[index != ONES].unique()
    names = _owners(used, producers)
    if not len(used):
        return [], "ones (no mask known)"
    partial = " + ones" if bool((index == ONES).any()) else ""
    if index.shape[0] > 1:
        return names, f"union of {index.shape[0]}{partial}"
    row = index[0]
    if len(names) == 1 and not partial:
        p = next(p for p in producers if p.name == names[0])
        local = row - p.offset
        if torch.equal(local, torch.arange(p.units)):
            return names, "identity"
        if row.numel() % p.units == 0:
            rep = row.numel() // p.units
            if torch.equal(local, torch.arange(p.units).repeat_interleave(rep)):
                return names, f"repeat_interleave({rep})"
        start = int(local[0])
        if torch.equal(local, torch.arange(start, start + local.numel())):
            return names, f"slice [{start}:{start + local.numel()}]"
    if len(names) > 1:
        return names, f"concat of {len(names)}{partial}"
    return names, f"index map{partial}"


MADE_FROM = "made from"  # the reason of an input without a mask because nothing upstream has one (the model input)


def unmasked_input_reason(gm: fx.GraphModule, flow: Flow, starts: list[str | None]) -> str:
    """Why no mask reaches a layer's input (`input_map` "ones"), for the report: the nearest place upstream where
    the masks were lost (an op without a rule, an op whose rule drops them, a mask site whose map is ones, e.g. a
    tensor written in place), else what the input is made from (the model input, a parameter, a new tensor)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    unknown = {u.node: u for u in flow.unknown}
    sites = {site.apply_after: p.name for p in flow.producers for site in p.sites if site.apply_after}
    queue, seen, sources = [nodes[s] for s in starts if s in nodes], {}, []
    if not queue:
        return "the input is not a tensor of known shape"
    if any(_masked(flow, node) for node in queue):
        return "its input's masks are on other axes than its input units"
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen[node] = None  # (a dict: the first in-place writer found is the nearest)
        if node.name in unknown:
            why = unknown[node.name].reason.removesuffix(": output treated as all ones")
            return f"{_where(node, unknown[node.name].op)}: {why}"
        if node.name in sites:
            line = f" ({source_line(node)})" if source_line(node) else ""
            return f"{sites[node.name]}'s mask lost at {node.name}{line}{_written(seen, gm)}"
        if node.op == "placeholder":
            sources.append("model input")
        elif node.op == "get_attr":
            sources.append("a parameter or buffer")
        else:
            inputs = [n for n in node.all_input_nodes if _has_spec(n)]
            unmasked = [n for n in inputs if not _masked(flow, n)]
            if inputs and not unmasked:  # every input has masks, the output none: lost here
                module = gm.get_submodule(node.target) if node.op == "call_module" else None
                return f"masks lost at {_where(node, op_name(node, module))}{_written(seen, gm)}"
            sources += [] if inputs else ["a tensor made in forward"]
            queue += unmasked  # (a masked operand joined with an unmasked one: the cause is upstream of the latter)
    return f"{MADE_FROM} the {' and '.join(dict.fromkeys(sources)) or 'model input'}"


def _written(walked: dict[fx.Node, None], gm: fx.GraphModule) -> str:
    """`, written in place by relu_1`: the nearest node on the walk that writes its input in place."""
    from .inplace import writes_in_place

    writer = next((n.name for n in walked if writes_in_place(n, gm)), None)
    return f", written in place by {writer}" if writer else ""


def _masked(flow: Flow, node: fx.Node) -> bool:
    masks = flow.maps.get(node.name)
    return isinstance(masks, UnitMap) and not masks.is_ones


def _where(node: fx.Node, op: str) -> str:
    """`erfcx (model.py:12)`, or `ReLU at act1 (model.py:9)` where the node is not named after its op."""
    line = source_line(node)
    return f"{op if op == node.name else f'{op} at {node.name}'}{f' ({line})' if line else ''}"


def _has_spec(node: fx.Node) -> bool:
    return isinstance(node.meta.get("hat_spec"), TensorSpec)


def _input_units(producer: Producer, weight: torch.Tensor) -> int | None:
    if producer.kind == "linear":  # (out, in), or stacked over experts (experts, out, in)
        return weight.shape[-1]
    if producer.kind == "linear_t":
        return weight.shape[-2]
    if producer.kind == "conv":
        return weight.shape[1] * producer.groups
    if producer.kind == "conv_transpose":
        return weight.shape[0]
    if any(site.tied for site in producer.sites):  # an embedding read as its tied LM head: (tokens, hidden)
        return weight.shape[1]
    return None


def input_sites(layer: LayerPlan | Producer) -> list:
    """The calls whose data input carries the layer's input units: all of them, except an embedding's own calls
    (token ids) next to its tied LM head's reads (`flow.ties`)."""
    return [site for site in layer.sites if site.tied] if layer.kind == "embedding" else layer.sites


def make_plan(capture: Capture, flow: Flow, num_tasks: int, config: HATConfig) -> Plan:
    gm = capture.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    ones_index = flow.total_units
    layers = []
    for p in flow.producers:
        if p.kept:
            continue
        weight = gm.get_parameter(p.weight)
        layer = LayerPlan(p.name, p.op, p.kind, "head" if p.head else "masked", p.units, p.offset, p.weight,
                          p.bias, p.groups, p.sites, _input_units(p, weight),
                          weight.numel() + (gm.get_parameter(p.bias).numel() if p.bias else 0),
                          rule=f"{p.kind}{'/module' if p.module else '/functional'}",
                          frozen=[q for q in (p.weight, p.bias) if q and not gm.get_parameter(q).requires_grad])
        if p.head:
            layer.status, layer.reason = "head", "reaches a task output: one copy per task"
        elif layer.input_units is not None:
            rows = []
            in_axis = -1 if p.in_axis is None else p.in_axis  # a tied LM head reads hidden units on the last axis
            for site in input_sites(p):
                unit_map = flow.maps.get(site.input_node) if site.input_node else None
                spec = nodes[site.input_node].meta.get("hat_spec") if site.input_node else None
                if not isinstance(unit_map, UnitMap) or not isinstance(spec, TensorSpec):
                    unit_map, spec = UnitMap.ones(), None
                ndim = spec.ndim if spec is not None else 2
                rows.append(per_unit(unit_map, in_axis % ndim, layer.input_units, ndim, config.max_union_terms))
            index = torch.cat(rows).unique(dim=0)
            index = index.masked_fill((index == ONES).any(0), ONES).unique(dim=0)
            if p.weight_transformed:
                index = torch.full((1, layer.input_units), ONES, dtype=torch.long)
                layer.reason = "weight transformed before use: protected by output unit only"
            layer.input_index = index
            layer.input_producers, layer.input_map = _describe(index, flow.producers)
            if not layer.input_producers and not layer.reason:
                layer.reason = unmasked_input_reason(gm, flow, [s.input_node for s in input_sites(p)])
        layers.append(layer)

    gates = {}
    for layer in layers:
        for site in layer.sites:
            if site.apply_after is not None:
                spec = nodes[site.apply_after].meta["hat_spec"]
                gates[site.apply_after] = stacked_index(
                    UnitMap.units(layer.offset, layer.units, spec.ndim, flow_axis(layer, spec)), ones_index)
    remask = {name: stacked_index(m, ones_index) for name, m in flow.remask.items() if name not in gates}
    kept = {p.name: p for p in flow.producers if p.kept and p.module}
    modules, params = _other_parameters(gm, layers, kept, capture, config)
    frozen = [name for name, value in gm.named_parameters() if not value.requires_grad]
    return Plan(num_tasks, config, layers, modules, params, gates, remask, flow.unknown, dict(capture.opaque),
                list(capture.mode_leaves), flow.total_units, len(gm.graph.nodes), list(capture.specialized), frozen,
                dict(capture.renamed))


def flow_axis(layer: LayerPlan, spec: TensorSpec) -> int:
    return (-1 if layer.kind in ("linear", "linear_t", "embedding") else 1) % spec.ndim


def _other_parameters(gm: fx.GraphModule, layers: list[LayerPlan], kept: dict[str, Producer], capture: Capture,
                      config: HATConfig) -> tuple[list[ModulePlan], list[ParamPlan]]:
    """Policies for every parameter not owned by a masked HAT layer (`kept`: layers left out of HAT)."""
    from .rules import NORM_MODULES

    layer_by_name = {layer.name: layer for layer in layers}
    protected = {layer.weight for layer in layers if layer.role == "masked"} | \
                {layer.bias for layer in layers if layer.role == "masked" and layer.bias}
    head_params = {p for layer in layers if layer.role == "head" and not _is_module_layer(layer, gm)
                   for p in (layer.weight, layer.bias) if p}
    modules: list[ModulePlan] = []
    seen_modules = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen_modules:
            continue
        module = gm.get_submodule(node.target)
        count = sum(p.numel() for p in module.parameters())
        layer = layer_by_name.get(node.target)
        if layer is not None and layer.role == "masked":
            continue
        seen_modules.add(node.target)
        op, values = type(module).__name__, list(module.parameters())
        if node.target in kept:
            producer = kept[node.target]
            modules.append(ModulePlan(node.target, op, producer.kept, producer.kept_reason, count))
        elif layer is not None:
            modules.append(ModulePlan(node.target, op, "head", layer.reason, count))
        elif type(module) in NORM_MODULES and count + _buffers(module):
            # Running statistics move in train mode even when the affine parameters are frozen: one copy per task.
            policy, reason = _policy(node.target, values, config, "task_indexed",
                                     "normalisation: affine and statistics per task")
            if _buffers(module) and policy == "frozen":
                policy, reason = "statistics_per_task", f"{reason}; its running statistics get one copy per task"
            modules.append(ModulePlan(node.target, op, policy, reason, count))
        elif getattr(module, "held_per_task", False):
            # whatever the selection: a norm shared by tasks would move the rows finished tasks use
            modules.append(ModulePlan(node.target, op, config.loose_params,
                                      "weight norm across rows: its value held per task at end_task", 0))
        elif count:
            why = capture.opaque.get(node.target, "leaf module with parameters hatify has no rule for")
            modules.append(ModulePlan(node.target, op, *_policy(node.target, values, config, config.loose_params,
                                                                f"opaque: {why}"), count))
        elif _buffers(module) and type(module) not in NORM_MODULES:
            # A leaf that holds state may update it in training (its own running mean): never shared by tasks.
            modules.append(ModulePlan(node.target, op, config.loose_params,
                                      "leaf module with buffers it may update: state per task", 0))
    params: list[ParamPlan] = []
    seen_params = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in protected or node.target in seen_params:
            continue
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            continue
        seen_params.add(node.target)
        if node.target in head_params:
            params.append(ParamPlan(node.target, tuple(value.shape), "head", "parameter of a per-task head"))
        else:
            params.append(ParamPlan(node.target, tuple(value.shape), *_policy(
                node.target, [value], config, config.loose_params, "parameter used outside any HAT layer")))
    return modules, params


def _policy(name: str, values: list[torch.Tensor], config: HATConfig, default: str, reason: str) -> tuple[str, str]:
    """The policy of a module or parameter outside the HAT layers: kept as it is when frozen at conversion, the
    `unselected` policy outside `include`/`exclude`, else `default`."""
    if values and not any(v.requires_grad for v in values):
        opaque = f"{reason}; " if reason.startswith("opaque") else ""
        return "frozen", f"{opaque}requires_grad=False at conversion: kept as it is"
    if not config.selects(name):
        return config.unselected, f"{reason}; outside HATConfig.include/exclude"
    return default, reason


def _buffers(module: nn.Module) -> int:
    return sum(b.numel() for b in module.buffers())


def _is_module_layer(layer: LayerPlan, gm: fx.GraphModule) -> bool:
    return any(n.op == "call_module" and n.target == layer.name for n in gm.graph.nodes)
