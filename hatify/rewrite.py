"""Stage 5, rewrite: turn the captured graph into the HAT graph the plan describes."""
from __future__ import annotations

import collections
import operator

from torch import fx, nn
from torch.nn.utils import parametrize

from .capture import Capture
from .layers import FoldedGate, Gate, MaskBank, Protect, TaskIndexed, TaskParameter, fold_site, read_through_protect
from .nested import BOUND, Bound, call_opaque
from .pending import _storage
from .plan import LayerPlan, Plan
from .shapes import TensorSpec

TASK_ARG, SCALE_ARG = "hat_task_id", "hat_mask_scale"
MASK_BANK = "hat_masks"  # the module that gives the mask vector


ROOT_HOLDER = "hat_root_params"
# Policies of modules and parameters left as they are (no per-task copy): see HATConfig.unselected.
KEPT = ("frozen", "shared")


def _owner(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """The module holding a parameter and its attribute name; parameters of the root live in a holder
    submodule once protected (a parametrization cannot be put on the GraphModule itself)."""
    path, _, name = qualname.rpartition(".")
    if not path and ROOT_HOLDER in gm._modules and name in gm._modules[ROOT_HOLDER]._parameters.keys() | set(
            getattr(gm._modules[ROOT_HOLDER], "parametrizations", {})):
        return gm._modules[ROOT_HOLDER], name
    return (gm.get_submodule(path) if path else gm), name


def _move_root_parameter(gm: fx.GraphModule, name: str) -> None:
    """Move a root parameter into the holder submodule and point the graph's reads at it."""
    if ROOT_HOLDER not in gm._modules:
        gm.add_module(ROOT_HOLDER, nn.Module())
    gm._modules[ROOT_HOLDER].register_parameter(name, gm._parameters.pop(name))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            node.target = f"{ROOT_HOLDER}.{name}"


def _protect_shape(layer: LayerPlan, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a layer's protection mask; it broadcasts over kernel positions."""
    if layer.kind == "embedding":
        return (1, weight_shape[1])
    if layer.kind in ("linear", "linear_t"):  # a stacked weight's experts share the protection of their units
        return (1,) * (len(weight_shape) - 2) + tuple(weight_shape[-2:])
    return tuple(weight_shape[:2]) + (1,) * (len(weight_shape) - 2)


def rewrite(capture: Capture, plan: Plan, nested: bool = False) -> fx.GraphModule:
    """Insert the mask bank, gates, per-task copies and weight protection into the captured graph. A `nested`
    subgraph (`hatify.nested`) has no bank: it reads the task id and the mask vector of the model's call."""
    gm, graph, cfg = capture.graph_module, capture.graph_module.graph, plan.config
    nodes = {n.name: n for n in graph.nodes}
    task, masks = _nested_inputs(gm) if nested else _mask_bank(gm, plan)
    for part in plan.nested.values():
        owner, attr = _owner(gm, part.path)
        owner.add_module(attr, rewrite(part.capture, part.plan, nested=True))
    gates = nn.ModuleDict()
    gm.add_module("hat_gates", gates)
    gated_nodes = {}
    for name, index in list(plan.gates.items()) + list(plan.remask.items()):
        node = nodes[name]
        gates[name] = Gate(index)
        with graph.inserting_after(node):
            gated = gated_nodes[name] = graph.call_module(f"hat_gates.{name}", (node, masks))
        gated.meta["hat_spec"] = node.meta.get("hat_spec")
        node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)

    storages = collections.Counter(_storage(p) for _, p in gm.named_parameters(remove_duplicate=False))
    for module_plan in plan.modules:
        if plan.is_nested(module_plan.name):
            continue
        owner, attr = _owner(gm, module_plan.name)
        original = owner.get_submodule(attr)
        if module_plan.policy in KEPT:  # left as it is; "frozen" ones never train
            if module_plan.policy == "frozen":
                original.requires_grad_(False)
            continue
        if module_plan.policy == "statistics_per_task":
            original.requires_grad_(False)
        own = collections.Counter(_storage(p) for _, p in original.named_parameters(remove_duplicate=False))
        # nothing else holds the module or its parameters' storage: its copies may share it instead of a clone
        exclusive = sum(m is original for _, m in gm.named_modules(remove_duplicate=False)) == 1 \
            and 0 not in own and all(storages[address] == count for address, count in own.items())
        owner.add_module(attr, TaskIndexed(original, plan.num_tasks, shared=module_plan.policy == "freeze",
                                           exclusive=exclusive))
        for node in graph.nodes:
            if node.op == "call_module" and node.target == module_plan.name:
                node.kwargs = {**node.kwargs, TASK_ARG: task}

    for param_plan in plan.params:
        if plan.is_nested(param_plan.name):
            continue
        owner, attr = _owner(gm, param_plan.name)
        if param_plan.policy in KEPT:
            if param_plan.policy == "frozen":
                owner._parameters[attr].requires_grad_(False)
            continue
        value = owner._parameters.pop(attr)
        owner.add_module(attr, TaskParameter(value, plan.num_tasks, shared=param_plan.policy == "freeze"))
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target == param_plan.name:
                with graph.inserting_after(node):
                    call = graph.call_module(param_plan.name, (), {TASK_ARG: task})
                call.meta["hat_spec"] = node.meta.get("hat_spec")
                node.replace_all_uses_with(call)
                graph.erase_node(node)

    for name, gated in gated_nodes.items():
        _fold_gate(gm, nodes[name], gated)

    for layer in plan.masked_layers:
        if plan.is_nested(layer.name):
            continue
        for qualname in layer.protected:
            if "." not in qualname:
                _move_root_parameter(gm, qualname)
            owner, attr = _owner(gm, qualname)
            weight = getattr(owner, attr)
            shape = _protect_shape(layer, tuple(weight.shape)) if qualname == layer.weight else tuple(weight.shape)
            parametrize.register_parametrization(owner, attr, Protect(weight, shape), unsafe=True)
            read_through_protect(owner, attr)

    _call_opaque(gm, {part.opaque for part in plan.nested.values()}, task, masks)
    graph.lint()
    gm.recompile()
    return gm


def _last_input(graph: fx.Graph) -> fx.Node:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return placeholders[-1] if placeholders else next(iter(graph.nodes))


def _mask_bank(gm: fx.GraphModule, plan: Plan) -> tuple[fx.Node, fx.Node]:
    """The task id and mask scale inputs, and the mask bank's mask vector for them."""
    graph, cfg = gm.graph, plan.config
    with graph.inserting_after(_last_input(graph)):
        task = graph.placeholder(TASK_ARG, default_value=0)
    with graph.inserting_after(task):
        scale = graph.placeholder(SCALE_ARG, default_value=None)
    spans = [(layer.offset, layer.offset + layer.units) for layer in plan.masked_layers]
    gm.add_module(MASK_BANK, MaskBank(plan.num_tasks, plan.total_units, cfg.init, cfg.dense_value, cfg.s_max,
                                        cfg.clamp, cfg.seed, spans))
    with graph.inserting_after(scale):
        masks = graph.call_module(MASK_BANK, (task, scale))
    return task, masks


def _nested_inputs(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node]:
    """A nested subgraph's task id and mask vector: those of the model's call, which `call_opaque` binds."""
    graph = gm.graph
    gm.add_module(BOUND, Bound())
    with graph.inserting_after(_last_input(graph)):
        bound = graph.call_module(BOUND, ())
    with graph.inserting_after(bound):
        task = graph.call_function(operator.getitem, (bound, 0))
    with graph.inserting_after(task):
        masks = graph.call_function(operator.getitem, (bound, 1))
    return task, masks


def _call_opaque(gm: fx.GraphModule, opaque: set[str], task: fx.Node, masks: fx.Node) -> None:
    """Each call of an opaque module with nested subgraphs goes through `call_opaque`, which binds them."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target in opaque]:
        with graph.inserting_before(node):
            module = graph.get_attr(node.target)
            call = graph.call_function(call_opaque, (module, masks, task, *node.args), dict(node.kwargs))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def _fold_gate(gm: fx.GraphModule, node: fx.Node, gated: fx.Node) -> None:
    """Fold the gate `gated` into the module call `node` it follows when that module is a linear layer or a norm
    (per task or not) and the gate scales exactly its output units: the node then calls a `FoldedGate` (it keeps
    its name, which the plan's call sites refer to) and the separate gate node goes."""
    gate = gm.get_submodule(gated.target)
    spec = node.meta.get("hat_spec")
    if node.op != "call_module" or list(node.users) != [gated] or len(node.args) != 1 or gate.span is None \
            or set(node.kwargs) - {TASK_ARG} or not isinstance(spec, TensorSpec):
        return
    target = gm.get_submodule(node.target)
    site = fold_site(target.copies[0] if isinstance(target, TaskIndexed) else target)
    if site is None or site[1] != gate.index.numel() or not spec.ndim:
        return
    axis, units = site
    where = axis % spec.ndim - (spec.ndim - gate.index.ndim)
    if where < 0 or gate.index.shape[where] != units:
        return
    name = gated.target.rpartition(".")[2]
    gm.hat_gates[name] = FoldedGate(gate.index[None], target, node.target)
    node.target, node.args = gated.target, (node.args[0], gated.args[1])
    gated.replace_all_uses_with(node)
    gm.graph.erase_node(gated)
