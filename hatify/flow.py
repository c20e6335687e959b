"""Stage 3, mask flow: find the HAT producers, decide where each mask is applied and which masks
cover every tensor of the graph (as unit maps), following the rule registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .config import HATConfig
from .errors import node_location, source_line
from .inplace import aliased_writes, writes_input
from . import maps
from .maps import UnitMap
from .outputs import task_output_nodes
from .parametrized import layer_name
from .ownership import ancestors, inline_shared_layers, keeps_rows, live_nodes, outside_reads
from .rules import PER_CHANNEL_MODULES, RuleContext, _canon, fallback_rule, rule_for
from .shapes import TensorSpec

# Producer kinds: weight layout, output channel axis, input channel axis (None: the input is indices).
_MODULE_PRODUCERS: dict[type, tuple[str, int, int | None]] = {
    nn.Linear: ("linear", -1, -1),
    nn.Conv1d: ("conv", 1, 1), nn.Conv2d: ("conv", 1, 1), nn.Conv3d: ("conv", 1, 1),
    nn.ConvTranspose1d: ("conv_transpose", 1, 1), nn.ConvTranspose2d: ("conv_transpose", 1, 1),
    nn.ConvTranspose3d: ("conv_transpose", 1, 1),
    nn.Embedding: ("embedding", -1, None),
}
PRODUCER_MODULES = frozenset(_MODULE_PRODUCERS)
# Functional producers: kind, axes, and the argument positions of weight, bias and groups. "linear_t" is a
# linear layer whose weight is stored (in, out): `torch.addmm(bias, x, weight)` (GPT-2's Conv1D).
_FUNCTION_PRODUCERS: dict[str, tuple[str, int, int | None, int, int | None, int | None]] = {
    "addmm": ("linear_t", -1, -1, 2, 0, None),
    "linear": ("linear", -1, -1, 1, 2, None),
    "conv1d": ("conv", 1, 1, 1, 2, 6), "conv2d": ("conv", 1, 1, 1, 2, 6), "conv3d": ("conv", 1, 1, 1, 2, 6),
    "conv_transpose1d": ("conv_transpose", 1, 1, 1, 2, 6), "conv_transpose2d": ("conv_transpose", 1, 1, 1, 2, 6),
    "conv_transpose3d": ("conv_transpose", 1, 1, 1, 2, 6),
    "embedding": ("embedding", -1, None, 1, None, None),
}


@dataclass
class CallSite:
    node: str                 # the producer node
    apply_after: str | None   # the node whose output the mask multiplies (None for heads)
    input_node: str | None    # the node feeding the producer's input channels
    line: str = ""
    # A read of an embedding's weight as a linear layer (a tied LM head, `ties`): its outputs are the embedding's
    # rows (tokens), its input units the embedding's units (hidden); no mask, a task output.
    tied: bool = False


@dataclass
class Producer:
    """A unit-producing layer: a module (possibly called several times) or a functional call on a parameter."""

    name: str
    op: str
    kind: str                          # linear | linear_t | conv | conv_transpose | embedding
    units: int
    out_axis: int
    in_axis: int | None
    weight: str                        # qualified parameter name
    bias: str | None
    groups: int = 1
    module: bool = True                # called as a module (False: functional on a parameter)
    weight_transformed: bool = False   # weight passes through ops before use (weight standardisation ...)
    head: bool = False
    # Not a HAT layer (no mask, no protection): its policy ("frozen", "per_task", "shared") and why.
    kept: str | None = None
    kept_reason: str = ""
    weight_shared: bool = False        # the weight is read by calls of different kinds (tied embeddings)
    offset: int | None = None
    sites: list[CallSite] = field(default_factory=list)


@dataclass
class UnknownOp:
    node: str
    op: str
    reason: str
    line: str


@dataclass
class Flow:
    producers: list[Producer]
    maps: dict[str, Any]               # node name -> UnitMap (or nested tuple of them / None)
    remask: dict[str, UnitMap]         # node name -> map re-applied after that node
    unknown: list[UnknownOp]
    total_units: int


def _param_root(node: Any, gm: fx.GraphModule) -> tuple[str | None, bool]:
    """The single parameter a weight argument comes from, and whether ops transform it on the way."""
    if not isinstance(node, fx.Node):
        return None, False
    if node.op == "get_attr":
        try:
            gm.get_parameter(node.target)
        except AttributeError:
            return None, False
        return node.target, False
    seen, params, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None, False
        if n.op == "get_attr":
            try:
                gm.get_parameter(n.target)
                params.add(n.target)
            except AttributeError:
                pass
        stack.extend(n.all_input_nodes)
    if len(params) > 1:  # weight standardisation with a gain: the weight is the parameter of the same shape
        spec = node.meta.get("hat_spec")
        params = {p for p in params if isinstance(spec, TensorSpec) and tuple(gm.get_parameter(p).shape) == spec.shape}
    return (params.pop(), True) if len(params) == 1 else (None, False)


def _producer_of(node: fx.Node, gm: fx.GraphModule) -> Producer | None:
    spec = node.meta.get("hat_spec")
    if not isinstance(spec, TensorSpec):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        entry = _MODULE_PRODUCERS.get(type(module))
        # max_norm renormalises whole rows in place on every forward: protected and free columns move together.
        if entry is None or getattr(module, "max_norm", None) is not None:
            return None
        kind, out_axis, in_axis = entry
        return Producer(node.target, type(module).__name__, kind, spec.shape[out_axis], out_axis, in_axis,
                        f"{node.target}.weight", f"{node.target}.bias" if getattr(module, "bias", None) is not None
                        else None, getattr(module, "groups", 1))
    if node.op not in ("call_function", "call_method"):
        return None
    if _canon(node.target) in _MATMULS:
        return _matmul_producer(node, gm, spec)
    if node.op != "call_function":
        return None
    entry = _FUNCTION_PRODUCERS.get(_canon(node.target))
    if entry is None:
        return None
    kind, out_axis, in_axis, w_pos, b_pos, g_pos = entry
    arg = lambda i, name: node.args[i] if i is not None and i < len(node.args) else node.kwargs.get(name)
    weight, transformed = _param_root(arg(w_pos, "weight"), gm)
    if weight is None or (kind == "embedding" and arg(3, "max_norm") is not None):
        return None
    bias_node = arg(b_pos, "bias")
    bias = bias_node.target if isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" else None
    groups = arg(g_pos, "groups") or 1
    return Producer(layer_name(weight), f"F.{_canon(node.target)}", kind, spec.shape[out_axis], out_axis, in_axis,
                    weight, bias, groups if isinstance(groups, int) else 1, module=False,
                    weight_transformed=transformed)


# `x @ W`, `torch.bmm(x, W)`, and a grouped matmul over experts (`torch._grouped_mm(x, W.mT, offs=...)`, Mixtral's
# stacked expert weights (E, out, in)): the weight's leading axes index experts, which share the layer's units.
_MATMULS = ("matmul", "bmm", *([torch._grouped_mm] if hasattr(torch, "_grouped_mm") else []))
# Transposes of a stacked weight's last two axes only.
_LAST_TWO = {("getattr", "mT"), ("transpose", -1, -2), ("transpose", -2, -1)}
_TRANSPOSES = {("getattr", "T"), ("getattr", "mT"), ("t",), ("transpose", 0, 1), ("transpose", -1, -2),
               ("transpose", 1, 0), ("transpose", -2, -1), ("permute", 1, 0)}


def _matmul_producer(node: fx.Node, gm: fx.GraphModule, spec: TensorSpec) -> Producer | None:
    """`x @ W.T` (a linear layer written out, Falcon's FalconLinear) or `x @ W` (weight stored (in, out)) on a
    parameter W, 2-D or stacked (experts, ..., out, in); a following `+ b` on a parameter of the output's size is
    its bias."""
    if len(node.args) != 2 or not isinstance(node.args[1], fx.Node) or node.kwargs.get("bias") is not None:
        return None
    weight, kind, transpose = node.args[1], "linear_t", None
    if weight.op in ("call_function", "call_method") and isinstance(weight.args[0], fx.Node) and \
            ("getattr" if weight.target is getattr else _canon(weight.target), *weight.args[1:]) in _TRANSPOSES:
        transpose = ("getattr" if weight.target is getattr else _canon(weight.target), *weight.args[1:])
        weight, kind = weight.args[0], "linear"
    name = weight.target if weight.op == "get_attr" else None
    try:
        param = gm.get_parameter(name) if name else None
    except AttributeError:
        param = None
    if param is None or param.ndim < 2 or not spec.ndim or (param.ndim > 2 and transpose not in (None, *_LAST_TWO)):
        return None
    bias = None
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.op in ("call_function", "call_method") and _canon(user.target) == "add":
            other = [a for a in user.args if a is not node]
            if len(other) == 1 and isinstance(other[0], fx.Node) and other[0].op == "get_attr":
                try:
                    candidate = gm.get_parameter(other[0].target)
                except AttributeError:
                    candidate = None
                if candidate is not None and tuple(candidate.shape) == (spec.shape[-1],):
                    bias = other[0].target
    op = getattr(node.target, "__name__", str(node.target))
    return Producer(layer_name(name), op, kind, spec.shape[-1], -1, -1, name, bias, module=False)


def producer_input(node: fx.Node) -> Any:
    """The data argument of a producer call (`addmm` takes its bias first)."""
    if node.op == "call_function" and _canon(node.target) == "addmm":
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("mat1")
    return node.args[0] if node.args else node.kwargs.get("input")


def _chain_end(node: fx.Node, gm: fx.GraphModule, params: set[str]) -> fx.Node:
    """Walk past trailing per-channel affine ops (BatchNorm, a bias add) that only this producer feeds,
    so the mask lands where a masked unit is exactly zero for every later reader."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and type(gm.get_submodule(user.target)) in PER_CHANNEL_MODULES \
                and user.args[0] is node:
            node = user
        elif user.op in ("call_function", "call_method") and _canon(user.target) in ("add", "sub") \
                and any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target in params for a in user.args) \
                and isinstance(user.meta.get("hat_spec"), TensorSpec) \
                and user.meta["hat_spec"].shape == node.meta["hat_spec"].shape:
            node = user
        else:
            break
    return node


