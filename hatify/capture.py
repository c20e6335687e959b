"""Stage 1, capture: trace the model into a torch.fx graph, falling back to opaque leaves."""
from __future__ import annotations

import collections
import functools
import inspect
import linecache
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import methods as opaque_methods
from .attention import DECOMPOSED_MODULES, add_attention_dropout, traced_attention
from .checks import called_value, traced_checks
from .concrete import (DATA, MISSING, PROXIES, VALUE, evaluate, is_python_value, proxy_class, reads_data,
                       specialization, traced_sizes, value_of, wrapped_calls)
from .config import HATConfig
from .copying import detached_deepcopy
from .einsum import linear_einsums
from .errors import _OWN_DIR, HatifyError
from .inputs import CONSTANTS, KEYWORD, Inputs, StructuredOutput, is_constant, needs_spec
from .naming import aliases
from .parametrized import flatten_parametrization_paths, hold_row_coupling_norms, traced_through
from .shapes import SPEC, spec_of


@dataclass
class Capture:
    """The traced copy of the model. `opaque` maps a module path to why it could not be traced through;
    `specialized` lists where Python control flow was resolved at the example inputs' shapes."""

    graph_module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)
    mode_leaves: list[str] = field(default_factory=list)
    specialized: list[dict] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)   # alias -> the user's top-level name (hatify.naming)


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


# torch.nn modules made of ops hatify has rules for: traced into (torch.fx keeps every torch.nn module whole),
# so their projections become HAT layers instead of one opaque per-task copy.
TRACED_TORCH_MODULES: set[type] = {*DECOMPOSED_MODULES, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                                   nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer}


