"""Mask-flow rules as data: one entry per canonical op, dispatched by `rule_for(node)`.

`@mask_rule(keys...)` registers a rule for module classes (matched exactly), functions and method
names. Functions and methods are canonicalised first (`torch.add`, `operator.add` and `"add"` are one
op kind). A second rule for the same key is an error. Ops without a rule are unknown: all ones, and a
report entry.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import maps
from .maps import UnitMap
from .concrete import thaw
from .shapes import TensorSpec


@dataclass(frozen=True)
class Rule:
    id: str
    fn: Callable[["RuleContext"], Any]
    # "remask": the op breaks zeros per element (norms); hatify re-applies the input's masks after it,
    # so its output keeps the input's map exactly.
    remask: bool = False


RULES: dict[Any, Rule] = {}

# Canonical op kinds for functions and methods: every alias maps to one name. Functions that share a
# method's name but not its meaning get their own name first (F.unfold is im2col, Tensor.unfold a view).
_ALIASES: dict[Any, str] = {F.unfold: "im2col", F.fold: "col2im"}


def _canon(key: Any) -> Any:
    if isinstance(key, str):
        name = key[:-1] if key.endswith("_") and not key.startswith("__") else key
        return {"__add__": "add", "__iadd__": "add", "__radd__": "add", "__mul__": "mul", "__rmul__": "mul",
                "__sub__": "sub", "__rsub__": "rsub", "__truediv__": "div", "__matmul__": "matmul",
                "__getitem__": "getitem", "true_divide": "div", "multiply": "mul", "subtract": "sub",
                "concat": "cat", "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose",
                "moveaxis": "movedim", "absolute": "abs", "negative": "neg", "clip": "clamp",
                "divide": "div", "truediv": "div", "iadd": "add", "imul": "mul", "isub": "sub",
                "itruediv": "div", "matrix_multiply": "matmul"}.get(name, name)
    return _ALIASES.get(key, key)


def _function_aliases() -> None:
    """Map torch, torch.nn.functional, Tensor and operator spellings of an op onto its method name."""
    for name in dir(operator):
        if not name.startswith("_"):
            _ALIASES.setdefault(getattr(operator, name), _canon(name))
    for namespace in (torch, F, torch.Tensor, torch.special):
        for name in dir(namespace):
            fn = getattr(namespace, name, None)
            if callable(fn) and not isinstance(fn, type) and not name.startswith("_"):
                try:
                    _ALIASES.setdefault(fn, _canon(name))
                except TypeError:  # unhashable
                    pass


_function_aliases()


def canonical_key(node: fx.Node, module: nn.Module | None = None) -> Any:
    if node.op == "call_module":
        return type(module)
    return _canon(node.target)


def mask_rule(*keys: Any, remask: bool = False) -> Callable:
    """Register `fn` as the mask-flow rule of `keys` (module classes, functions or method names)."""
    def register(fn: Callable) -> Callable:
        for key in keys:
            canon = key if isinstance(key, type) else _canon(key)
            if canon in RULES:
                raise ValueError(f"a mask rule for {key!r} is already registered ({RULES[canon].id})")
            RULES[canon] = Rule(fn.__name__, fn, remask)
        return fn
    return register


def rule_for(node: fx.Node, module: nn.Module | None = None) -> Rule | None:
    return RULES.get(canonical_key(node, module))


class RuleContext:
    """What a rule sees: the node, the maps and specs of its inputs, and its output spec."""

    def __init__(self, node: fx.Node, flows: dict, module: nn.Module | None, max_terms: int,
                 memo: dict | None = None) -> None:
        self.node, self._flows, self.module, self.max_terms = node, flows, module, max_terms
        self.out = node.meta.get("hat_spec")
        self.memo = {} if memo is None else memo  # results of checks run on example tensors, shared by one analysis

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default) if name else default

    def flow(self, a: Any) -> Any:
        return self._flows.get(a) if isinstance(a, fx.Node) else None

    @staticmethod
    def spec(a: Any) -> Any:
        return a.meta.get("hat_spec") if isinstance(a, fx.Node) else a

    def is_tensor(self, a: Any) -> bool:
        return isinstance(self.spec(a), TensorSpec)

    def map_of(self, a: Any) -> UnitMap:
        flow = self.flow(a)
        return flow if isinstance(flow, UnitMap) else UnitMap.ones()

    def tensor_inputs(self) -> list[fx.Node]:
        return [n for n in self.node.all_input_nodes if self.is_tensor(n)]

    def call(self, args: tuple, kwargs: dict) -> Any:
        node, args, kwargs = self.node, thaw(args), thaw(kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------- rules

def _fits(unit_map: UnitMap, ctx: RuleContext, source: Any) -> UnitMap:
    """Keep a map through an op that preserves zeros per channel but may resize other axes: valid when
    the map only varies along axes the op leaves alone."""
    out, src = ctx.out, ctx.spec(source)
    if not isinstance(out, TensorSpec) or not isinstance(src, TensorSpec) or out.ndim != src.ndim:
        return UnitMap.ones() if not unit_map.is_ones else unit_map
    for term in unit_map.terms:
        t_shape = (1,) * (out.ndim - term.ndim) + tuple(term.shape)
        for d, size in enumerate(t_shape):
            if size != 1 and (src.shape[d] != out.shape[d]):
                return UnitMap.ones()
    return unit_map


def _keeps_zero(ctx: RuleContext, src: Any) -> bool:
    """Run the op on an all-zero input, every other tensor argument filled with +1 and then with -1: zero
    must come out. Catches arguments that move zero (clamp(min=0.1), Hardtanh(0.1, 1), ...). Ops alike in all
    the result depends on (see `_zero_check_key`) are run once per analysis."""
    spec = ctx.spec(src)
    if not isinstance(spec, TensorSpec):
        return False
    key = _zero_check_key(ctx, src)
    if key is None:
        return _zero_kept(ctx, src)
    if key not in ctx.memo:
        ctx.memo[key] = _zero_kept(ctx, src)
    return ctx.memo[key]


def _zero_check_key(ctx: RuleContext, src: Any) -> Any:
    """The op (a module's type and settings), and every argument's spec or value with the zero input marked;
    None where a module holds tensors, submodules or hooks, or an argument cannot be compared."""
    node, module = ctx.node, ctx.module
    if module is not None and any(value for name, value in vars(module).items() if name.startswith("_")):
        return None
    op = (node.op, node.target) if module is None else \
        (type(module), tuple((name, value) for name, value in vars(module).items() if not name.startswith("_")))
    key = (op, fx.node.map_arg((node.args, node.kwargs), lambda n: (n is src, ctx.spec(n))))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _zero_kept(ctx: RuleContext, src: Any) -> bool:
    # the fills matter only for other tensor arguments: without any, one run tells
    others = any(n is not src and isinstance(ctx.spec(n), TensorSpec) for n in ctx.node.all_input_nodes)
    for fill in (1.0, -1.0) if others else (1.0,):
        def value(n: fx.Node, fill: float = fill) -> Any:
            s = ctx.spec(n)
            if not isinstance(s, TensorSpec):
                return s
            return torch.zeros(s.shape, dtype=s.dtype) if n is src else torch.full(s.shape, fill).to(s.dtype)
        try:
            with torch.no_grad():
                out = ctx.call(tuple(fx.node.map_arg(ctx.node.args, value)),
                               dict(fx.node.map_arg(ctx.node.kwargs, value)))
        except Exception:  # cannot be checked: not zero-preserving as far as hatify knows
            return False
        values = pytree.tree_leaves(out)[0]  # pooling with indices: the values come first
        if not isinstance(values, torch.Tensor) or bool(values.any()):
            return False
    return True


def _per_element(ctx: RuleContext) -> Any:
    """The input's map, for an op that maps zero to zero; pooling with indices also returns the indices,
    which are no data."""
    src = ctx.arg(0, "input")
    if not _keeps_zero(ctx, src):
        return (UnitMap.ones(), None) if isinstance(ctx.out, tuple) else UnitMap.ones()
    kept = _fits(ctx.map_of(src), ctx, src)
    return (kept, None) if isinstance(ctx.out, tuple) else kept


@mask_rule(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
           nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softsign,
           nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.CELU, nn.SELU, nn.PReLU, nn.RReLU,
           nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
           "relu", "relu6", "gelu", "silu", "hardswish", "tanh", "dropout", "dropout1d", "dropout2d", "dropout3d",
           "alpha_dropout", "feature_alpha_dropout", "leaky_relu", "elu", "mish", "hardtanh", "celu", "selu",
           "prelu", "rrelu", "softsign", "softshrink", "hardshrink", "tanhshrink",
           "contiguous", "clone", "detach", "float", "half", "bfloat16",
           "double", "to", "type", "type_as", "abs", "neg", "sqrt", "square", "sign", "normalize", "nan_to_num",
           "clamp", "clamp_min", "clamp_max", "sin", "tan", "arctan", "atan",
           "arcsinh", "asinh", "erf", "sinh", "expm1", "log1p", "trunc", "round")
def passthrough(ctx: RuleContext) -> Any:
    """Zero in, zero out, per element (activations, dropout, casts), checked on the op's own arguments."""
    return _per_element(ctx)


def _zero_pattern_kept(module: nn.Module, spec: TensorSpec, extra: tuple, kwargs: dict) -> bool:
    """Run `module` in train and in eval mode on random inputs with random zeros: every zero input element
    must give a zero output element. The global RNG is left as it was (drop path draws from it), and the module
    runs as a copy: a module that updates its own state in training (a running mean) must not see the probe."""
    from .copying import detached_deepcopy

    try:
        module = detached_deepcopy(module)
        with torch.random.fork_rng(), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for training in (True, False, True):
                module.train(training)
                x = torch.randn(spec.shape, generator=gen) * (torch.rand(spec.shape, generator=gen) > 0.5)
                out = module(x.to(spec.dtype), *extra, **kwargs)
                if not isinstance(out, torch.Tensor) or out.shape != x.shape or bool(out[x == 0].ne(0).any()):
                    return False
    except Exception:  # cannot be checked: not zero-preserving as far as hatify knows
        return False
    return True


def zero_probe(ctx: RuleContext) -> UnitMap:
    """A parameter-free leaf module without a rule (drop path / stochastic depth kept whole because it reads
    `self.training`, a user's leaf): when zeros stay zero element by element in train and eval mode, on
    random zero patterns, the output keeps the input's map; otherwise all ones."""
    src = ctx.arg(0, "input")
    spec, others = ctx.spec(src), [n for n in ctx.tensor_inputs() if n is not src]
    if not isinstance(spec, TensorSpec) or others or not isinstance(ctx.out, TensorSpec) \
            or ctx.out.shape != spec.shape or not spec.dtype.is_floating_point:
        return UnitMap.ones()
    if not _zero_pattern_kept(ctx.module, spec, tuple(ctx.spec(a) for a in ctx.node.args[1:]),
                              {k: ctx.spec(v) for k, v in ctx.node.kwargs.items()}):
        return UnitMap.ones()
    return ctx.map_of(src)


_ZERO_PROBE = Rule("zero_probe", zero_probe)


def fallback_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule for an op without a registered one: the zero probe for a parameter-free leaf module."""
    if node.op == "call_module" and module is not None and not any(True for _ in module.parameters()):
        return _ZERO_PROBE
    return None


_WINDOW_OPS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
               nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
               nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
               "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
               "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "max_pool2d_with_indices",
               "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")


def _window_axes(ctx: RuleContext, ndim: int) -> range:
    """The trailing axes a window op mixes: as many as its name says (`max_pool2d`: 2), else every axis after
    batch and channels (`interpolate`)."""
    key = canonical_key(ctx.node, ctx.module)
    name = key.__name__ if isinstance(key, type) else str(key)
    dims = next((d for d in (1, 2, 3) if f"{d}d" in name), ndim - 2)
    return range(ndim - dims, ndim)


@mask_rule(*_WINDOW_OPS)
def window(ctx: RuleContext) -> Any:
    """Pooling and resampling: zero in, zero out per channel, but each output position mixes a window of
    input positions, so the map is kept only when it is the same at every position of the window axes."""
    src, spec = ctx.arg(0, "input"), ctx.spec(ctx.arg(0, "input"))
    if isinstance(spec, TensorSpec):
        for term in ctx.map_of(src).terms:
            shape = (1,) * (spec.ndim - term.ndim) + tuple(term.shape)
            if any(shape[d] != 1 for d in _window_axes(ctx, spec.ndim)):
                return (UnitMap.ones(), None) if isinstance(ctx.out, tuple) else UnitMap.ones()
    return _per_element(ctx)


@mask_rule("pad", nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
def pad(ctx: RuleContext) -> UnitMap:
    value = ctx.module.value if ctx.module is not None else ctx.arg(3, "value", 0)
    mode = ctx.arg(2, "mode", "constant") if ctx.module is None else "constant"
    if mode != "constant" or (value or 0) != 0:
        return UnitMap.ones()
    return _fits(ctx.map_of(ctx.arg(0, "input")), ctx, ctx.arg(0, "input"))


_DATA_LIST_OPS = {"cat", "stack", "hstack", "vstack", "dstack"}


@mask_rule(nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
           "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze",
           "expand", "getitem", "split", "chunk", "unbind", "tensor_split", "movedim", "narrow",
           "repeat", "repeat_interleave", "tile", "flip", "roll", "select", "pixel_shuffle", "pixel_unshuffle",
           "channel_shuffle", "native_channel_shuffle", "view_as", "reshape_as", "expand_as", "split_with_sizes",
           "unfold", "diagonal", "T", "mT", "cat", "stack", "hstack", "vstack", "dstack")
def layout(ctx: RuleContext) -> Any:
    """Data movement: run the very same op on the index maps."""
    node, data = ctx.node, ctx.arg(0, "input")
    if _canon(node.target) in _DATA_LIST_OPS and node.op != "call_module":
        data = ctx.arg(0, "tensors")
    data_nodes = list(data) if isinstance(data, (list, tuple)) else [data]
    if not all(isinstance(n, fx.Node) for n in data_nodes):
        return UnitMap.ones()
    # A tensor elsewhere in the arguments (index tensors, `expand_as` targets) is used only for its shape.
    others = [n for n in node.all_input_nodes if n not in data_nodes]
    if any(ctx.is_tensor(n) and _canon(node.target) not in ("view_as", "reshape_as", "expand_as") for n in others):
        return UnitMap.ones()
    specs = [ctx.spec(n) for n in data_nodes]
    if not all(isinstance(s, TensorSpec) for s in specs):
        if node.target is operator.getitem:  # indexing a tuple or list: pick the element's flow
            return _pick(ctx.flow(data), ctx.arg(1))
        return UnitMap.ones()

    def run(terms: list[torch.Tensor]) -> Any:
        lookup = dict(zip(data_nodes, terms))

        def value(n: fx.Node) -> Any:
            if n in lookup:
                return lookup[n]
            s = ctx.spec(n)
            return torch.empty(s.shape, dtype=torch.long) if isinstance(s, TensorSpec) else s
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        return ctx.call(tuple(args), dict(kwargs))

    return maps.apply_layout(run, [ctx.map_of(n) for n in data_nodes], [s.shape for s in specs], ctx.max_terms)


@mask_rule("im2col")
def im2col(ctx: RuleContext) -> UnitMap:
    """F.unfold: (N, C, H, W) -> (N, C * kernel positions, L), channel-major. A map that is the same at every
    spatial position repeats each channel's units over its kernel positions (zero padding is zero anyway)."""
    src, out = ctx.arg(0, "input"), ctx.out
    spec = ctx.spec(src)
    if not isinstance(spec, TensorSpec) or not isinstance(out, TensorSpec) or spec.ndim < 3:
        return UnitMap.ones()
    kernel = out.shape[-2] // spec.shape[-3]
    terms = []
    for term in ctx.map_of(src).terms:
        term = term.reshape((1,) * (spec.ndim - term.ndim) + tuple(term.shape))
        if term.shape[-1] != 1 or term.shape[-2] != 1:
            return UnitMap.ones()
        per_channel = term.flatten(-3)
        if per_channel.shape[-1] != 1:
            per_channel = per_channel.repeat_interleave(kernel, dim=-1)
        terms.append(per_channel.unsqueeze(-1))
    return maps.normalise(terms, ctx.max_terms)


def _pick(flow: Any, index: Any) -> Any:
    if isinstance(flow, (tuple, list)) and isinstance(index, (int, slice)):
        return flow[index]
    return UnitMap.ones()


@mask_rule("add", "sub", "rsub", "where", "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul", "addcdiv")
def elementwise_union(ctx: RuleContext) -> UnitMap:
    """Zero only where every tensor operand is zero: the union of their maps. A non-zero scalar or a
    non-zero `alpha` term makes the result unknown."""
    kind = _canon(ctx.node.target)
    # Keyword operands count as much as positional ones (`torch.add(a, other=b)`); `alpha` only scales one.
    operands = [a for i, a in enumerate(ctx.node.args) if not (kind == "where" and i == 0)]
    operands += [v for k, v in ctx.node.kwargs.items() if k not in ("condition", "alpha", "out")]
    for a in operands:
        if isinstance(a, (int, float)) and a != 0:
            return UnitMap.ones()
    tensors = [a for a in operands if ctx.is_tensor(a)]
    return maps.union([ctx.map_of(a) for a in tensors], ctx.max_terms)


@mask_rule("mul", "div", "floordiv", "floor_divide", "fmod", "remainder", "mod", "bitwise_and", "logical_and")
def product(ctx: RuleContext) -> UnitMap:
    """Zero wherever the first factor is zero (and for mul, wherever any factor is): one factor's map is
    exact enough and sound; prefer a known one. Broadcasting against the other operand is respected."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    kind = _canon(ctx.node.target)
    candidates = [a, b] if kind == "mul" else [a]
    known = [c for c in candidates if ctx.is_tensor(c) and not ctx.map_of(c).is_ones]
    if not known:
        return UnitMap.ones()
    out = ctx.out
    for c in known:
        unit_map = ctx.map_of(c)
        if isinstance(out, TensorSpec) and unit_map.broadcastable_to(out.shape):
            return unit_map
    return UnitMap.ones()


@mask_rule("matmul", "bmm", "mm")
def matmul(ctx: RuleContext) -> UnitMap:
    """out[..., i, k] = sum_j a[..., i, j] b[..., j, k]: zero when b's column k is zero for every j (b's
    map constant along j), or when a's row i is zero for every j."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other", ctx.node.kwargs.get("mat2"))
    sa, sb, out = ctx.spec(a), ctx.spec(b), ctx.out
    if not (isinstance(sa, TensorSpec) and isinstance(sb, TensorSpec) and sa.ndim >= 2 and sb.ndim >= 2):
        return UnitMap.ones()
    for unit_map, contract in ((ctx.map_of(b), -2), (ctx.map_of(a), -1)):
        if unit_map.is_ones or any(t.ndim >= -contract and t.shape[contract] != 1 for t in unit_map.terms):
            continue
        if unit_map.broadcastable_to(out.shape):
            return unit_map
    return UnitMap.ones()


