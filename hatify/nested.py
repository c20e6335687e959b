"""Graph breaks at opaque modules: the traceable submodules an opaque module's own Python calls become HAT
subgraphs sharing the model's mask bank.

A module whose forward depends on data (`range()` of a traced size, box decoding in a detector's `rpn` or
`roi_heads`) stays one opaque leaf of the model's graph. Without more, every parameter inside it is copied per
task. But such a module usually calls submodules that trace (an MLP box head, a predictor, a conv head): each of
those is converted on its own, from the inputs the opaque code gave it on the example, and put back in the
opaque module's place. Its mask units follow the model's in the one mask bank, so the task lifecycle
(protection, regulariser, capacity, forget, extract, save) covers them as any other layer:
- its inputs come from opaque code, so their input map is unknown: its first layers are protected by whole used
  rows, as for the model input;
- its outputs go back into opaque code, so they are task outputs: the layers writing them are per-task heads
  (a mask there would change what the opaque code computes, box decoding and score thresholds included);
- the outer graph calls the opaque module through `call_opaque`, which hands the task id and the mask vector to
  every nested subgraph (`Bound`) for the call's duration; a nested subgraph called outside that raises.

An opaque module is broken up only when every parameter and buffer it holds lies in a submodule converted this
way; otherwise it stays one per-task copy as before. Not supported under `torch.compile` beyond what the opaque
module's own Python allows (its data-dependent code breaks the compiled graph anyway)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn

from .errors import HatifyError
from .inputs import Inputs
from .maps import ONES
from .plan import MADE_FROM

BOUND = "hat_bound"


class Bound(nn.Module):
    """Inside a nested subgraph: the task id and the mask vector of the current call of the model, set by
    `call_opaque` for the duration of the opaque module's call. Holds no state that is saved or copied."""

    def __init__(self) -> None:
        super().__init__()
        self.value: tuple | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "value": None}

    def forward(self) -> tuple:
        if self.value is None:
            raise HatifyError("a nested HAT subgraph was called outside its model's forward: call the converted "
                              "model, hat(*inputs, task_id=t), not the opaque module inside it")
        return self.value