class HatTracer(fx.Tracer):
    """torch.fx tracer that keeps the rule registry's module types whole and turns a submodule that cannot
    be traced into an opaque leaf instead of failing the model.

    With `inputs` (forward argument name -> example value) it traces concretely: every node carries its
    example value, and control flow on shapes is resolved at those shapes (see `hatify.concrete`)."""

    def __init__(self, leaf_types: set, leaf_names: set, autowrap: tuple, inputs: dict | None = None,
                 call: tuple[int, dict] | None = None) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.call = call  # (number of positional inputs, constant keyword arguments): trace the call as made
        self.out_spec: pytree.TreeSpec | None = None
        self.record_stack_traces = False  # `create_node` records the model's own frames instead
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.inputs = inputs
        self.opaque: dict[str, str] = {}
        self.mode_leaves: list[str] = []
        self.specialized: list[dict] = []
        self._attr_cache: dict | None = None
        self._evaluating = False

    # ------------------------------------------------------------------------------ concrete values
    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self.inputs is None:
            return super().proxy(node)
        return proxy_class(value_of(node))(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if self.inputs is not None and (value := called_value(kind, target, args)) is not None:
            return value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.inputs is not None and kind in ("call_function", "call_method") and value_of(proxy) is None \
                and not getattr(target, "__name__", "").startswith(("_assert", "_check")):
            # An optional result that is absent (a leaf's `None` output, a slot of a returned tuple): the
            # model branches on `is None`, which a proxy would always fail.
            self.specialize(proxy.node, "none", None)
            return None
        return proxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.stack_trace = node.stack_trace or _model_frames()
        if self.inputs is not None and kind != "output":
            self._evaluating = True  # the replay runs eagerly: no module call or attribute read is traced
            try:
                node.meta[VALUE] = evaluate(node, self.root, self.inputs)
            finally:
                self._evaluating = False
        return node

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = value_of(obj)
        if self.inputs is None or value is MISSING or not is_python_value(value) or reads_data(obj):
            return super().to_bool(obj)
        self.specialize(obj.node, "bool", value)
        return bool(value)

    def iter(self, obj: fx.Proxy):
        value = value_of(obj)
        if self.inputs is not None and isinstance(value, (dict, type({}.keys()))) \
                and all(is_python_value(k) for k in value):
            # `"masks" in prediction`, `for key in outputs`, `losses.update(found)`: iterate the keys
            self.specialize(obj.node, "keys", tuple(value))
            return iter(list(value))
        if self.inputs is None or not isinstance(value, (tuple, list)) or (
                reads_data(obj) and is_python_value(value) and not isinstance(value, torch.Size)):
            return super().iter(obj)  # a list of numbers read from tensor data (`.tolist()`) is no constant
        self.specialize(obj.node, "iter", len(value))
        return iter([obj[i] for i in range(len(value))])

    def specialize(self, node: fx.Node, what: str, value) -> None:
        self.specialized.append(specialization(node, what, value))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in self.leaf_types or qualname in self.leaf_names or qualname in self.opaque:
            return True
        if type(m) in TRACED_TORCH_MODULES or traced_through(m, qualname):
            return False
        if not type(m).__module__.startswith("torch.nn") and _reads_training_flag(m):
            if qualname not in self.mode_leaves:
                self.mode_leaves.append(qualname)
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        self._attr_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        try:
            qualname = self.path_of_module(m)
        except NameError:  # a module made inside forward (`nn.ReLU()(x)`, a kernel layer): trace its ops inline
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        if type(m) in DECOMPOSED_MODULES:
            forward = functools.partial(DECOMPOSED_MODULES[type(m)], m)
        last = self.graph._root.prev
        stack, calls = collections.OrderedDict(self.module_stack), dict(self.num_calls)
        before = _attributes(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # any failure inside: this submodule becomes an opaque leaf
            _restore_traced_attributes(before)
            self._rollback(last)
            self.module_stack, self.num_calls = stack, calls
            for inner in [name for name in self.opaque if name.startswith(qualname + ".")]:
                del self.opaque[inner]  # now inside this leaf
            self.opaque[qualname] = untraceable(exc)
            return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """With a recorded call, the root's forward is called exactly as the user calls it, `forward(*args,
        **kwargs)` with one placeholder per given input: decorated forwards (`wrapper(self, *args, **kwargs)`)
        and `**kwargs` signatures work, and every argument left out keeps its default. The output is
        flattened; `out_spec` rebuilds its structure (an HF `ModelOutput` stays one)."""
        if self.call is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        positional, constants = self.call
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in self.inputs]
        names = list(self.inputs)

        def call_root(root: nn.Module, *values: Any) -> Any:
            keywords = dict(zip(names[positional:], values[positional:]))
            out = root_fn(root, *values[:positional], **keywords, **constants)
            leaves, spec = pytree.tree_flatten(out)
            for path, leaf in pytree.tree_flatten_with_path(out)[0]:
                if not isinstance(leaf, fx.Proxy) and not is_constant(leaf) and not isinstance(leaf, torch.Tensor):
                    raise HatifyError(
                        f"the output {pytree.keystr(path) or ''} is a {type(leaf).__name__}, which a traced graph "
                        "cannot return: leave it out of the output (a transformers model: pass use_cache=False "
                        "with the example inputs)")
            if needs_spec(spec):
                self.out_spec = spec
                return tuple(leaves)
            return out

        return call_root, [self.root, *proxies]
    def trace_through(self, fn, args: tuple, kwargs: dict) -> tuple[bool, object]:
        """A function marked with `torch.fx.wrap` is one opaque node to torch.fx, marked so for its shape
        branches, which concrete values resolve. Handed a tensor, its body is traced instead, so the layers it
        hides become HAT layers (torchvision's Swin window attention calls `F.linear` on its `qkv_weight`)
        and its data movement gets rules. A tracer's autowrap function (timm's no-trace helpers) is traced
        through only when handed a parameter. If tracing fails, the graph is rolled back and the call stays
        one node, as torch.fx makes it. Returns (traced, result)."""
        values = [value_of(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
        wanted = any(isinstance(v, nn.Parameter) for v in values) or (
            id(fn) not in self._autowrap_function_ids and any(isinstance(v, torch.Tensor) for v in values))
        if self.inputs is None or not wanted:
            return False, None
        last = self.graph._root.prev
        try:
            return True, fn(*args, **kwargs)
        except Exception:  # torch.fx's own behaviour: one opaque node
            self._rollback(last)
            return False, None

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with traced_sizes(self), wrapped_calls(), traced_attention(), traced_checks():
            return super().trace(root, concrete_args)

    def _rollback(self, last: fx.Node) -> None:
        created = []
        node = last.next
        while node is not self.graph._root:
            created.append(node)
            node = node.next
        erased = set(created)
        names = {n.name for n in created}
        self.specialized = [entry for entry in self.specialized if entry["node"] not in names]
        for node in reversed(created):
            self.graph.erase_node(node)
        if self._attr_cache is not None:
            for key in [k for k, proxy in self._attr_cache.items() if proxy.node in erased]:
                del self._attr_cache[key]


def _model_frames() -> str | None:
    """The stack trace torch.fx records for a node (the frames from the outermost `forward` in, in its format),
    less the frames of torch and hatify, which `errors.source_line` skips: torch.fx formats every frame of the
    call stack, the largest Python cost of a trace; this formats the model's own frames only."""
    frames, outermost = [], None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "forward":
            outermost = len(frames)
        frames.append(frame)
        frame = frame.f_back
    if outermost is None:  # no `forward` on the stack: torch.fx records none either
        return None
    text = []
    for frame in reversed(frames[:outermost + 1]):
        path = frame.f_code.co_filename
        if "/torch/" not in path and not path.startswith(_OWN_DIR):
            code = linecache.getline(path, frame.f_lineno).strip()
            text.append(f'  File "{path}", line {frame.f_lineno}, in {frame.f_code.co_name}\n' +
                        (f"    {code}\n" if code else ""))
    return "".join(text).strip() or None


def _attributes(module: nn.Module) -> dict[nn.Module, dict]:
    return {m: {k: dict(v) if k in _SLOTS else v for k, v in vars(m).items()} for m in module.modules()}


_SLOTS = ("_parameters", "_buffers", "_modules")


def _restore_traced_attributes(before: dict[nn.Module, dict]) -> None:
    """Attributes a traced forward set to traced values (`self.cell_anchors = [a.to(x.device) ...]`) get
    their values from before the trace back: an eager replay of the module, or the graph module, must not
    see proxies."""
    for module, old in before.items():
        current = vars(module)
        for table, saved in [(current, old), *((current[k], old.get(k, {})) for k in _SLOTS if k in current)]:
            for key in [k for k, v in table.items() if _holds_proxy(v)]:
                if key in saved and not _holds_proxy(saved[key]):
                    table[key] = saved[key]
                else:
                    del table[key]


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    return isinstance(value, (tuple, list, dict)) and len(value) > 0 and \
        any(isinstance(v, fx.Proxy) for v in pytree.tree_leaves(value))  # (most are empty hook tables)


def untraceable(exc: BaseException) -> str:
    """Stable reason code, the failure, and the model's source line where tracing stopped."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith(_OWN_DIR)]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"untraceable{where}: {type(exc).__name__}: {text}"


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


def capture(model: nn.Module, config: HATConfig, leaf_types: set,
            example_inputs: Inputs | tuple | int | None = None) -> Capture:
    """Trace a deep copy of `model` (the original is never modified). Given the example inputs themselves (not
    only their number) the model is traced as it is called, `model(*args, **kwargs)`, with one placeholder per
    given input (arguments left out keep their defaults), and the trace is concrete: shape-dependent control
    flow is resolved at their shapes, so timm's no-trace modules are traced through (each still falls back to
    an opaque leaf if it fails). timm's wrapped helper functions stay single nodes (they call int() on sizes,
    which a traced size refuses). Forward arguments after a bare number of inputs are traced at their defaults.

    Example:
        >>> cap = capture(nn.Sequential(nn.Linear(4, 3)), HATConfig(), set(), (torch.randn(2, 4),))
        >>> [n.op for n in cap.graph_module.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise HatifyError(f"hatify needs an nn.Module, got {type(model).__name__}")
    renamed = aliases([*model._modules, *model._parameters, *model._buffers], _reserved_names())
    timm_leaves, autowrap = _timm_notrace()
    if not isinstance(example_inputs, int) and example_inputs is not None:
        timm_leaves = set()  # concrete values resolve the shape branches these modules are listed for
    extra_types = {m for m in config.leaf_modules if isinstance(m, type)}
    extra_names = {m for m in config.leaf_modules if isinstance(m, str)}
    methods: list[tuple[str, str]] = []  # methods traced as one opaque call, found by failed attempts
    reasons: dict[str, str] = {}
    while True:
        root = detached_deepcopy(model).eval()
        add_attention_dropout(root)
        inputs = call = None
        if not isinstance(example_inputs, int) and example_inputs is not None:
            given = Inputs.of(example_inputs)
            inputs = dict(zip(given.names(root), given.flat))
            call = (len(given.args), {**{k: v for k, v in (config.concrete_args or {}).items() if k not in inputs},
                                      **given.constants})
        opaque_methods.install(root, methods)
        tracer = HatTracer(leaf_types | timm_leaves | extra_types, extra_names, autowrap, inputs, call)
        concrete = None if call else {**_defaults_beyond(model, example_inputs), **(config.concrete_args or {})}
        before = _attributes(root)
        try:
            graph = tracer.trace(root, concrete_args=concrete or None)
            break
        except HatifyError:
            raise
        except Exception as exc:
            found = opaque_methods.failing_method(exc, root) if inputs is not None else None
            if found is not None and found not in methods:
                methods.append(found)
                reasons[opaque_methods.label(*found)] = untraceable(exc)
                continue
            raise HatifyError(
                f"{type(model).__name__}.forward cannot be traced by torch.fx even with opaque-leaf and "
                f"opaque-method fallbacks ({untraceable(exc).removeprefix('untraceable ')}). Move the "
                "data-dependent control flow into a submodule, or pass HATConfig(concrete_args=...) for the "
                "arguments it branches on.") from exc
        finally:
            _restore_traced_attributes(before)
            for node in tracer.graph.nodes if getattr(tracer, "graph", None) is not None else ():
                value = node.meta.pop(VALUE, MISSING)  # example activations and parameters must not ride along
                if value is not MISSING:  # their specs do: the shape stage need not run the model again
                    node.meta[SPEC] = spec_of(value)
                node.meta.pop(DATA, None)
                node.meta.pop(PROXIES, None)
    if call:
        for node in graph.nodes:
            if node.op == "placeholder" and list(inputs).index(node.target) >= call[0]:
                node.meta[KEYWORD] = True
    if tracer.out_spec is not None:
        graph.set_codegen(StructuredOutput(tracer.out_spec))
    _anchor_metadata_reads(root, graph)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)  # a read only Python looked at (`isinstance(self.wo.weight, Tensor)`): no data use
    _use_aliases(root, graph, renamed)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    tracer.root = None  # the tracer sits in reference cycles (its proxies): the traced copy goes with its last use
    flatten_parametrization_paths(gm)
    hold_row_coupling_norms(gm)
    linear_einsums(gm)
    gm.meta[CONSTANTS] = dict(call[1]) if call else {}
    to_alias = lambda name: _aliased(name, {u: a for a, u in renamed.items()})
    return Capture(gm, {to_alias(k): v for k, v in {**tracer.opaque, **reasons}.items()},
                   [to_alias(n) for n in tracer.mode_leaves], list(tracer.specialized), renamed)


def _reserved_names() -> set[str]:
    """Attribute names of a GraphModule (class and instance) and of the converted model's own submodules."""
    empty = fx.GraphModule(nn.Module(), fx.Graph())
    return set(dir(fx.GraphModule)) | set(vars(empty)) | {"meta", "graph", "code", "hat_masks", "hat_gates",
                                                          "hat_root_params"}


def _aliased(name: str, to_alias: dict[str, str]) -> str:
    head, dot, rest = name.partition(".")
    return f"{to_alias[head]}{dot}{rest}" if head in to_alias else name


def _use_aliases(root: nn.Module, graph: fx.Graph, renamed: dict[str, str]) -> None:
    """Top-level names the GraphModule cannot hold (`meta`, `graph`, `code`, ...): the graph reads the module,
    parameter or buffer under its alias (see `hatify.naming`); `root` is the traced copy, so it may hold both."""
    to_alias = {user: alias for alias, user in renamed.items()}
    for alias, user in renamed.items():
        for table in (root._modules, root._parameters, root._buffers):
            if user in table:
                table[alias] = table[user]
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = _aliased(node.target, to_alias)


_METADATA = ("dtype", "device")


def _anchor_metadata_reads(root: nn.Module, graph: fx.Graph) -> None:
    """A parameter read only for its dtype or device (`x.to(self.proj.weight.dtype)`) is no data use: read
    it from an empty buffer of the same dtype and device instead, which follows `.to()` like the parameter
    and leaves the parameter to its layer (which the rewrite may wrap per task)."""
    params = dict(root.named_parameters())
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in params or not node.users or not all(
                u.op == "call_function" and u.target is getattr and u.args[1] in _METADATA for u in node.users):
            continue
        anchor = "hat_meta_" + node.target.replace(".", "_")
        if not hasattr(root, anchor):
            param = params[node.target]
            root.register_buffer(anchor, torch.empty(0, dtype=param.dtype, device=param.device), persistent=False)
        node.target = anchor
        node.meta[SPEC] = spec_of(getattr(root, anchor))