@mask_rule("scaled_dot_product_attention")
def attention(ctx: RuleContext) -> UnitMap:
    """softmax(q k^T) v: the output's channels follow v when v's map is the same for every token."""
    v = ctx.arg(2, "value")
    unit_map = ctx.map_of(v)
    if unit_map.is_ones or any(t.ndim >= 2 and t.shape[-2] != 1 for t in unit_map.terms):
        return UnitMap.ones()
    return unit_map if unit_map.broadcastable_to(ctx.out.shape) else UnitMap.ones()


@mask_rule("mean", "sum", "amax", "amin", "nansum", "nanmean")
def reduce(ctx: RuleContext) -> UnitMap:
    """A reduction over some axes is exactly zero where every element it reduces is: the union, over the reduced
    positions, of their maps (the map itself where it is constant along those axes)."""
    src, out = ctx.spec(ctx.arg(0, "input")), ctx.out
    unit_map = ctx.map_of(ctx.arg(0, "input"))
    if unit_map.is_ones or not isinstance(src, TensorSpec) or not isinstance(out, TensorSpec):
        return UnitMap.ones()
    dims = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    if dims is None:
        return UnitMap.ones()
    dims = sorted({d % src.ndim for d in ((dims,) if isinstance(dims, int) else dims)})
    kept = [d for d in range(src.ndim) if d not in dims]
    terms = []
    for t in unit_map.terms:
        t = t.reshape((1,) * (src.ndim - t.ndim) + tuple(t.shape))
        # one term per reduced position: (positions, kept axes...), the reduced axes then size 1 or gone
        slices = t.permute(*dims, *kept).reshape(-1, *(t.shape[d] for d in kept))
        if keepdim:
            slices = slices.reshape(slices.shape[0], *(1 if d in dims else t.shape[d] for d in range(src.ndim)))
        terms += list(slices)
        if len(terms) > 4 * ctx.max_terms:  # normalise drops duplicates; give up before stacking a huge union
            return UnitMap(truncated=True)
    return maps.normalise(terms, ctx.max_terms)