def call_opaque(module: nn.Module, masks: torch.Tensor, task: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the opaque `module` with its nested subgraphs bound to this call's task id and mask vector."""
    bound = [m for m in module.modules() if isinstance(m, Bound)]
    for b in bound:
        b.value = (task, masks)
    try:
        return module(*args, **kwargs)
    finally:
        for b in bound:
            b.value = None



def nested_parts(plan, prefix: str = "") -> list[tuple[str, "NestedPart"]]:
    """(full path, part) of the plan's nested subgraphs, theirs included."""
    found = []
    for path, part in plan.nested.items():
        found += [(prefix + path, part), *nested_parts(part.plan, f"{prefix}{path}.")]
    return found


def nested_paths(plan) -> list[str]:
    return [path for path, _ in nested_parts(plan)]


def positional_call(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """A call's arguments in the order of the graph's placeholders (for an `Interpreter`), defaults filled in."""
    values = list(args)
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        values.append(kwargs[node.target] if node.target in kwargs else node.args[0] if node.args else None)
    return values


@dataclasses.dataclass
class NestedPart:
    """One submodule of an opaque module converted as a HAT subgraph: its capture and plan, in its own names,
    with its mask units placed in the model's mask vector."""

    path: str            # its qualified name in the model (`roi_heads.box_head`)
    opaque: str          # the opaque module that calls it (`roi_heads`)
    capture: Any
    plan: Any


def nest(cap, plan, num_tasks: int, example_inputs: Inputs, config, plan_of) -> None:
    """Break every opaque module of `plan` whose parameters all lie in submodules that convert: those become
    nested parts (`plan.nested`), their layers, modules and parameters join the plan under their full names, and
    the mask vector grows by their units. `plan_of(module, num_tasks, inputs, config)` plans one submodule."""
    if config.include or config.exclude:  # the selection names the model's modules: kept whole, as before
        return
    gm = cap.graph_module
    candidates = {}
    for module_plan in [m for m in plan.modules if m.reason.startswith("opaque") and m.policy == "per_task"]:
        module = gm.get_submodule(module_plan.name)
        children = {key: child for key, child in module.named_children() if _holds_state(child)}
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module_plan.name]
        if children and len(calls) == 1 and not any(_holds_state_directly(module)):
            candidates[module_plan.name] = (module_plan, children)
    inputs = _child_inputs(gm, example_inputs, [c for _, children in candidates.values() for c in children.values()])
    parts: list[NestedPart] = []
    for module_plan, children in candidates.values():
        found = _nested_parts(module_plan.name, children, inputs, num_tasks, _child_config(config), plan_of)
        if found:
            plan.modules.remove(module_plan)
            parts += found
    if parts:
        _place(plan, parts)


def _child_config(config):
    """The config a nested subgraph is planned with: every output is the task's (it goes back into opaque code)."""
    return dataclasses.replace(config, heads="auto" if isinstance(config.heads, (tuple, list)) else config.heads,
                               task_outputs="auto", concrete_args=None,
                               leaf_modules=tuple(m for m in config.leaf_modules if isinstance(m, type)))


def _nested_parts(name: str, children: dict, inputs: dict, num_tasks: int, config, plan_of) -> list[NestedPart]:
    """The parts of opaque module `name` when every child holding parameters or buffers converts, else []."""
    parts = []
    for key, child in children.items():
        if child not in inputs:  # not called on the example: its inputs are not known
            return []
        try:
            child_cap, child_plan = plan_of(child, num_tasks, inputs[child], config)
        except HatifyError:
            return []
        if any("." not in q for layer in child_plan.masked_layers for q in layer.protected):
            return []  # a masked parameter of the subgraph's root would move into its own holder: not supported
        parts.append(NestedPart(f"{name}.{key}", name, child_cap, child_plan))
    # Only where some layer gets masked: heads alone are the per-task copy the whole module was
    return parts if any(part.plan.masked_layers for part in parts) else []


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _holds_state_directly(module: nn.Module):
    yield from (v is not None for v in module._parameters.values())
    yield from (v is not None for v in module._buffers.values())


def _child_inputs(gm: fx.GraphModule, example_inputs: Inputs, children: list[nn.Module]) -> dict:
    """Each child's first call inputs (as `Inputs`) when the captured model runs on the example (eval mode)."""
    seen: dict = {}
    if not children:
        return seen

    def record(child, args, kwargs):
        seen.setdefault(child, Inputs.of((tuple(args), dict(kwargs)) if kwargs else tuple(args)))

    handles = [child.register_forward_pre_hook(record, with_kwargs=True) for child in children]
    try:
        with torch.no_grad():
            gm(*example_inputs.flat)
    except Exception:  # the example does not run through the capture: nothing is broken up
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _place(plan, parts: list[NestedPart]) -> None:
    """Give each part's units the places after the model's own in the mask vector (the constant 1 moves to the
    end), and add its layers, modules and parameters to the plan under their full names."""
    own = plan.total_units
    base, bases = own, []
    for part in parts:
        bases.append(base)
        base += part.plan.total_units
    total = base
    _shift(plan, 0, own, total)
    for part, start in zip(parts, bases):
        _shift(part.plan, start, part.plan.total_units, total)
        prefix = f"{part.path}."
        plan.layers += [_prefixed_layer(layer, prefix) for layer in part.plan.layers]
        plan.modules += [dataclasses.replace(m, name=prefix + m.name) for m in part.plan.modules]
        plan.params += [dataclasses.replace(p, name=prefix + p.name) for p in part.plan.params]
        plan.unknown += part.plan.unknown
        plan.opaque.update({prefix + k: v for k, v in part.plan.opaque.items()})
        plan.specialized += part.plan.specialized
        plan.frozen += [prefix + q for q in part.plan.frozen]
        plan.node_count += part.plan.node_count
    plan.total_units = total
    plan.nested = {part.path: part for part in parts}


def _shift(plan, base: int, ones: int, total: int) -> None:
    """Move a plan's units by `base` and its constant-1 index from `ones` to `total` (gates and remasks gather
    from the mask vector; layer input maps mark the constant 1 as ONES and only move)."""
    def move(index: torch.Tensor) -> torch.Tensor:
        return torch.where(index == ones, total, index + base)

    plan.gates = {k: move(v) for k, v in plan.gates.items()}
    plan.remask = {k: move(v) for k, v in plan.remask.items()}
    for part in plan.nested.values():  # a nested part's own nested parts moved with it
        _shift(part.plan, base, ones, total)
    if not base:
        return
    for layer in plan.layers:
        if layer.offset is not None:
            layer.offset += base
        if layer.input_index is not None:
            layer.input_index = torch.where(layer.input_index == ONES, ONES, layer.input_index + base)


def _prefixed_layer(layer, prefix: str):
    """A nested layer as the model's plan names it: parameters by full name, call sites by `prefix` + node name
    (fx node names hold no dots, so they never meet the model graph's own)."""
    sites = [dataclasses.replace(s, node=prefix + s.node,
                                 apply_after=s.apply_after and prefix + s.apply_after,
                                 input_node=s.input_node and prefix + s.input_node) for s in layer.sites]
    reason = layer.reason
    if reason.startswith(MADE_FROM) and "model input" in reason:  # the subgraph's input: what opaque code gave it
        reason = f"made from what the opaque {prefix.rstrip('.').rpartition('.')[0]} gives {prefix.rstrip('.')}"
    return dataclasses.replace(layer, name=prefix + layer.name, weight=prefix + layer.weight,
                               bias=layer.bias and prefix + layer.bias, sites=sites, reason=reason,
                               input_producers=[prefix + name for name in layer.input_producers],
                               frozen=[prefix + q for q in layer.frozen])
