"""Parametrized modules (`torch.nn.utils.parametrizations.weight_norm`, `spectral_norm`, a user's
`register_parametrization`): traced into, so the weight they compute is a chain of graph ops from their
parameters to the plain layer's functional call. The layer is then a HAT layer like its plain twin where that
chain keeps rows in place (`weight_norm` over the output axis: each row is g[i] * v[i] / |v[i]|), with its
parameter of the weight's shape protected by output row and the others (the per-row gain) one copy per task.

`weight_norm` over another axis (HuBERT's positional conv: dim=2, one norm per kernel position over every row)
couples rows through the norm: a later task moving its free rows of v would move the norm, hence every protected
row of the weight. Its norm is therefore held per task like a norm's running statistics (`HeldNorm`): computed
from v while the task trains, kept at its end-of-task value once the task is finished. A finished task then
computes g_t * v / n_t with g_t and n_t its own frozen copies and v's entries it uses protected, which is
row-local in v: the layer is a HAT layer. Any other chain that mixes rows (`spectral_norm`'s sigma, updated by a
power iteration on every training forward) is not provably row-local and its parameters follow the
loose-parameter policy (`ownership.keeps_rows`)."""
from __future__ import annotations

import inspect

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .errors import HatifyError
from .shapes import SPEC, TensorSpec

# Where torch keeps a module's parametrizations: `<module>.parametrizations.<tensor>.original<i>`.
_PARAMETRIZATIONS = ".parametrizations."
_FLAT = "parametrizations_"


def traced_through(module: nn.Module, qualname: str) -> bool:
    """Whether the tracer goes into `module` instead of keeping it a leaf: a parametrized producer module (a
    `ParametrizedConv1d`), or its parametrizations (the chain computing its weight)."""
    from .flow import PRODUCER_MODULES

    if parametrize.is_parametrized(module):
        return len(type(module).__bases__) == 1 and type(module).__bases__[0] in PRODUCER_MODULES
    # One that behaves differently in training (spectral_norm's power iteration) stays a leaf: a trace would keep
    # only the eval-mode path.
    return _PARAMETRIZATIONS in f".{qualname}." and not _reads_training_flag(module)


def _reads_training_flag(module: nn.Module) -> bool:
    try:
        return "self.training" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True


def layer_name(parameter: str) -> str:
    """The layer a weight parameter belongs to: `conv` for `conv.weight` and for a parametrized conv's
    `conv.parametrizations_weight_original1` (see `flatten_parametrization_paths`).

    Example:
        >>> layer_name("encoder.conv.parametrizations_weight_original1"), layer_name("fc.weight")
        ('encoder.conv', 'fc')
    """
    path, _, attr = parameter.rpartition(".")
    if attr.startswith(_FLAT) and path:
        return path
    return parameter[: -len(".weight")] if parameter.endswith(".weight") else parameter


def flatten_parametrization_paths(gm: fx.GraphModule) -> None:
    """Give the tensors and modules the graph reads inside a parametrization a name on the parametrized module
    itself (`conv.parametrizations.weight.original1` -> `conv.parametrizations_weight_original1`): protecting
    that module's bias registers torch's own `conv.parametrizations`, which would replace the path the graph
    reads through."""
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module") or _PARAMETRIZATIONS not in f".{node.target}":
            continue
        cut = f".{node.target}".index(_PARAMETRIZATIONS)
        owner_path, inner = node.target[: max(cut - 1, 0)], node.target[cut:]
        new = inner.replace(".", "_")
        owner = gm.get_submodule(owner_path)
        if type(owner._modules.get("parametrizations")) is not nn.Module:  # not a path fx copied: a real module
            continue
        if not hasattr(owner, new):
            path, _, attr = inner.rpartition(".")
            holder = owner.get_submodule(path)
            value = holder._modules.get(attr) if node.op == "call_module" else getattr(holder, attr)
            if isinstance(value, nn.Parameter) or isinstance(value, nn.Module):
                setattr(owner, new, value)
            else:
                owner.register_buffer(new, value, persistent=attr not in holder._non_persistent_buffers_set)
        node.target = f"{owner_path}.{new}" if owner_path else new
    for name, module in list(gm.named_modules()):
        shell = module._modules.get("parametrizations")
        if shell is not None and type(shell) is nn.Module:  # the copy fx made of the path: now unread
            del module._modules["parametrizations"]


