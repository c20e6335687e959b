"""Concrete tracing: every proxy carries the value its node takes on the example inputs, so Python control
flow on shapes, dims and dtypes (`if x.ndim != 4`, `if H % window:`, `len(x.shape)`, `int(N ** 0.5)`) is
resolved at the example inputs' shapes instead of failing the trace. Sizes passed on to ops stay traced (a
different batch size still runs); only the branches and conversions are fixed, as the plan already is (its
index maps through flatten and reshapes depend on the shapes).

Only non-tensor values (ints, bools, sizes, dtypes) are ever turned into Python values; a branch on tensor
data (`if x.max() > 0`) still fails, and the caller's opaque-leaf fallback takes over. Every resolved
branch is recorded with its source line.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any, Iterator

import torch
from torch import fx
from torch.fx import _symbolic_trace
from torch.utils import _pytree as pytree

from .errors import source_line

MISSING = object()
VALUE = "hat_value"

_SCALARS = (bool, int, float, str, torch.dtype, torch.device, type(None))


def is_python_value(value: Any) -> bool:
    """Plain data Python can branch on (shapes, counts, dtypes); tensors are not."""
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return all(is_python_value(v) for v in value)
    return isinstance(value, _SCALARS)


def value_of(obj: Any) -> Any:
    node = obj.node if isinstance(obj, fx.Proxy) else obj
    return node.meta.get(VALUE, MISSING) if isinstance(node, fx.Node) else obj


def thaw(value: Any) -> Any:
    """fx freezes the lists and dicts in a node's arguments (`immutable_list`); the generated forward passes
    plain ones. A function that mutates its argument (torchvision's `_get_window_and_shift_size` writes into
    its `window_size` list) must get plain copies when our interpreters run the node, as it does at run time.

    Example:
        >>> thaw(fx.immutable_collections.immutable_list([1, [2]])).append(3)
    """
    if isinstance(value, fx.immutable_collections.immutable_list):
        return [thaw(v) for v in value]
    if isinstance(value, fx.immutable_collections.immutable_dict):
        return {k: thaw(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(thaw(v) for v in value)
    return value


def evaluate(node: fx.Node, root: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """The node's value from its arguments' recorded values (MISSING when any is unknown or the op fails)."""
    missing = False

    def value(n: fx.Node) -> Any:
        nonlocal missing
        v = n.meta.get(VALUE, MISSING)
        missing = missing or v is MISSING
        return v

    if node.op == "placeholder":
        name = str(node.target).lstrip("*")
        return inputs.get(name, node.args[0] if node.args else MISSING)
    if node.op == "get_attr":
        try:
            return operator.attrgetter(str(node.target))(root)
        except AttributeError:
            return MISSING
    args = thaw(fx.node.map_arg(node.args, value))
    kwargs = thaw(fx.node.map_arg(node.kwargs, value))
    if missing:
        return MISSING
    try:
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return root.get_submodule(node.target)(*args, **kwargs)
    except Exception:  # the op cannot be replayed: its value (and what depends on it) stays unknown
        return MISSING
    return MISSING


class ConcreteProxy(fx.Proxy):
    """A proxy that carries its example value; the tracer answers bool() and iteration from it
    (`HatTracer.to_bool`, `.iter`), subclasses len() or int()/float() where the value has them."""

    def __getattr__(self, k: str) -> "ConcreteAttribute":
        if k == "shape":  # read now, so that len(x.shape) sees a sequence
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return ConcreteAttribute(self, k)

    def _python(self, what: str) -> Any:
        value = value_of(self)
        if value is MISSING or not is_python_value(value):
            raise fx.proxy.TraceError(f"{what}() of a traced value that depends on tensor data")
        self.tracer.specialize(self.node, what, value)
        return value

    def __setitem__(self, index: Any, value: Any) -> None:
        # In-place writes are recorded (and replayed on the example value); the mask flow treats the
        # written tensor as unknown.
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class ConcreteAttribute(ConcreteProxy, fx.proxy.Attribute):
    """Its node is made on first use; made inside a sub-trace that was rolled back, it is made again."""

    @property
    def node(self) -> fx.Node:
        if self._node is not None and getattr(self._node, "_erased", False):
            self._node = None
        return fx.proxy.Attribute.node.fget(self)


class ConcreteFloat(ConcreteProxy):
    """A proxy whose example value is a Python float (`N ** 0.5`): int() and float() use it. Int-valued
    proxies get neither: torch's argument parser would take them for numbers (a batch size baked in)."""

    def __int__(self) -> int:
        return int(self._python("int"))

    def __float__(self) -> float:
        return float(self._python("float"))


