"""Parametrized modules (`torch.nn.utils.parametrizations.weight_norm`, `spectral_norm`, a user's
`register_parametrization`): traced into, so the weight they compute is a chain of graph ops from their
parameters to the plain layer's functional call. The layer is then a HAT layer like its plain twin where that
chain keeps rows in place (`weight_norm` over the output axis: each row is g[i] * v[i] / |v[i]|), with its
parameter of the weight's shape protected by output row and the others (the per-row gain) one copy per task;
a chain that mixes rows (`spectral_norm`'s sigma, a norm over another axis) is not provably row-local and its
parameters follow the loose-parameter policy (`ownership.keeps_rows`)."""
from __future__ import annotations

import inspect

from torch import fx, nn
from torch.nn.utils import parametrize

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
