"""How the model is called: example inputs (positional, keyword, or both) and the output's structure."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import HatifyError


@dataclass(frozen=True)
class Inputs:
    """`model(*args, **kwargs)`. The converted graph takes the positional inputs first, then the keyword ones
    by name (`flat` is that order); each keyword input is also a keyword of `hat(...)`. Keyword inputs that are
    plain constants (`use_cache=False`, `return_dict=True`) are fixed in the trace instead (`constants`).

    Example:
        >>> Inputs.of({"input_ids": torch.zeros(2, 8, dtype=torch.long)}).names(nn.Identity())
        ['input_ids']
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @staticmethod
    def of(value: Any) -> "Inputs":
        """A tensor, a tuple of positional inputs, a dict of keyword inputs, or `(args_tuple, kwargs_dict)`."""
        if isinstance(value, Inputs):
            return value
        if isinstance(value, torch.Tensor):
            return Inputs((value,))
        if isinstance(value, dict):
            return Inputs((), _keywords(value))
        if isinstance(value, (tuple, list)):
            if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict) \
                    and value[1] and all(isinstance(k, str) for k in value[1]):
                return Inputs(tuple(value[0]), _keywords(value[1]))
            return Inputs(tuple(value))
        raise HatifyError(f"example_inputs must be a tuple of positional inputs, a dict of keyword inputs or "
                          f"(args, kwargs), got {type(value).__name__}")

    @property
    def constants(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if is_constant(v)}

    @property
    def traced_kwargs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if not is_constant(v)}

    @property
    def flat(self) -> tuple:
        return (*self.args, *self.traced_kwargs.values())

    def call(self, fn: Callable, **extra: Any) -> Any:
        return fn(*self.args, **self.kwargs, **extra)

    def names(self, module: nn.Module) -> list[str]:
        """Placeholder names: the forward's parameter names for positional inputs (`input_i` past them or
        where the signature cannot be read), then the keyword names."""
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            signature = None
        params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  ] if signature is not None else []
        if signature is not None:
            try:
                signature.bind(*self.args, **self.kwargs)
            except TypeError as exc:
                raise HatifyError(f"example_inputs do not fit {type(module).__name__}.forward{signature}: {exc}. "
                                  "Give the inputs the model is called with") from None
        positional = [params[i].name if i < len(params) else f"input_{i}" for i in range(len(self.args))]
        clash = set(positional) & set(self.kwargs)
        if clash:
            raise HatifyError(f"example_inputs gives {sorted(clash)} both positionally and by keyword")
        return positional + list(self.traced_kwargs)


def inputs_device(inputs: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first tensor among a call's inputs (None: no tensor)."""
    return next((v.device for v in pytree.tree_leaves((inputs, kwargs)) if isinstance(v, torch.Tensor)), None)


def is_constant(value: Any) -> bool:
    """Plain data a trace fixes (flags, counts, names), not an input that varies from call to call."""
    if isinstance(value, (tuple, list)):
        return all(is_constant(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _keywords(value: dict) -> dict:
    bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise HatifyError(f"keyword example inputs need identifier names, got {bad[0]!r}")
    return dict(value)


KEYWORD = "hat_keyword"       # node.meta flag of a placeholder the model takes by keyword
CONSTANTS = "hat_constants"   # graph_module.meta: keyword arguments fixed in the trace


def needs_spec(spec: pytree.TreeSpec) -> bool:
    """Whether an output structure holds a container torch.fx would rebuild as another type (an HF
    `ModelOutput`, an OrderedDict subclass, becomes a plain dict in fx's own output)."""
    if spec.type not in (None, tuple, list, dict) and not _is_namedtuple(spec.type):
        return True
    return any(needs_spec(child) for child in spec.children())


def _is_namedtuple(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")


class StructuredOutput(fx.graph.CodeGen):
    """Generated code that returns the traced output leaves rebuilt into the model's own output structure."""

    def __init__(self, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.spec = spec

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("hat_output_structure", functools.partial(pytree.tree_unflatten, treespec=self.spec))]

    def generate_output(self, output_args: Any, *, descs: Any = None, repr_fn: Any = None) -> str:
        return f"return hat_output_structure(list({(repr_fn or repr)(output_args)}))"

    def process_outputs(self, outputs: Any) -> Any:
        return pytree.tree_unflatten(list(outputs), self.spec)