def _reaches_output(start: fx.Node, producer_nodes: set[fx.Node], task_outputs: set[fx.Node]) -> bool:
    """Whether `start` flows into a task output without passing another HAT layer."""
    stack, seen = [start], {start}
    while stack:
        n = stack.pop()
        if n in task_outputs:
            return True
        for user in n.users:
            if user not in producer_nodes and user not in seen and user.op != "output":
                seen.add(user)
                stack.append(user)
    return False


def _weight_args(node: fx.Node, producer: Producer) -> list[fx.Node]:
    """The graph nodes a functional producer call takes its weight and bias from."""
    if producer.module:
        return []
    if _canon(node.target) in _MATMULS:  # `x @ W` or `x @ W.T`, then `+ b` (see `_matmul_producer`)
        bias = [a for u in node.users for a in u.args
                if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == producer.bias]
        return [node.args[1], *bias[:1]]
    _, _, _, w_pos, b_pos, _ = _FUNCTION_PRODUCERS[_canon(node.target)]
    found = [node.args[i] if i is not None and i < len(node.args) else node.kwargs.get(name)
             for i, name in ((w_pos, "weight"), (b_pos, "bias"))]
    return [a for a in found if isinstance(a, fx.Node)]


def _disown(gm: fx.GraphModule, by_name: dict[str, Producer], node_of: dict[fx.Node, Producer]) -> list[UnknownOp]:
    """Drop the layers whose weight is read outside the layer or transformed across rows (see `ownership`)."""
    dropped, live = [], live_nodes(gm)
    for producer in list(by_name.values()):
        sites = [n for n, p in node_of.items() if p is producer]
        # the weight's chain, and the bias's where the layer owns its bias (a bias it does not own is per task)
        args = [a for site in sites for a in _weight_args(site, producer)[: 2 if producer.bias else 1]]
        reason = ""
        mixing = [site for site in sites if producer.weight_transformed
                  and not keeps_rows(_weight_args(site, producer)[0], producer.weight, gm)]
        if mixing:
            reason = f"weight transformed across rows before use{_modules_on(_weight_args(mixing[0], producer)[0], gm)}" \
                     " (not provably row-local)"
        # `x @ W + b`: the add applies the layer's bias, so it is the layer's own read of it
        calls = sites + [u for site in sites if producer.bias and _canon(site.target) in _MATMULS for u in site.users]
        bad = outside_reads(gm, [p for p in (producer.weight, producer.bias) if p], calls, args, live)
        if bad:
            reason = f"weight also read outside the layer at {node_location(bad[0])}"
        elif producer.weight_shared:
            reason = f"weight read as two kinds of layer (tied), at {sites[0].name} and {sites[-1].name}"
        if reason:
            del by_name[producer.name]
            for site in sites:
                del node_of[site]
            dropped.append(UnknownOp(sites[0].name, producer.op, f"not a HAT layer: {reason}; its parameters "
                                     "follow the loose-parameter policy", source_line(sites[0])))
    return dropped


