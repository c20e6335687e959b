"""Stage 1, capture: trace the model into a torch.fx graph, falling back to opaque leaves."""
from __future__ import annotations

import collections
import copy
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .config import HATConfig
from .errors import HatifyError


@dataclass
class Capture:
    """The traced copy of the model. `opaque` maps a module path to why it could not be traced through."""

    graph_module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)
    mode_leaves: list[str] = field(default_factory=list)


def _timm_notrace() -> tuple[set, tuple]:
    if "timm" not in sys.modules:  # no timm layer can be in a model built without importing timm
        return set(), ()
    from timm.layers import _fx as timm_fx
    return set(timm_fx._leaf_modules), tuple(f for f in timm_fx._autowrap_functions if callable(f))


def _reads_training_flag(module: nn.Module) -> bool:
    """A parameter-free module whose forward branches on `self.training` (drop path, ...) stays a leaf,
    so that train and eval keep their own behaviour instead of the one baked in at trace time."""
    if any(True for _ in module.parameters()):
        return False
    try:
        return "self.training" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


class HatTracer(fx.Tracer):
    """torch.fx tracer that honours timm's no-trace registries and the rule registry's module types,
    and turns a submodule that cannot be traced into an opaque leaf instead of failing the model."""

    def __init__(self, leaf_types: set, leaf_names: set, autowrap: tuple) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.record_stack_traces = True
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.opaque: dict[str, str] = {}
        self.mode_leaves: list[str] = []
        self._attr_cache: dict | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in self.leaf_types or qualname in self.leaf_names or qualname in self.opaque:
            return True
        if not type(m).__module__.startswith("torch.nn") and _reads_training_flag(m):
            if qualname not in self.mode_leaves:
                self.mode_leaves.append(qualname)
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._attr_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev
        stack, calls = collections.OrderedDict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # any failure inside: this submodule becomes an opaque leaf
            self._rollback(last)
            self.module_stack, self.num_calls = stack, calls
            self.opaque[qualname] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last: fx.Node) -> None:
        created = []
        node = last.next
        while node is not self.graph._root:
            created.append(node)
            node = node.next
        erased = set(created)
        for node in reversed(created):
            self.graph.erase_node(node)
        if self._attr_cache is not None:
            for key in [k for k, proxy in self._attr_cache.items() if proxy.node in erased]:
                del self._attr_cache[key]


def _defaults_beyond(model: nn.Module, num_inputs: int | None) -> dict:
    """Forward arguments the example inputs leave out keep their default values in the trace, so that
    `if mask is not None:` takes the branch the model really takes instead of the proxy's."""
    if num_inputs is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for i, p in enumerate(params) if i >= num_inputs and p.kind in plain
            and p.default is not inspect.Parameter.empty and _is_constant(p.default)}


def _is_constant(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def capture(model: nn.Module, config: HATConfig, leaf_types: set, num_inputs: int | None = None) -> Capture:
    """Trace a deep copy of `model` (the original is never modified). With `num_inputs`, forward
    arguments after the first `num_inputs` are traced at their default values.

    Example:
        >>> cap = capture(nn.Sequential(nn.Linear(4, 3)), HATConfig(), set())
        >>> [n.op for n in cap.graph_module.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise HatifyError(f"hatify needs an nn.Module, got {type(model).__name__}")
    timm_leaves, autowrap = _timm_notrace()
    extra_types = {m for m in config.leaf_modules if isinstance(m, type)}
    extra_names = {m for m in config.leaf_modules if isinstance(m, str)}
    tracer = HatTracer(leaf_types | timm_leaves | extra_types, extra_names, autowrap)
    root = copy.deepcopy(model).eval()
    try:
        concrete = {**_defaults_beyond(model, num_inputs), **(config.concrete_args or {})}
        graph = tracer.trace(root, concrete_args=concrete or None)
    except Exception as exc:
        raise HatifyError(
            f"{type(model).__name__}.forward cannot be traced by torch.fx even with opaque-leaf fallbacks "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Move the data-dependent "
            "control flow into a submodule, or pass HATConfig(concrete_args=...) for the arguments it branches on."
        ) from exc
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    return Capture(gm, dict(tracer.opaque), list(tracer.mode_leaves))