@mask_rule(nn.Softmax, nn.LogSoftmax, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Softmin, nn.LogSigmoid,
           "softmax", "log_softmax", "sigmoid", "hardsigmoid", "softplus", "exp", "log", "cos", "cosh", "acos",
           "arccos", "softmin", "logsigmoid", "reciprocal", "rsqrt", "exp2", "pow", "einsum",
           "baddbmm", "addmm", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "logsumexp",
           "cumsum", "var", "std", "norm")
def unknown_by_design(ctx: RuleContext) -> UnitMap:
    """Zeros are not preserved (sigmoid(0) = 0.5, softmax, exp): the result is all ones, knowingly."""
    return UnitMap.ones()


_TORCH_NORMS = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
                *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
                "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]
NORM_MODULES: set[type] = set()
# Per-channel ops after which a producer's mask may be applied (no mixing across channels).
PER_CHANNEL_MODULES: set[type] = set()


def norm(ctx: RuleContext) -> UnitMap:
    """Normalisation: zeros are not kept, so hatify re-applies the input's masks right after the norm;
    with that, the output's map is the input's."""
    src = ctx.arg(0, "input")
    return _fits(ctx.map_of(src), ctx, src)


def _register_norms(keys: list) -> None:
    mask_rule(*keys, remask=True)(norm)
    for key in keys:
        if isinstance(key, type):
            NORM_MODULES.add(key)
            MODULE_LEAVES.add(key)
            if "Batch" in key.__name__:
                PER_CHANNEL_MODULES.add(key)


_timm_registered = False


def register_timm_rules() -> None:
    """timm's norm and norm+act classes (matched exactly). Registered once timm is in use: a model can only
    hold timm layers if timm was imported, and importing it costs seconds that hatify alone need not pay."""
    global _timm_registered
    if _timm_registered or "timm" not in sys.modules:
        return
    _timm_registered = True
    from timm.layers import norm as timm_norm, norm_act

    keys = [cls for name, cls in vars(norm_act).items() if isinstance(cls, type) and issubclass(cls, nn.Module)
            and cls.__module__ == norm_act.__name__ and "Norm" in name]
    keys += [getattr(timm_norm, n) for n in ("LayerNorm", "LayerNorm2d", "LayerNormFp32", "LayerNorm2dFp32",
                                             "GroupNorm", "GroupNorm1", "RmsNorm", "RmsNorm2d", "SimpleNorm",
                                             "SimpleNorm2d", "RmsNormFp32", "RmsNorm2dFp32")
             if hasattr(timm_norm, n)]
    _register_norms(list(dict.fromkeys(k for k in keys if k not in RULES)))


MODULE_LEAVES: set[type] = {k for k in RULES if isinstance(k, type)}
_register_norms(_TORCH_NORMS)
