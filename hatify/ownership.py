"""Which parameters a HAT layer owns. Protection freezes a layer's weight entries by (output unit, input unit), so
it is sound only when (a) every read of the weight is the layer's own and (b) whatever ops lie between the
parameter and the layer keep each row in its place (row i of the effective weight depends on row i of the
parameter only: weight standardisation, a per-row gain). A weight read elsewhere (`b @ self.fc.weight`, a tied
output projection) or transformed across rows (`w.t()`, `w.flip(0)`, `w / w.norm()`) is not a HAT layer's: it
is left to the loose-parameter policy (one copy per task, or frozen) and reported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .inplace import writes_in_place
from .parametrized import is_held
from .shapes import TensorSpec

_TRIALS = 3


def _reach(nodes: list[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node they depend on."""
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and every node it depends on, in graph order."""
    seen = _reach([node])
    return [n for n in node.graph.nodes if n in seen]


def in_place_writers(nodes: set[fx.Node], gm: fx.GraphModule) -> set[fx.Node]:
    """In-place writes into `nodes`, directly or through views, and those views: they change what a chain hands
    its layer (`bias = self.qkv.bias.clone(); bias[n:2 * n].zero_()`, Swin V2). Only writes whose result is not
    used otherwise, and views used only by such writes, count."""
    from .inplace import _alias_kind, _first_tensor

    found: set[fx.Node] = set()
    frontier = [n for n in nodes if n.op != "get_attr"]  # a write into a parameter itself is never the layer's
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in nodes or user in found or _first_tensor(user) is not node:
                continue
            if writes_in_place(user, gm) or _alias_kind(user, gm) == "view":
                found.add(user)
                frontier.append(user)
    changed = True
    while changed:  # keep the writes, and the views that lead only to kept writes and views
        changed = False
        for node in list(found):
            if any(u not in found for u in node.users) or not (node.users or writes_in_place(node, gm)):
                found.discard(node)
                changed = True
    return found


def keeps_rows(weight_node: fx.Node, param: str, gm: fx.GraphModule) -> bool:
    """Whether the ops from parameter `param` to `weight_node` keep rows in place: replacing random rows of the
    parameter changes no other row of the result, on several draws (and the row count is kept). In-place writes
    into the chain before its first use count as part of it. A value held per task (`parametrized.HeldNorm`) is
    a constant for every finished task, the only ones protection is for: it keeps its value across the draws."""
    chain = set(ancestors(weight_node))
    order = {n: i for i, n in enumerate(weight_node.graph.nodes)}
    first_use = min((order[u] for u in weight_node.users), default=None)
    writers = {w for w in in_place_writers(chain, gm) if first_use is None or order[w] < first_use}
    needed = chain | {a for w in writers for a in ancestors(w)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in [n for n in weight_node.graph.nodes if n in needed]:
        if n.op == "placeholder":
            return False
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[weight_node])
    run = _Evaluate(fx.GraphModule(gm, graph), [env[n] for n in needed if is_held(n, gm)])
    value = gm.get_parameter(param).detach()
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            base, run.constants = torch.func.functional_call(run, {f"sub.{param}": value}, ())
            if not isinstance(base, torch.Tensor) or base.ndim == 0 or base.shape[0] != value.shape[0]:
                return False
            for _ in range(_TRIALS):
                rows = torch.rand(value.shape[0], generator=gen) < 0.5
                moved = value.clone()
                moved[rows] = torch.randn(moved[rows].shape, generator=gen).to(value.dtype)
                out, _ = torch.func.functional_call(run, {f"sub.{param}": moved}, ())
                if out.shape != base.shape or not torch.equal(out[~rows].nan_to_num(), base[~rows].nan_to_num()):
                    return False
    except Exception:  # cannot be evaluated on its own: not provably row-local
        return False
    return True


class _Evaluate(nn.Module):
    """Runs a chain's graph; the values of its `held` nodes are those of the first run once `constants` holds
    them (returned by every run)."""

    def __init__(self, sub: fx.GraphModule, held: list[fx.Node]) -> None:
        super().__init__()
        self.sub, self.held, self.constants = sub, held, {}

    def forward(self) -> tuple[torch.Tensor, dict]:
        interpreter = fx.Interpreter(self.sub, garbage_collect_values=False)
        out = interpreter.run(initial_env=dict(self.constants))
        return out, {n: interpreter.env[n] for n in self.held}


def outside_reads(gm: fx.GraphModule, params: list[str], sites: list[fx.Node], args: list[fx.Node],
                  live: set[fx.Node] | None = None) -> list[fx.Node]:
    """Reads of `params` that are not the layer's own: a get_attr outside the chains from its parameters to its
    call sites' weight and bias arguments `args`, or a chain node whose result also flows elsewhere. `live`:
    `live_nodes(gm)`, computed once by a caller that asks for many layers."""
    chain = {n for a in args for n in ancestors(a)}
    own = chain | set(sites) | in_place_writers(chain, gm)
    live = live_nodes(gm) if live is None else live  # a read whose result is never used reads nothing
    bad = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in params and n not in chain and n in live]
    return bad + [n for n in gm.graph.nodes
                  if n in chain and any(u not in own and u in live and not _metadata(u) for u in n.users)]


_METADATA = {"size", "numel", "dim", "ndimension", "nelement", "shape", "dtype", "device", "ndim", "is_cuda"}


def _metadata(node: fx.Node) -> bool:
    """A read of a tensor's shape, dtype or device only (`bias.numel()`): no use of its values."""
    if node.op == "call_method":
        return node.target in _METADATA
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes the output, or an in-place write, depends on."""
    return _reach([n for n in gm.graph.nodes if n.op == "output" or writes_in_place(n, gm)])


_INLINE = {nn.Linear: lambda m: (F.linear, ("weight", "bias"), ()),
           nn.Conv1d: lambda m: (F.conv1d, ("weight", "bias"), (m.stride, m.padding, m.dilation, m.groups)),
           nn.Conv2d: lambda m: (F.conv2d, ("weight", "bias"), (m.stride, m.padding, m.dilation, m.groups)),
           nn.Conv3d: lambda m: (F.conv3d, ("weight", "bias"), (m.stride, m.padding, m.dilation, m.groups)),
           nn.Embedding: lambda m: (F.embedding, ("weight",), (m.padding_idx, m.max_norm, m.norm_type,
                                                               m.scale_grad_by_freq, m.sparse))}


def inline_shared_layers(gm: fx.GraphModule) -> list[str]:
    """A Linear, ConvNd or Embedding module whose parameters the graph also reads directly, or that holds a
    parameter tied to another name (GPT-2's `lm_head.weight` is `transformer.wte.weight`), becomes the functional
    call it stands for, reading the same parameters under their first name: then every read of them is a graph
    read of one name, which the flow gives one rule (a tied embedding and LM head: `flow.ties`) or the
    loose-parameter policy replaces consistently (one copy per task shared by all the reads). Returns the inlined
    module names."""
    first = {id(value): name for name, value in reversed(list(gm.named_parameters(remove_duplicate=False)))}
    tied = {name for name, value in gm.named_parameters(remove_duplicate=False) if first[id(value)] != name} | \
        {first[id(value)] for name, value in gm.named_parameters(remove_duplicate=False) if first[id(value)] != name}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"} | tied
    inlined = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = gm.get_submodule(node.target)
        make = _INLINE.get(type(module))
        if make is None or getattr(module, "padding_mode", "zeros") != "zeros":
            continue
        fn, names, extra = make(module)
        if not any(f"{node.target}.{name}" in read for name in names + ("bias",)):
            continue
        with gm.graph.inserting_before(node):
            attrs = []
            for name in names:
                value = getattr(module, name, None)
                if value is None:
                    attrs.append(None)
                    continue
                attr = gm.graph.get_attr(first.get(id(value), f"{node.target}.{name}"))
                attr.meta["hat_spec"] = TensorSpec(tuple(value.shape), value.dtype)
                attrs.append(attr)
            call = gm.graph.call_function(fn, (node.args[0], *attrs, *extra))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        inlined.append(node.target)
    return inlined
