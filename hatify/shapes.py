"""Stage 2, shapes: run the captured graph once on example inputs and record every node's value spec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .concrete import thaw
from .errors import HatifyError, node_location


SPEC = "hat_spec"  # node.meta key of the node's value spec


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def spec_of(value: Any) -> Any:
    """Tensors become TensorSpec, everything else (ints, sizes, None, ...) is kept as the concrete value."""
    return pytree.tree_map(lambda v: TensorSpec(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v, value)


def infer_example_inputs(model: nn.Module) -> tuple:
    """A timm model knows its input size; anything else must be given explicitly."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        raise HatifyError(
            f"example_inputs is needed for {type(model).__name__} (its input shape cannot be inferred): "
            "pass hatify(model, num_tasks, example_inputs=(torch.randn(2, ...),))")
    return (torch.randn(2, *size, generator=torch.Generator().manual_seed(0)),)


class Interpreter(fx.Interpreter):
    """fx.Interpreter that hands each node plain (mutable) copies of its list and dict arguments, as the
    generated forward does (see `hatify.concrete.thaw`)."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return thaw(args), thaw(kwargs)


class _Recorder(Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the error names the node and its source line in one line instead

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise HatifyError(self.failure(n, exc)) from exc
        n.meta[SPEC] = spec_of(result)
        return result

    def failure(self, n: fx.Node, exc: Exception) -> str:
        """One line: the op (a module with its settings, which say what it expects), the shapes it got, the
        first line of the error, and the usual cause."""
        op = repr(self.module.get_submodule(n.target)) if n.op == "call_module" else ""
        op = op if op and "\n" not in op else ""  # a container's repr runs to many lines
        shapes = [_describe(self.env[a]) for a in n.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (f"running {node_location(n)}{f' = {op}' if op else ''} on inputs {', '.join(shapes) or '-'} "
                f"failed: {type(exc).__name__}: {message}; check that example_inputs have the shapes and dtypes the "
                "model is called with")


def _describe(value: torch.Tensor) -> str:
    return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"


def propagate(gm: fx.GraphModule, example_inputs: tuple) -> Any:
    """Record `node.meta["hat_spec"]` for every node; returns the example output.

    Example:
        >>> gm = fx.symbolic_trace(nn.Linear(4, 3))
        >>> _ = propagate(gm, (torch.randn(2, 4),))
        >>> [n.meta["hat_spec"] for n in gm.graph.nodes][1].shape
        (2, 3)
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise HatifyError(f"example_inputs has {len(example_inputs)} items but forward takes {len(placeholders)}")
    with torch.no_grad():
        return _Recorder(gm).run(*example_inputs)


def ensure_specs(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Every node's spec. The concrete trace records them as it evaluates each node on the example inputs
    (`hatify.capture`); the model runs again (`propagate`) only for a graph with a node the trace could not
    evaluate."""
    nodes = list(gm.graph.nodes)
    if not all(SPEC in n.meta for n in nodes if n.op != "output"):
        propagate(gm, example_inputs)
        return
    for n in nodes:
        if n.op == "output":
            n.meta[SPEC] = spec_of(thaw(fx.node.map_arg(n.args[0], lambda a: a.meta[SPEC])))
