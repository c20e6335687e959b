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
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import source_line

MISSING = object()
VALUE = "hat_value"
DATA = "hat_data"  # node.meta flag: the Python values read from this node may depend on tensor data

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
    watch = _DataWatch()
    try:
        with torch.no_grad(), watch:
            if node.op == "call_function":
                result = node.target(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                result = root.get_submodule(node.target)(*args, **kwargs)
            else:
                return MISSING
    except Exception:  # the op cannot be replayed: its value (and what depends on it) stays unknown
        return MISSING
    node.meta[DATA] = _reads_data(node, args, kwargs, result, watch.fired)
    return result


# Reads that never depend on tensor data, even of a tensor whose size does (a dynamic number of boxes).
_STATIC_READS = {"dtype", "device", "ndim", "dim", "ndimension", "get_device", "is_floating_point", "is_complex",
                 "is_cuda", "is_nested", "is_sparse", "is_quantized", "is_meta", "is_contiguous", "requires_grad",
                 "layout", "element_size", "is_tensor", "isinstance"}
# Reads of sizes: static unless the tensor's size itself depends on data.
_SIZE_READS = {"shape", "size", "numel", "nelement", "stride", "len"}


def _reads_data(node: fx.Node, args: Any, kwargs: Any, result: Any, fired: bool) -> bool:
    """Whether Python values read from `node` (a size, a count, a number, a branch) may depend on tensor data
    (the input's pixels, the parameters' values) rather than only on the example's shapes: then the trace
    must not take them for constants. True when an input node does, when the node turns tensor contents into
    Python values (`.item()`, `.tolist()`), or when it ran an op whose output size depends on data
    (`nonzero`, masked indexing, a custom op such as torchvision's `nms`)."""
    name = node.args[1] if node.target is getattr and len(node.args) > 1 else node.target \
        if node.op == "call_method" else getattr(node.target, "__name__", None)  # torch.is_floating_point, len
    if name in _STATIC_READS:
        return False
    inputs = [n for n in node.all_input_nodes if n.meta.get(DATA)]
    if inputs or fired:
        return True
    if name in _SIZE_READS:
        return False
    tensors = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves((args, kwargs)))
    return tensors and is_python_value(result) and result is not None


def reads_data(obj: Any) -> bool:
    """Whether a traced value's Python reads depend on tensor data (see `_reads_data`)."""
    return isinstance(obj, fx.Proxy) and bool(obj.node.meta.get(DATA))


class _DataWatch(TorchDispatchMode):
    """Notes an op whose output size or value depends on tensor data: tagged so by torch (`nonzero`, masked
    indexing, `item`), or a custom op (outside aten), whose size hatify cannot know."""

    def __init__(self) -> None:
        super().__init__()
        self.fired = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.fired:
            tags = getattr(func, "tags", ())
            if func.namespace not in ("aten", "prims"):
                self.fired = True
            elif torch.Tag.data_dependent_output in tags:
                self.fired = True
            elif torch.Tag.dynamic_output_shape in tags:
                # integer indexing (`table[index]`) has the index's size; masks (bool indices) do not
                self.fired = not (func.__name__.startswith("index") and all(
                    i is None or (isinstance(i, torch.Tensor) and not i.is_floating_point()
                                  and i.dtype not in (torch.bool, torch.uint8)) for i in _indices(args)))
        return func(*args, **(kwargs or {}))


