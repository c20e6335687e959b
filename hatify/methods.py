"""Opaque methods: a module's own method (not its `forward`) that torch.fx cannot trace, recorded as one node.

torch.fx turns an untraceable submodule into an opaque leaf, but the root's forward, and the methods a forward
calls directly (`self.postprocess_detections(...)`, `self.transform.postprocess(...)`), have no such fallback:
one data-dependent line there (`min(k, number of boxes)`) fails the whole model. When the trace fails inside
such a method, capture traces again with that method recorded as one opaque call. The call runs the method on
a shell of its module that holds no parameters, buffers or submodules, so that everything HAT must protect
stays in the graph: a method that needs them cannot be made opaque and the model is refused. Its output gets
no masks (all ones, which is sound): only code after the last HAT layer (decoding, post-processing) suits it.
The shell is made from the traced copy, which is in eval mode: the method keeps its eval behaviour, as the
root's own `if self.training:` branches do once traced.
"""
from __future__ import annotations

import copy
import functools
import traceback
from typing import Any

from torch import fx, nn
from torch.utils import _pytree as pytree

from .concrete import MISSING, value_of


class OpaqueMethod:
    """`module.name(*args)` run on a shell of the module without parameters, buffers or submodules.

    Example:
        >>> call = OpaqueMethod(nn.Flatten(), "extra_repr")
        >>> call()
        'start_dim=1, end_dim=-1'
    """

    def __init__(self, owner: nn.Module, name: str) -> None:
        shell = copy.copy(owner)
        shell.__dict__.update(_parameters={}, _buffers={}, _modules={})
        shell.__dict__.pop(name, None)
        self.shell, self.method = shell, name
        self.__name__ = f"{type(owner).__name__}_{name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.shell), self.method)(self.shell, *args, **kwargs)


def install(root: nn.Module, methods: list[tuple[str, str]]) -> None:
    """Make each (module path, method name) of `root` (a copy being traced) record one node when called with
    a traced argument."""
    for path, name in methods:
        owner = root.get_submodule(path)
        call = OpaqueMethod(owner, name)

        @functools.wraps(getattr(type(owner), name))
        def record(*args: Any, call: OpaqueMethod = call, **kwargs: Any) -> Any:
            found = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
            if not found:
                return call(*args, **kwargs)
            result = found[0].tracer.create_proxy("call_function", call, args, kwargs)
            if result is not None and value_of(result) is MISSING:
                raise fx.proxy.TraceError(
                    f"{type(owner).__name__}.{call.method} cannot run as one opaque call: it needs the module's "
                    "parameters, buffers or submodules, which HAT must see")
            return result

        owner.__dict__[name] = record


def failing_method(exc: BaseException, root: nn.Module) -> tuple[str, str] | None:
    """The outermost method of a module of `root` (not a `forward`, not torch's) in which tracing failed."""
    paths = {id(m): path for path, m in root.named_modules()}
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner, code = frame.f_locals.get("self"), frame.f_code
        if not isinstance(owner, nn.Module) or id(owner) not in paths or code.co_name == "forward" \
                or "/torch/" in code.co_filename:
            continue
        method = getattr(type(owner), code.co_name, None)
        if getattr(method, "__code__", None) is code:
            return paths[id(owner)], code.co_name
    return None


def label(path: str, name: str) -> str:
    """The report's name for an opaque method: `transform.postprocess()`."""
    return f"{path}.{name}()" if path else f"{name}()"
