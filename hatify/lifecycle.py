"""After training: forget a task, and extract one task as a plain PyTorch module."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from . import fsdp
from .copying import detached_deepcopy
from .errors import HatifyError
from .layers import FoldedGate, Gate, Protect, TaskIndexed, TaskParameter
from .nested import BOUND, call_opaque, nested_paths
from .rewrite import MASK_BANK, SCALE_ARG, TASK_ARG, _owner


def forget_task(hat, t: int) -> None:
    """Release the units only task t used (their weights and t's embedding re-initialised); t is no longer
    trained. Every other task's outputs stay bit-identical: they never read the released weights."""
    from .model import weight_protection

    if not (isinstance(t, int) and 0 <= t < hat.num_tasks) or not bool(hat.trained[t]):
        raise HatifyError(f"forget_task({t!r}): task {t} is not a trained task (trained: {hat.trained_tasks})")
    fsdp.refuse_sharded(hat, "forget_task()")
    others = [u for u in hat.trained_tasks if u != t]
    cum = torch.zeros_like(hat.cumulative)
    for u in others:
        cum |= (hat.masks.embedding(u) > 0).to(cum.device)
    cum_ext = torch.cat([cum, cum.new_ones(1)])
    gen = torch.Generator().manual_seed(hat.plan.config.seed + 1000 + t)
    with torch.no_grad():
        for layer in hat.plan.masked_layers:
            out = cum[layer.offset: layer.offset + layer.units]
            inp = cum_ext[layer.input_index.to(cum.device)].any(0) if layer.input_index is not None else None
            for qualname in layer.protected:
                owner, attr = _owner(hat.net, qualname)
                p: Protect = owner.parametrizations[attr][0]
                p.forget_write_back()  # an optimizer may have moved frozen entries since the last read
                effective = getattr(owner, attr).detach().clone()
                keep = (weight_protection(layer, out, inp, tuple(effective.shape)) if qualname == layer.weight
                        else out).reshape(p.protect.shape)
                released = (p.protect & ~keep).expand_as(effective)
                fresh = _fresh_like(effective, gen) if qualname == layer.weight else torch.zeros_like(effective)
                raw = owner.parametrizations[attr].original
                raw.copy_(torch.where(released, fresh, effective))
                p.reset(effective, keep)
        hat.masks.unfreeze(t)
        e = hat.masks.embedding(t)
        cfg = hat.plan.config
        e.copy_(torch.full_like(e, cfg.dense_value) if cfg.init == "dense" else torch.randn(e.shape, generator=gen))
        for module in hat.net.modules():
            if isinstance(module, (TaskIndexed, TaskParameter)):
                module.unfreeze(t)
        hat.cumulative.copy_(cum)
        hat.trained[t] = False


def _fresh_like(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """PyTorch's default init of Linear/Conv weights: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), ...)."""
    fan_in = weight[0].numel() if weight.ndim > 1 else weight.numel()
    bound = 1 / math.sqrt(max(1, fan_in))
    return (torch.rand(weight.shape, generator=gen) * 2 - 1).to(weight) * bound


def _strip_parametrizations(module: nn.Module) -> None:
    """Replace parametrized tensors by plain parameters holding their effective values. (torch's
    remove_parametrizations edits the parametrized class, which a deepcopy shares with the original.)"""
    values = {attr: getattr(module, attr).detach().clone() for attr in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]
    del module.parametrizations
    for attr, value in values.items():
        module.register_parameter(attr, nn.Parameter(value, requires_grad=False))


def extract(hat, t: int, prune: bool = False) -> fx.GraphModule:
    """Task t alone as a plain GraphModule: takes the original inputs (no task id), binary masks folded in as
    constant multipliers, task t's norm copies, heads and parameters selected. Needs only torch to run.
    `prune=True` also removes the units task t does not use where shapes allow (`net.prune_summary`); the layers
    of nested subgraphs (`hatify.nested`) keep every unit."""
    t = hat._one_task(t, "extract")
    fsdp.refuse_sharded(hat, "extract()")
    net = detached_deepcopy(hat.net).eval()
    with torch.no_grad():
        masks = net.hat_masks(t, None)
    for module in list(net.modules()):
        if parametrize.is_parametrized(module):
            _strip_parametrizations(module)
    for path in nested_paths(hat.plan):
        sub = net.get_submodule(path)
        _select_task(sub, masks, t)
        bound = [n for n in sub.graph.nodes if n.op == "call_module" and n.target == BOUND]
        for node in [user for b in bound for user in b.users] + bound:
            sub.graph.erase_node(node)
        del sub.hat_bound
        _plain(sub)
    _select_task(net, masks, t)
    for node in list(net.graph.nodes):
        if node.op == "call_function" and node.target is call_opaque:  # the opaque module called directly again
            module = node.args[0]
            node.op, node.target, node.args = "call_module", module.target, node.args[3:]
            net.graph.erase_node(module)
    for node in list(net.graph.nodes):
        if node.op == "call_module" and node.target == MASK_BANK:
            net.graph.erase_node(node)
    del net.hat_masks
    _plain(net)
    if prune:
        from .prune import prune as prune_units

        net.prune_summary = prune_units(net, hat.plan, masks[:-1])
        net.recompile()
    return net


def _plain(net: fx.GraphModule) -> None:
    """Finish an extracted graph: no task inputs, no gates, nothing that needs hatify to unpickle or train."""
    for node in list(net.graph.nodes):
        if node.op == "placeholder" and node.target in (TASK_ARG, SCALE_ARG):
            net.graph.erase_node(node)
    del net.hat_gates
    net._tracer_cls, net._tracer_extras = None, {}  # unpickling needs only torch, not hatify's tracer
    net.requires_grad_(False)
    net.graph.lint()
    net.recompile()


def _select_task(net: fx.GraphModule, masks: torch.Tensor, t: int) -> None:
    """Task t's masks as constant multipliers and its copies in place of the per-task modules and parameters."""
    graph = net.graph

    def constant(gate: Gate, name: str) -> fx.Node:
        const = masks[gate.index]
        net.register_buffer(f"hat_mask_{name}", (const.amax(0) if gate.union else const).detach().clone())
        return graph.get_attr(f"hat_mask_{name}")

    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        try:
            target = net.get_submodule(node.target)
        except AttributeError:  # a per-task parameter read twice: the first read made it a plain parameter
            node.op, node.args, node.kwargs = "get_attr", (), {}
            continue
        if isinstance(target, FoldedGate):  # back to the module call, then the product
            node.target, node.args = target.target_name, node.args[:1]
            with graph.inserting_before(node):
                gate = constant(target, node.name)
            with graph.inserting_after(node):
                gated = graph.call_function(operator.mul, (node, gate))
            gated.meta["hat_spec"] = node.meta.get("hat_spec")
            node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
            target = net.get_submodule(node.target)
        if isinstance(target, Gate):
            with graph.inserting_before(node):
                gate = constant(target, node.name)
            node.op, node.target, node.args = "call_function", operator.mul, (node.args[0], gate)
        elif isinstance(target, TaskIndexed) or (TASK_ARG in node.kwargs and not isinstance(target, TaskParameter)):
            if isinstance(target, TaskIndexed):  # (else a second call: the copy is in place already)
                owner, attr = _owner(net, node.target)
                owner.add_module(attr, target.copies[0 if target.shared else t])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != TASK_ARG}
        elif isinstance(target, TaskParameter):
            owner, attr = _owner(net, node.target)
            value = target(t).detach().clone()
            delattr(owner, attr)
            owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))
            node.op, node.args, node.kwargs = "get_attr", (), {}