def proxy_class(value: Any) -> type:
    if isinstance(value, (tuple, list)):
        return ConcreteSequence
    return ConcreteFloat if isinstance(value, float) else ConcreteProxy


class ConcreteSequence(ConcreteProxy):
    """A proxy whose example value is a tuple, list or size: len() is its length. (Only these: torch's
    argument parser takes anything with a length for a list of ints.)"""

    def __len__(self) -> int:
        length = len(value_of(self))
        self.tracer.specialize(self.node, "len", length)
        return length


def specialization(node: fx.Node, what: str, value: Any) -> dict:
    """A report entry: where the trace used an example value as a constant, and which."""
    return {"reason": "shape_specialised", "node": node.name, "use": what, "value": repr(value)[:60],
            "line": source_line(node)}


# Sizes are plain ints to torch: `torch.zeros(B, N)` or `buffer.expand(B, -1)` with a traced B never reach
# a proxy's `__torch_function__` and fail in torch.fx. While tracing, these record a node instead whenever
# an argument is traced.
_FACTORIES = ("arange", "as_tensor", "empty", "eye", "full", "linspace", "ones", "rand", "randint", "randn",
              "scalar_tensor", "tensor", "zeros")
_SIZE_METHODS = ("expand", "new_empty", "new_full", "new_ones", "new_zeros", "repeat", "reshape", "tile", "view")


@contextlib.contextmanager
def traced_sizes(tracer: fx.Tracer) -> Iterator[None]:
    def traced(args: tuple, kwargs: dict) -> bool:
        return any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs)))

    def factory(fn):
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if traced(args, kwargs):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return call

    def method(name: str, fn):
        @functools.wraps(fn)
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if traced(args, kwargs):
                return tracer.create_proxy("call_method", name, (self, *args), kwargs)
            return fn(self, *args, **kwargs)
        return call

    factories = {name: getattr(torch, name) for name in _FACTORIES}
    own = {name: torch.Tensor.__dict__.get(name) for name in _SIZE_METHODS}
    try:
        for name, fn in factories.items():
            setattr(torch, name, factory(fn))
        for name in _SIZE_METHODS:
            setattr(torch.Tensor, name, method(name, getattr(torch.Tensor, name)))
        yield
    finally:
        for name, fn in factories.items():
            setattr(torch, name, fn)
        for name, fn in own.items():
            if fn is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def wrapped_calls() -> Iterator[None]:
    """Wrapped functions (`torch.fx.wrap`, a tracer's `autowrap_functions` such as timm's no-trace helpers)
    become one node when called with a traced argument. torch.fx's wrapper marks the node through the proxy
    that `create_proxy` returns, but the concrete tracer answers a call whose example result is `None` with
    `None` itself (so that the model's `if mask is None:` takes the branch it really takes), which that
    wrapper cannot take. While tracing, this wrapper is used instead: the same node, and `None` passed on.
    A tracer with a `trace_through(fn, args, kwargs) -> (traced, result)` hook may trace the call's body
    instead (see `HatTracer.trace_through`)."""
    original = getattr(_symbolic_trace, "_create_wrapped_func", None)
    if original is None:  # a torch.fx without this hook: its own wrapper stays
        yield
        return

    def create(orig_fn):
        @functools.wraps(orig_fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            found: list[fx.Proxy] = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
            if not found:
                return orig_fn(*args, **kwargs)
            through = getattr(found[-1].tracer, "trace_through", None)
            traced, result = through(orig_fn, args, kwargs) if through is not None else (False, None)
            if traced:
                return result
            result = found[-1].tracer.create_proxy("call_function", orig_fn, args, kwargs)
            if result is not None:
                result.node.meta["is_wrapped"] = True
            return result
        return wrapped

    _symbolic_trace._create_wrapped_func = create
    try:
        yield
    finally:
        _symbolic_trace._create_wrapped_func = original