def _indices(args: tuple) -> list:
    return list(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else [object()]


PROXIES = "hat_proxies"  # node.meta: how many live proxies refer to the node


class ConcreteProxy(fx.Proxy):
    """A proxy that carries its example value; the tracer answers bool() and iteration from it
    (`HatTracer.to_bool`, `.iter`), subclasses len() or int()/float() where the value has them.

    A node can be an argument of a later node only through a live proxy, so once the last proxy of a node is
    gone its example value is dropped (its spec kept): the trace holds about the activations the model's own
    forward holds at a time, not every one it made."""

    def __init__(self, node: Any, tracer: Any = None) -> None:
        super().__init__(node, tracer)
        if isinstance(node, fx.Node):  # (a ConcreteAttribute is made from its root proxy and makes its node late)
            node.meta[PROXIES] = node.meta.get(PROXIES, 0) + 1

    def __del__(self) -> None:
        node = self.__dict__.get("node")
        if not isinstance(node, fx.Node) or PROXIES not in node.meta:
            return
        node.meta[PROXIES] -= 1
        if node.meta[PROXIES] or node.op not in ("call_function", "call_method", "call_module") or \
                node.target is getattr or node.meta.get(VALUE, MISSING) is MISSING:  # (getattr: views, sizes)
            return  # (an unknown value has no spec: the shape stage runs the graph and names the failing op)
        from .shapes import SPEC, spec_of

        node.meta[SPEC] = spec_of(node.meta.pop(VALUE))

    def __getattr__(self, k: str) -> "ConcreteAttribute":
        own = value_of(self)
        if own is not MISSING and not hasattr(own, k):
            # `hasattr(x, "jax")` (transformers' jax-jit check) must see what the real value has.
            raise AttributeError(f"{type(own).__name__} has no attribute {k!r}")
        value = getattr(own, k, MISSING) if own is not MISSING else MISSING
        if k == "shape" or isinstance(value, (tuple, list, int, float)):
            # read now, so that the proxy has its value's kind: len(x.shape), len(image_list.image_sizes)
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return ConcreteAttribute(self, k)

    def _python(self, what: str) -> Any:
        value = value_of(self)
        if value is MISSING or not is_python_value(value) or reads_data(self):
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
    """A proxy whose example value is a Python float (`N ** 0.5`) or int (`float(max_size[1])` in
    torchvision's image batching): an explicit int() or float() uses it, unless it depends on tensor data.
    No `__index__`: torch's argument parser takes only that for a number, so sizes passed on stay traced
    (a batch size is not baked in)."""

    def __int__(self) -> int:
        return int(self._python("int"))

    def __float__(self) -> float:
        return float(self._python("float"))


def proxy_class(value: Any) -> type:
    if isinstance(value, (tuple, list)):
        return ConcreteSequence
    return ConcreteFloat if isinstance(value, (float, int)) and not isinstance(value, bool) else ConcreteProxy


class ConcreteSequence(ConcreteProxy):
    """A proxy whose example value is a tuple, list or size: len() is its length. (Only these: torch's
    argument parser takes anything with a length for a list of ints.)"""

    def __len__(self) -> int:
        value = value_of(self)
        if reads_data(self) and not isinstance(value, torch.Size) and is_python_value(value):
            raise fx.proxy.TraceError("len() of a traced list that depends on tensor data")
        length = len(value)
        self.tracer.specialize(self.node, "len", length)
        return length


def specialization(node: fx.Node, what: str, value: Any) -> dict:
    """A report entry: where the trace used an example value as a constant, and which."""
    return {"reason": "shape_specialised", "node": node.name, "use": what, "value": repr(value)[:60],
            "line": source_line(node)}


# Sizes are plain ints to torch: `torch.zeros(B, N)`, `buffer.expand(B, -1)`, `buffer[:, :n]` or
# `torch.tensor(n)` with a traced B or n never reach a proxy's `__torch_function__` and fail in torch.fx; so
# do `torch.finfo(x.dtype)` with a traced dtype and `torch._check(n <= size)` on a traced condition. While
# tracing, these record a node instead whenever an argument is traced.
_FACTORIES = ("arange", "as_tensor", "empty", "eye", "full", "linspace", "ones", "rand", "randint", "randn",
              "scalar_tensor", "tensor", "zeros", "finfo", "iinfo", "_check")
_SIZE_METHODS = ("expand", "new_empty", "new_full", "new_ones", "new_zeros", "repeat", "reshape", "tile", "view",
                 "__getitem__")


@contextlib.contextmanager
def traced_sizes(tracer: fx.Tracer) -> Iterator[None]:
    def traced(args: tuple, kwargs: dict) -> bool:
        leaves = pytree.tree_leaves((args, kwargs))
        leaves += [end for s in leaves if isinstance(s, slice) for end in (s.start, s.stop, s.step)]
        return any(isinstance(a, fx.Proxy) for a in leaves)

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
                if name == "__getitem__":  # the node torch.fx records for a proxy's own indexing
                    return tracer.create_proxy("call_function", operator.getitem, (self, *args), kwargs)
                return tracer.create_proxy("call_method", name, (self, *args), kwargs)
            return fn(self, *args, **kwargs)
        return call

    # torch._dynamo records torch.finfo and torch.iinfo as constant types when first imported, and torch.overrides
    # caches its tables of torch functions and tensor methods when first asked: the originals, not the wrappers
    # (a cached wrapper would hold the tracer, and with it the traced copy of the model, for the process's life).
    import torch._dynamo  # noqa: F401
    for table in (torch.overrides.get_ignored_functions, torch.overrides.get_testing_overrides,
                  torch.overrides.get_overridable_functions, torch.overrides._get_tensor_methods):
        table()

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