def _modules_on(weight: fx.Node, gm: fx.GraphModule) -> str:
    """` by _SpectralNorm at conv.parametrizations_weight_0`: the modules the weight's chain calls (a parametrization
    kept a module), which are what the report can name."""
    calls = [n for n in ancestors(weight) if n.op == "call_module"]
    return f" by {', '.join(f'{op_name(n, gm.get_submodule(n.target))} at {n.target}' for n in calls)}" if calls else ""


def find_producers(gm: fx.GraphModule, config: HATConfig) -> list[Producer]:
    """Every HAT layer with its call sites, mask placement and head role; offsets into the unit vector.
    Layers that do not own their weight are left out and listed in `gm.meta["hat_disowned"]`."""
    inline_shared_layers(gm)
    params = {name for name, _ in gm.named_parameters()}
    by_name: dict[str, Producer] = {}
    node_of: dict[fx.Node, Producer] = {}
    tied: set[fx.Node] = set()
    for node in gm.graph.nodes:
        found = _producer_of(node, gm)
        if found is None:
            continue
        producer = by_name.setdefault(found.name, found)
        if ties(producer, found, gm):
            tied.add(node)
        elif ties(found, producer, gm):  # the head read first: the embedding is the layer
            tied.update(n for n, p in node_of.items() if p is producer)
            by_name[found.name] = found
            node_of.update({n: found for n, p in node_of.items() if p is producer})
            producer = found
        elif (found.kind, found.units) != (producer.kind, producer.units):  # one weight, read as two kinds of layer
            producer.weight_shared = True
        node_of[node] = producer
    gm.meta["hat_disowned"] = _disown(gm, by_name, node_of)
    targets = task_output_nodes(gm, config) if config.heads == "auto" else set()
    for node, producer in node_of.items():
        end = node if node in tied else _chain_end(node, gm, params)
        data = producer_input(node)
        producer.sites.append(CallSite(node.name, None if node in tied else end.name,
                                       data.name if isinstance(data, fx.Node) else None, source_line(node),
                                       tied=node in tied))
        if config.heads == "auto" and node not in tied and _reaches_output(end, set(node_of), targets):
            producer.head = True
    if isinstance(config.heads, (tuple, list)):
        for producer in by_name.values():
            producer.head = producer.name in config.heads
    for producer in by_name.values():
        _select(producer, gm, config)
    offset = 0
    for producer in by_name.values():
        if producer.head or producer.kept:
            for site in producer.sites:
                site.apply_after = None
            continue
        producer.offset = offset
        offset += producer.units
    return list(by_name.values())


