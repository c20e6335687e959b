"""Assertions on traced values (`torch._check_with(TypeError, cond, msg)`, transformers' `torch_compilable_check`):
checked on the example inputs while tracing (a failing one is the user's input error, said so), and kept in the
graph as a run-time check (`torch._assert`), so the converted model refuses the inputs the original refuses."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
from torch import fx

from .concrete import MISSING, value_of
from .errors import HatifyError


def _message(msg: Any) -> str:
    text = msg() if callable(msg) else msg
    return str(text) if text is not None else "Expected cond to be True"


@contextlib.contextmanager
def traced_checks() -> Iterator[None]:
    """While tracing: `torch._check_with` and `torch._check_tensor_all_with` on a traced condition record a
    `torch._assert` node instead of failing on a proxy."""
    originals = {name: getattr(torch, name) for name in ("_check_with", "_check_tensor_all_with")}

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def check(error_type: type, cond: Any, message: Any = None) -> None:
            if not isinstance(cond, fx.Proxy):
                return fn(error_type, cond, message)
            text = _message(message)
            value = value_of(cond)
            if value is not MISSING and not bool(value.all() if isinstance(value, torch.Tensor) else value):
                raise HatifyError(f"the example inputs fail the model's own check: {text}")
            if isinstance(value, torch.Tensor):
                cond = cond.tracer.create_proxy("call_method", "all", (cond,), {})
            # torch._assert: the run-time check needs nothing but torch (an extracted task keeps it)
            cond.tracer.create_proxy("call_function", torch._assert, (cond, text), {})
        return check

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def called_value(kind: str, target: Any, args: tuple) -> fx.Proxy | None:
    """`cond()` on a traced value that is no function (a bool: `if callable(cond): cond = cond()`, as
    `torch_compilable_check` does, is true of every proxy): the value itself, as the eager call never happens."""
    if kind == "call_method" and target == "__call__" and args and isinstance(args[0], fx.Proxy):
        value = value_of(args[0])
        if value is not MISSING and not callable(value):
            return args[0]
    return None
