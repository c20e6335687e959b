"""Weights used through `torch.einsum` (XLNet's `einsum("ibh,hnd->ibnd", x, self.q)`): where the equation says
which weight axes are the layer's input (contracted with the data) and which its output units (kept in the
result), the call becomes the linear layer it is, `F.linear` on the data with those axes flattened, and the
parameter is stored in that layer's layout, (output units, input units), under its own name. The layer is then a
HAT layer like any `Linear`: per-unit masks on the flattened output units and protection by (output, input)
entry. An equation with an axis that is neither (a batch or expert axis shared with the data, a sum over a
weight axis), or a parameter also read any other way, is left as it is."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn


def linear_einsums(gm: fx.GraphModule) -> list[str]:
    """Rewrite every einsum that is a linear layer on a parameter; returns the parameters re-laid out.

    Example:
        >>> class Heads(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q = nn.Parameter(torch.randn(8, 2, 4))
        ...     def forward(self, x):
        ...         return torch.einsum("bsh,hnd->bsnd", x, self.q)
        >>> gm = fx.symbolic_trace(Heads())
        >>> linear_einsums(gm), tuple(gm.q.shape)
        (['q'], (8, 8))
    """
    uses: dict[str, list[tuple[fx.Node, fx.Node, tuple | None]]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _parameter(gm, node.target) is not None:
            for user in node.users:
                if not _reads_type(user):
                    uses.setdefault(node.target, []).append((user, node, _linear_form(user, node, gm)))
    names: dict[int, int] = {}
    for _, value in gm.named_parameters(remove_duplicate=False):
        names[id(value)] = names.get(id(value), 0) + 1
    changed = []
    for name, calls in uses.items():
        forms = {form[1:] if form else None for _, _, form in calls}
        if len(forms) != 1 or None in forms:  # read otherwise, or as two different layers
            continue
        if names[id(_parameter(gm, name))] > 1:  # tied under another name: a new layout would untie it
            continue
        out_axes, in_axes = next(iter(forms))
        old = _parameter(gm, name)
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        units, inputs = [old.shape[a] for a in out_axes], [old.shape[a] for a in in_axes]
        with torch.no_grad():
            laid_out = old.detach().permute(*out_axes, *in_axes).reshape(math.prod(units), math.prod(inputs))
        owner.register_parameter(attr, nn.Parameter(laid_out.clone(), requires_grad=old.requires_grad))
        for call, weight, form in calls:
            _rewrite(gm, call, weight, form[0], units)
        changed.append(name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _reads_type(node: fx.Node) -> bool:
    """`w.dtype`, `w.device`: the same for the parameter in its new layout (its shape is not)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("dtype", "device", "is_cuda")
    return node.op == "call_method" and node.target in ("get_device", "is_floating_point")


def _parameter(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def _linear_form(call: fx.Node, weight: fx.Node, gm: fx.GraphModule) -> tuple | None:
    """(data permutation, weight output axes, weight input axes) when `call` is `einsum(eq, data, weight)` (either
    order) with every weight axis either contracted with the data or kept as an output unit axis."""
    if call.op != "call_function" or call.target is not torch.functional.einsum and call.target is not torch.einsum:
        return None
    if call.kwargs or len(call.args) != 3 or not isinstance(call.args[0], str):
        return None
    equation, operands = call.args[0].replace(" ", ""), list(call.args[1:])
    if "->" not in equation or "." in equation or operands.count(weight) != 1:
        return None
    lhs, out = equation.split("->")
    subscripts = lhs.split(",")
    w_at = operands.index(weight)
    data, w = subscripts[1 - w_at], subscripts[w_at]
    data_node = operands[1 - w_at]
    if not isinstance(data_node, fx.Node) or (data_node.op == "get_attr" and _parameter(gm, data_node.target)
                                              is not None) or len(w) != gm.get_parameter(weight.target).ndim or \
            any(len(set(s)) != len(s) for s in (data, w, out)):
        return None
    contracted = [c for c in w if c in data and c not in out]
    units = [c for c in w if c in out and c not in data]
    kept = [c for c in data if c not in contracted]
    if not contracted or not units or len(contracted) + len(units) != len(w) or any(c not in out for c in kept) \
            or set(out) != set(kept) | set(units):
        return None
    permutation = [data.index(c) for c in kept + contracted]
    result_order = [(kept + units).index(c) for c in out]
    return (permutation, len(kept), result_order), tuple(w.index(c) for c in units), \
        tuple(w.index(c) for c in contracted)


def _rewrite(gm: fx.GraphModule, call: fx.Node, weight: fx.Node, data_form: tuple, units: list[int]) -> None:
    """einsum(...) -> linear(data permuted and flattened, weight) unflattened and permuted to the einsum's order."""
    permutation, kept, result_order = data_form
    data = next(a for a in call.args[1:] if a is not weight)
    graph = gm.graph
    with graph.inserting_before(call):
        x = data
        if permutation != sorted(permutation):
            x = graph.call_method("permute", (x, *permutation))
        x = graph.call_method("flatten", (x, kept))
        y = graph.call_function(F.linear, (x, weight))
        y.meta = dict(call.meta)  # its source line: the einsum's
        y = graph.call_method("unflatten", (y, -1, tuple(units)))
        if result_order != sorted(result_order):
            y = graph.call_method("permute", (y, *result_order))
    call.replace_all_uses_with(y)
    graph.erase_node(call)