def ties(embedding: Producer, head: Producer, gm: fx.GraphModule) -> bool:
    """Whether `head` reads `embedding`'s weight as a linear layer over the same axes, tied embedding and LM head
    (GPT-2, BERT's MLM, T5, mBART): one HAT layer whose units are the embedding's (hidden, the weight's columns),
    masked where the embedding is called. The head's outputs (the weight's rows, tokens) are a task output every
    task reads, so a finished task's hidden columns are frozen for every row: those its embedding units used and
    those the head's input used (`model.weight_protection`); the head's bias, if any, is per task."""
    weight = gm.get_parameter(embedding.weight)
    return (embedding.kind, head.kind) == ("embedding", "linear") and embedding.weight == head.weight \
        and not head.weight_transformed and weight.ndim == 2 and head.units == weight.shape[0] \
        and embedding.units == weight.shape[1]


def _select(producer: Producer, gm: fx.GraphModule, config: HATConfig) -> None:
    """Keep a layer out of HAT (`producer.kept`) when all its parameters are frozen (`frozen_layers="keep"`, or
    a head: a per-task copy of a tensor that cannot change is useless) or when `include`/`exclude` leave it out
    (heads follow `heads` only)."""
    frozen = not any(gm.get_parameter(p).requires_grad for p in (producer.weight, producer.bias) if p)
    if frozen and (producer.head or config.frozen_layers == "keep"):
        producer.kept, producer.kept_reason = "frozen", "requires_grad=False at conversion: kept as it is"
    elif not producer.head and not config.selects(producer.name):
        producer.kept, producer.kept_reason = config.unselected, "outside HATConfig.include/exclude"
    if producer.kept:
        producer.head = False
        for site in producer.sites:
            site.apply_after = None


