"""In-place writes in a captured graph: which nodes write their first argument, and which tensors share storage.

fx records `h.add_(y)` as a node whose result is `h` itself: every later reader of `h`, or of a view of `h`, sees
the written values. Mask flow must therefore (a) give the written tensor the union of its old and new maps, and
(b) give up (all ones) on every tensor that shares storage with a written one through a view, because a view's
map is derived from its base's map at the time the view was taken.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

from torch import fx, nn

# Ops whose result may share storage with their first argument: views that move elements, and ops that may
# return the input itself (casts that change nothing, dropout in eval), whose map is the input's.
_VIEW_OPS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "T", "mT", "unsqueeze",
             "squeeze", "expand", "expand_as", "getitem", "split", "chunk", "unbind", "tensor_split", "movedim",
             "narrow", "select", "view_as", "reshape_as", "split_with_sizes", "unfold", "diagonal", "as_strided",
             "real", "imag"}
_SAME_OPS = {"detach", "contiguous", "to", "type", "type_as", "float", "half", "double", "bfloat16", "alias",
             "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
_SAME_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}


@functools.lru_cache(maxsize=None)
def _inplace_position(fn: Any) -> int | None:
    """The position of a function's `inplace` argument (F.relu(x, True)), or None."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def writes_input(node: fx.Node, module: nn.Module | None = None) -> bool:
    """True when `node` writes into its first argument: `x.add_(y)`, `torch.relu_(x)`, `x[i] = v`,
    `F.relu(x, inplace=True)`, a module with `inplace=True`."""
    if node.op == "call_module":
        return getattr(module, "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    name = _name(node.target)
    if name.endswith("_") and not name.startswith("__") and not name.startswith("_"):
        return True
    if name.startswith("__i") and name.endswith("__") or name == "__setitem__":
        return True
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function" and callable(node.target):
        try:
            position = _inplace_position(node.target)
        except TypeError:  # unhashable callable
            return False
        return position is not None and position < len(node.args) and node.args[position] is True
    return False


def _alias_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """How `node`'s result may share storage with its first argument: "same" (the very tensor, or one with the
    same layout: its map is the input's), "view" (elements moved), or None (a new tensor)."""
    from .rules import _canon, rule_for

    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _SAME_MODULES or writes_input(node, module):
            return "same"
        # Flatten is a view; a module hatify has no rule for may return anything.
        return "view" if isinstance(module, (nn.Flatten, nn.Unflatten)) or rule_for(node, module) is None else None
    if node.op not in ("call_function", "call_method"):
        return None
    if writes_input(node, None) or _canon(node.target) in _SAME_OPS:
        return "same"
    return "view" if _canon(node.target) in _VIEW_OPS else None


def _first_tensor(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if isinstance(first, (list, tuple)):  # getitem on a tuple output: the element aliases the tuple's tensors
        first = first[0] if first else None
    return first if isinstance(first, fx.Node) else None


def storage_groups(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Union-find over nodes that may share storage: node -> representative of its group."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for node in gm.graph.nodes:
        parent.setdefault(node, node)
        source = _first_tensor(node)
        if source is not None and _alias_kind(node, gm):
            parent[find(node)] = find(source)
    return {n: find(n) for n in parent}


def aliased_writes(gm: fx.GraphModule) -> tuple[set[fx.Node], dict[fx.Node, list[fx.Node]]]:
    """(nodes whose storage is written while a view shares it: unknown maps; group representative -> members
    of every other written group, in graph order)."""
    groups = storage_groups(gm)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node, root in groups.items():
        members.setdefault(root, []).append(node)
    written_roots = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if writes_input(node, module) and _first_tensor(node) is not None:
                written_roots.add(groups[_first_tensor(node)])
    unknown: set[fx.Node] = set()
    plain: dict[fx.Node, list[fx.Node]] = {}
    for root in written_roots:
        group = members[root]
        # Only tensors of one layout share storage (the base, in-place results, casts): one map fits them all.
        if any(_alias_kind(n, gm) == "view" for n in group if n is not root):
            unknown.update(group)
        else:
            plain[root] = group
    return unknown, plain

