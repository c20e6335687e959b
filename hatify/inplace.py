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
_FRESH_MODULES = {nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag}
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


def writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """`writes_input` for a node of `gm` (its module looked up for a `call_module`)."""
    return writes_input(node, gm.get_submodule(node.target) if node.op == "call_module" else None)


def _alias_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """How `node`'s result may share storage with its first argument: "same" (the very tensor, or one with the
    same layout: its map is the input's), "view" (elements moved), or None (a new tensor)."""
    from .rules import _canon, rule_for

    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _SAME_MODULES or writes_input(node, module):
            return "same"
        if type(module) in _FRESH_MODULES:  # unit-producing layers compute a new tensor
            return None
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


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def join(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def storage_groups(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Union-find over nodes that may share storage: node -> representative of its group."""
    groups = _UnionFind()
    for node in gm.graph.nodes:
        groups.find(node)
        source = _first_tensor(node)
        if source is not None and _alias_kind(node, gm):
            groups.join(node, source)
    return {n: groups.find(n) for n in gm.graph.nodes}


def aliased_writes(gm: fx.GraphModule) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, list[fx.Node]]]:
    """(stale node -> the write that made it stale: unknown maps; layout representative -> the members of every written layout, in graph order).

    Tensors that share storage fall into layouts: the members joined by "same" edges (a base, its in-place results
    and casts) read the storage one way, each view another. A write through one layout gives its members the union
    of old and new maps (`merge_into`). A member of another layout that was taken before the write and is still
    read after it holds a map derived from the old contents in another layout: only that one is unknown. Views
    taken after the write derive their maps from the merged one and stay known."""
    groups = storage_groups(gm)
    layouts = _UnionFind()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    writes: list[fx.Node] = []
    for node in gm.graph.nodes:
        layouts.find(node)
        source = _first_tensor(node)
        if source is not None and _alias_kind(node, gm) == "same":
            layouts.join(node, source)
        if source is not None and writes_in_place(node, gm):
            writes.append(node)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        members.setdefault(groups[node], []).append(node)
    last_read = {n: max((order[u] for u in n.users), default=-1) for n in gm.graph.nodes}
    stale: dict[fx.Node, fx.Node] = {}
    merge_into: dict[fx.Node, list[fx.Node]] = {}
    for write in writes:
        layout = layouts.find(write)
        merge_into.setdefault(layout, [n for n in members[groups[write]] if layouts.find(n) is layout])
        for n in members[groups[write]]:
            if layouts.find(n) is not layout and order[n] < order[write] and last_read[n] > order[write]:
                stale.setdefault(n, write)
    return stale, merge_into