class HeldNorm(nn.Module):
    """`torch.norm_except_dim(v, 2, dim)` of a weight-normed parameter until `hold(v)`, then the value held then.
    One per task (`held_per_task`: the plan gives it the loose-parameter policy): a finished task's copy returns
    its own end-of-task norm, whatever later tasks do to v's free entries."""

    held_per_task = True

    def __init__(self, dim: int, norm: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("value", torch.zeros_like(norm))
        self.register_buffer("held", torch.zeros((), dtype=torch.bool, device=norm.device))
        self.is_held = False  # `held` as a Python flag: no device sync on every forward

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.value if self.is_held else torch.norm_except_dim(v, 2, self.dim)

    @torch.no_grad()
    def hold(self, v: torch.Tensor) -> None:
        self.value.copy_(torch.norm_except_dim(v.detach(), 2, self.dim))
        self.held.fill_(True)
        self.is_held = True

    def reset_parameters(self) -> None:
        """Release the held value (`forget_task` re-initialises a task's own copies)."""
        self.held.fill_(False)
        self.is_held = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_held = bool(self.held)


def _couples_rows(node: fx.Node, gm: fx.GraphModule) -> bool:
    """`torch._weight_norm(v, g, dim)` whose norm runs over rows (any dim but the first; -1 is the whole tensor)
    on a parameter read directly."""
    if node.op != "call_function" or node.target is not torch._weight_norm or len(node.args) < 2:
        return False
    v, dim = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    spec = v.meta.get(SPEC) if isinstance(v, fx.Node) else None
    if not (v.op == "get_attr" and isinstance(spec, TensorSpec) and spec.ndim > 1 and isinstance(dim, int)
            and dim % spec.ndim != 0):
        return False
    try:
        return isinstance(gm.get_parameter(v.target), nn.Parameter)
    except AttributeError:  # a buffer
        return False


def hold_row_coupling_norms(gm: fx.GraphModule) -> None:
    """Write each `torch._weight_norm(v, g, dim)` whose norm couples rows as `v * (g / n)`, with n = a `HeldNorm`
    of v registered next to v (`conv.parametrizations_weight_original1_norm`)."""
    coupling = [n for n in gm.graph.nodes if _couples_rows(n, gm)]
    for node in coupling:
        v, g = node.args[:2]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        value = gm.get_parameter(v.target)
        norm = torch.norm_except_dim(value.detach(), 2, dim)
        owner_path, _, attr = v.target.rpartition(".")
        name = f"{attr}_norm"
        (gm.get_submodule(owner_path) if owner_path else gm).add_module(name, HeldNorm(dim, norm))
        with gm.graph.inserting_before(node):
            n = gm.graph.call_module(f"{owner_path}.{name}" if owner_path else name, (v,))
            scale = gm.graph.call_function(torch.div, (g, n))
            weight = gm.graph.call_function(torch.mul, (v, scale))
        n.meta[SPEC] = TensorSpec(tuple(norm.shape), norm.dtype)
        scale.meta[SPEC] = g.meta.get(SPEC)
        weight.meta.update(node.meta)
        node.replace_all_uses_with(weight)
        gm.graph.erase_node(node)
    if coupling:
        gm.recompile()


def is_held(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A call of a `HeldNorm`: for a finished task, a constant."""
    return node.op == "call_module" and getattr(gm.get_submodule(node.target), "held_per_task", False)


def hold_norms(gm: fx.GraphModule, t: int) -> None:
    """Hold task t's copy of every `HeldNorm` at the norm of its parameter's effective value (read through its
    protection, after `end_task` froze it), unless already held (a copy shared by every task)."""
    from .layers import TaskIndexed

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not (isinstance(module, TaskIndexed) and isinstance(module.copies[0], HeldNorm)):
            continue
        copy = module.pick(t)
        if not copy.is_held:
            copy.hold(_read(gm, node.args[0], t))


def _read(gm: fx.GraphModule, node: fx.Node, t: int) -> torch.Tensor:
    """The value task t reads at `node`: a parameter (through its protection) or its per-task copy."""
    if node.op == "get_attr":
        owner_path, _, attr = node.target.rpartition(".")
        return getattr(gm.get_submodule(owner_path) if owner_path else gm, attr)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*node.args, **{**node.kwargs, "hat_task_id": t})
    raise HatifyError(f"cannot hold the weight norm at {node.name}: its parameter is computed ({node.op})")