def analyse(gm: fx.GraphModule, producers: list[Producer], config: HATConfig) -> Flow:
    """Propagate unit maps through the graph in topological order.

    A node where a mask is applied starts a fresh map (the mask zeroes it whatever came before); every
    other node gets its map from the rule of its op.
    """
    mask_at: dict[str, UnitMap] = {}
    spec_by_name = {node.name: node.meta.get("hat_spec") for node in gm.graph.nodes}
    for p in producers:
        if p.head or p.kept:
            continue
        for site in p.sites:
            if site.apply_after is None:  # a tied LM head's read: no mask (`ties`)
                continue
            spec = spec_by_name[site.apply_after]
            mask_at[site.apply_after] = UnitMap.units(p.offset, p.units, spec.ndim, p.out_axis % spec.ndim)
    producer_nodes = {site.node for p in producers for site in p.sites}
    # A view taken before an in-place write into its storage and read after it: unknown. A written tensor and its
    # aliases of one layout: the union of what they held and what was written (`merge_into`).
    written, merge_into = aliased_writes(gm)
    group_of = {n: members for members in merge_into.values() for n in members}
    flows: dict[fx.Node, Any] = {}
    remask: dict[str, UnitMap] = {}
    unknown: list[UnknownOp] = list(gm.meta.get("hat_disowned", []))
    memo: dict = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        flows[node] = _node_flow(node, module, mask_at, producer_nodes, written, flows, remask,
                                 unknown, config, memo)
        if node in group_of and writes_input(node, module):
            _merge_write(flows, group_of[node], flows[node], config.max_union_terms)
    return Flow(producers, {n.name: f for n, f in flows.items()}, remask, unknown,
                sum(p.units for p in producers if not (p.head or p.kept)))


def _node_flow(node: fx.Node, module: nn.Module | None, mask_at: dict[str, UnitMap], producers: set[str],
               written: dict[fx.Node, fx.Node], flows: dict, remask: dict[str, UnitMap], unknown: list[UnknownOp],
               config: HATConfig, memo: dict) -> Any:
    """The map of one node: a mask applied there, ones where nothing is known, else its op's rule."""
    spec = node.meta.get("hat_spec")
    if node.name in mask_at and node not in written:
        return mask_at[node.name]
    if node in written and isinstance(spec, TensorSpec):
        # a stale view: report it where it loses a map it would have had
        would_be = None if node.op in ("placeholder", "get_attr", "output") or node.name in producers else \
            _node_flow(node, module, mask_at, producers, {}, flows, {}, [], config, memo)
        if isinstance(would_be, UnitMap) and not would_be.is_ones:
            write = written[node]
            unknown.append(UnknownOp(node.name, op_name(node, module), f"storage written in place by '{write.name}' "
                                     f"({source_line(write) or '?'}) while this view of it is read later: output "
                                     "treated as all ones", source_line(node)))
        return UnitMap.ones()
    if node.op in ("placeholder", "get_attr", "output") or node.name in producers or node in written:
        return UnitMap.ones() if isinstance(spec, TensorSpec) else None
    if not _has_tensor(spec):
        return None
    rule = rule_for(node, module)
    ctx = RuleContext(node, flows, module, config.max_union_terms, memo)
    if rule is None:
        fallback = fallback_rule(node, module)
        result = fallback.fn(ctx) if fallback else UnitMap.ones()
        if ctx.tensor_inputs() and not all(ctx.map_of(n).is_ones for n in ctx.tensor_inputs()) \
                and isinstance(result, UnitMap) and result.is_ones:
            op = op_name(node, module)
            why = "zeros not kept when probed in train and eval mode" if fallback else "no mask rule"
            unknown.append(UnknownOp(node.name, op, f"{why}: output treated as all ones", source_line(node)))
        return result
    result = rule.fn(ctx)
    if rule.remask and isinstance(result, UnitMap) and not result.is_ones:
        remask[node.name] = result
    if isinstance(result, UnitMap) and result.truncated:
        unknown.append(UnknownOp(node.name, str(node.target), "too many union terms: all ones", source_line(node)))
    return result


def op_name(node: fx.Node, module: nn.Module | None) -> str:
    """The op a node runs, for reports: its module's class, else its function's or method's name."""
    return type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))


def _merge_write(flows: dict, group: list[fx.Node], written: Any, max_terms: int) -> None:
    """Every tensor of `group` (one storage, one layout) now also holds what an in-place op wrote."""
    written = written if isinstance(written, UnitMap) else UnitMap.ones()
    for member in group:
        if isinstance(flows.get(member), UnitMap):
            flows[member] = maps.union([flows[member], written], max_terms)


def _has_tensor(spec: Any) -> bool:
    if isinstance(spec, TensorSpec):
        return True
    if isinstance(spec, (tuple, list)):
        return any(_has_tensor(s) for s in spec)
    if isinstance(spec, dict):
        return any(_has_tensor(s) for s in spec.values())
    return False

