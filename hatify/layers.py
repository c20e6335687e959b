"""Runtime modules of a converted model: the mask bank, gates, per-task copies and weight protection.

The guarantee lives in the forward computation and in module state, so it survives `copy.deepcopy`,
`load_state_dict(..., assign=True)` and wrappers:
- a masked layer's weight is read through `Protect`: each read writes the frozen values of entries used by
  earlier tasks back into the parameter, so whatever an optimizer did to them (momentum, weight decay) never
  reaches a forward; their gradient is zeroed by a hook that every training forward (re)attaches;
- a finished task's own tensors (mask embedding, norm copy, head copy, loose parameters) are turned
  from parameters into buffers, so no optimizer can move them again.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils import _pytree as pytree

from .copying import detached_deepcopy
from .errors import HatifyError
from .pending import TaskCopies


def compensated_sigmoid(e: torch.Tensor, s: float, s_max: float) -> torch.Tensor:
    """sigmoid(s * e) whose gradient to e carries HAT's compensation (Serra et al., eq. 6), in float32:
    g_e <- g_e * s_max * (cosh(clamp(s e, -50, 50)) + 1) / (s * (cosh(e) + 1)).

    Native ops only (no Python backward): z = s e + (e - e) c has the value s e exactly and the gradient
    c = s_max (cosh(clamp(s e)) + 1) / (cosh(e) + 1) to e, the compensation times s, so sigmoid's own s
    cancels against the compensation's 1 / s (and s = 0 stays finite)."""
    d = e.detach()  # (the compensation is computed from detached tensors: no graph, no `no_grad` needed)
    sd = d * s
    e32 = d.float()
    clamped = sd.clamp(-50, 50) if sd.dtype == torch.float32 else (e32 * s).clamp_(-50, 50)  # fp32: s e is sd
    c = clamped.cosh_().add_(1).div_(torch.cosh(e32).add_(1)).mul_(s_max).to(e.dtype)
    return torch.sigmoid(torch.addcmul(sd, e - d, c))


# Mask embeddings of every live MaskBank by id, clamped after any optimizer step (`_clamp_after_step`);
# the bound rides on the parameter as `_hat_clamp`.
_CLAMPED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


# Optimizer steps taken so far, by any torch optimizer. Fused and foreach kernels may write parameters without
# bumping their version counter, so Protect's eval fast path keys on this count as well.
_STEPS = [0]


def _clamp_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step moves only parameters with a gradient: those embeddings are clamped (the live ones are few, the
    optimizer's parameters may be many)."""
    _STEPS[0] += 1
    if not _CLAMPED:
        return
    with torch.no_grad():
        for p in list(_CLAMPED.values()):
            if p.grad is not None:
                p.clamp_(-p._hat_clamp, p._hat_clamp)


register_optimizer_step_post_hook(_clamp_after_step)


def freeze_parameter(module: nn.Module, name: str) -> None:
    """Turn `module.<name>` from a parameter into a buffer holding the same values. The parameter object is
    kept aside, so that `unfreeze_parameter` hands the same object back to an optimizer that holds it."""
    if module._parameters.get(name) is None:  # absent, or a declared-but-None slot (Linear(bias=False))
        return
    param = module._parameters.pop(name)
    module.register_buffer(name, param.detach().clone())
    module.__dict__.setdefault("_hat_orphans", {})[name] = param
    if hasattr(module, "_init_flat_weights"):  # RNNs cache references to their weights
        module._init_flat_weights()


def unfreeze_parameter(module: nn.Module, name: str) -> None:
    """Undo `freeze_parameter`: the buffer's values go back into a trainable parameter."""
    if name not in module._buffers:
        return
    value = module._buffers.pop(name)
    param = module.__dict__.get("_hat_orphans", {}).pop(name, None)
    if param is None or param.shape != value.shape or param.device != value.device:
        param = nn.Parameter(value.clone())
    else:
        with torch.no_grad():
            param.copy_(value)
    module.register_parameter(name, param)
    if hasattr(module, "_init_flat_weights"):
        module._init_flat_weights()


class MaskBank(nn.Module):
    """One learnable embedding row per task over all mask units of the model; returns the mask vector
    (units + 1: the trailing entry is the constant 1 that unknown inputs gather).

    `spans`: the layers' unit ranges (start, stop). When they tile the units, a training forward also splits the
    soft masks into them once (`_hat_pieces` on the vector): a gate that reads one layer's units takes its piece,
    so the backward joins the gates' gradients in one `cat` instead of a zero-filled vector per gate and a sum."""

    def __init__(self, num_tasks: int, units: int, init: str, dense_value: float, s_max: float, clamp: float,
                 seed: int, spans: list[tuple[int, int]] = ()) -> None:
        super().__init__()
        spans = sorted(spans)
        tiled = bool(spans) and [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == units
        self.spans = tuple(spans) if tiled and all(b > a for a, b in spans) else ()
        self.sizes = [b - a for a, b in self.spans]
        gen = torch.Generator().manual_seed(seed)
        for t in range(num_tasks):
            row = torch.full((units,), dense_value) if init == "dense" else torch.randn(units, generator=gen)
            self.register_parameter(f"task{t}", nn.Parameter(row))
        self.num_tasks, self.units, self.s_max, self.clamp = num_tasks, units, s_max, clamp
        self.open = False            # masks_open(): every mask exactly 1
        self.override: torch.Tensor | None = None   # validate()'s probes
        self.last: torch.Tensor | None = None       # soft masks of the last training forward (mask_scale + grad)

    def embedding(self, t: int) -> torch.Tensor:
        name = f"task{t}"  # (a parameter, or a finished task's buffer: Module.__getattr__'s lookup, at every forward)
        e = self._parameters.get(name)
        return self._buffers[name] if e is None else e

    def freeze(self, t: int) -> None:
        _CLAMPED.pop(id(self._parameters.get(f"task{t}")), None)  # a buffer now: no step moves it
        freeze_parameter(self, f"task{t}")

    def train(self, mode: bool = True) -> "MaskBank":
        self.__dict__.pop("_binary_cache", None)  # `.data` writes are invisible to the cache key
        return super().train(mode)

    def __getstate__(self) -> dict:
        # A copy made in the middle of a task: the last forward's masks belong to that forward's graph.
        return {**super().__getstate__(), "last": None, "_binary_cache": {}}

    def unfreeze(self, t: int) -> None:
        unfreeze_parameter(self, f"task{t}")

    def register_clamp(self, e: torch.Tensor) -> None:
        """Clamp the embedding `e` after every optimizer step (once it is a trainable parameter)."""
        if isinstance(e, nn.Parameter) and _CLAMPED.get(id(e)) is not e:
            e._hat_clamp = self.clamp
            _CLAMPED[id(e)] = e

    def forward(self, task_id: int, mask_scale: float | None) -> torch.Tensor:
        e = self.embedding(task_id)
        binary = mask_scale is None and not self.open and self.override is None
        if binary:  # eval inference: the vector cached per task, found before any other work
            key = (e.data_ptr(), e._version, e.dtype)
            cacheable = not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
            cached = self.__dict__.get("_binary_cache", {}).get(task_id) if cacheable else None
            if cached is not None and cached[0] == key:  # binary masks change only when the embedding does
                return cached[1]
        if not torch.compiler.is_compiling():  # compiled: begin_task() registered it (weakrefs break graphs)
            self.register_clamp(e)
        if self.open:
            m = torch.ones_like(e)
        elif self.override is not None:
            m = self.override
        elif binary:
            m = (e > 0).to(e.dtype)
            out = torch.cat([m, m.new_ones(1)])
            if cacheable:
                out._hat_binary = True  # gates compute where it is zero once (`Gate.eval_gated`)
                self.__dict__.setdefault("_binary_cache", {})[task_id] = (key, out)
            return out
        else:
            m = compensated_sigmoid(e, float(mask_scale), self.s_max)
            if self.training or torch.is_grad_enabled():  # eval mode with gradients: frozen batch statistics
                self.last = m
            out = torch.cat([m, m.new_ones(1)])
            if self.__dict__.get("spans") and not torch.compiler.is_compiling():  # (banks saved before: no spans)
                out._hat_pieces = dict(zip(self.spans, m.split(self.sizes)))  # views of m: no reference cycle
            return out
        return torch.cat([m, m.new_ones(1)])


class Gate(nn.Module):
    """x * mask gathered through an index map (terms, *shape): max over the union terms."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index[0] if index.shape[0] == 1 else index, persistent=False)
        self.union = index.shape[0] > 1
        # Most gates read one producer's own units in order: a slice view of the mask vector is the same
        # gate without the gather and its scatter-add backward.
        self.span: tuple[int, int] | None = None
        self.span_shape: tuple[int, ...] | None = None  # None: the slice has the gate's shape already
        if not self.union and self.index.numel():
            start = int(self.index.reshape(-1)[0])
            if torch.equal(self.index.reshape(-1), torch.arange(start, start + self.index.numel())):
                self.span = (start, start + self.index.numel())
                self.span_shape = tuple(self.index.shape) if self.index.ndim > 1 else None

    def gate(self, masks: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            gate = self.piece(masks)
            return gate if self.span_shape is None else gate.view(self.span_shape)
        gate = masks[self.index]
        return gate.amax(0) if self.union else gate

    def piece(self, masks: torch.Tensor) -> torch.Tensor:
        """masks[start:stop] of the gate's span: the bank's piece of it when its training forward split the vector."""
        pieces = None if torch.compiler.is_compiling() else getattr(masks, "_hat_pieces", None)
        piece = None if pieces is None else pieces.get(self.span)
        return masks[self.span[0]:self.span[1]] if piece is None else piece

    def eval_gated(self, x: torch.Tensor, masks: torch.Tensor, inplace: bool = False,
                   shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """x gated, where `eval_ready(masks)`: the bank hands every eval call the same cached binary vector, so where
        the gate is zero is found once per vector, and the gate is one integer product of x's bits by 0 / 1 (exactly
        +0 where the gate is zero, even where x is inf or NaN, as `_gated`; x's own bits elsewhere): a `masked_fill`
        with a broadcast mask costs several times as much on the CPU. `shape`: the gate's shape against x (folded
        parameters: a linear layer's weight rows)."""
        cached = self.__dict__.get("_eval_zeros")
        if cached is None or cached[0] is not masks:  # the held reference keeps the identity from being reused
            cached = self.__dict__["_eval_zeros"] = (masks, self.gate(masks) == 0, {})
        zeros, kept = cached[1] if shape is None else cached[1].reshape(shape), cached[2]
        bits = _BITS.get(x.element_size())
        if bits is None or x.is_complex():
            return x.masked_fill_(zeros, 0) if inplace else x.masked_fill(zeros, 0)
        keep = kept.get((bits, shape))
        if keep is None:
            keep = kept[bits, shape] = (~zeros).to(bits)
        view = x.view(bits)
        return (view.mul_(keep) if inplace else view * keep).view(x.dtype)

    def eval_ready(self, masks: torch.Tensor) -> bool:
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()) and \
            getattr(masks, "_hat_binary", False)

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "_eval_zeros"}

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.eval_ready(masks):
            return self.eval_gated(x, masks)
        gate = self.gate(masks)
        return _gated(x, gate if gate.dtype == x.dtype else gate.to(x.dtype), not self.training)


def _gated(x: torch.Tensor, gate: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """x * gate; `exact`: zero where the gate is zero even where x is inf or NaN, so that a diverging later task
    cannot reach a finished task's eval outputs through 0 * inf = NaN (training forwards skip the extra pass)."""
    return torch.where(gate == 0, gate.new_zeros(()), x * gate) if exact else x * gate


def _hooked(module: nn.Module) -> bool:
    """Calling `module` would run more than its forward: hooks of the user's, or of FSDP's."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
                or _global_forward_pre_hooks)


def _base_type(module: nn.Module) -> type:
    """The module's own class under torch's parametrization subclass (any other subclass: its own type)."""
    kind = type(module)
    return kind.__bases__[0] if parametrize.is_parametrized(module) and len(kind.__bases__) == 1 else kind


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """`_BatchNorm.forward` with the given affine parameters (running statistics, momentum as torch does)."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_stats = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
                        weight, bias, use_batch, factor, bn.eps)


def _scaled(value: torch.Tensor | None, gate: torch.Tensor, shape: tuple[int, ...] = (-1,)) -> torch.Tensor | None:
    return None if value is None else _gated(value, gate.to(value.dtype).view(shape))


Scale = Callable[[Optional[torch.Tensor], tuple], Optional[torch.Tensor]]  # (parameter, gate shape) -> gated


def _fold_norm(module: nn.Module, x: torch.Tensor, gate: torch.Tensor, scale: Scale) -> torch.Tensor:
    """norm(x) * gate per channel as the norm with gated affine parameters (gamma * g, beta * g)."""
    weight = scale(module.weight, (-1,)) if module.weight is not None else gate.to(x.dtype)
    bias = scale(module.bias, (-1,))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(module, x, weight, bias)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    return F.group_norm(x, module.num_groups, weight, bias, module.eps)


def _fold_linear(module: nn.Linear, x: torch.Tensor, gate: torch.Tensor, scale: Scale) -> torch.Tensor:
    """linear(x) * gate per output unit: through the weight's rows when the input has more rows than the weight
    has columns (sequences: fewer elements to scale, forward and backward), else on the output."""
    weight, bias = module.weight, module.bias
    if x.numel() > weight.shape[1] ** 2:  # rows > columns: out * in products instead of rows * out
        return F.linear(x, scale(weight, (-1, 1)), scale(bias, (-1,)))
    y = F.linear(x, weight, bias)
    return _gated(y, gate if gate.dtype == y.dtype else gate.to(y.dtype), not module.training)


_FOLDS = {nn.BatchNorm1d: _fold_norm, nn.BatchNorm2d: _fold_norm, nn.BatchNorm3d: _fold_norm,
          nn.LayerNorm: _fold_norm, nn.GroupNorm: _fold_norm, nn.Linear: _fold_linear}


def fold_site(module: nn.Module) -> tuple[int, int] | None:
    """(axis of `module`'s output, its number of units) that a folded gate scales; None: no fold for it."""
    kind = _base_type(module)
    if kind is nn.Linear:
        return -1, module.out_features
    if kind is nn.LayerNorm:
        return (-1, module.normalized_shape[0]) if len(module.normalized_shape) == 1 else None
    if kind is nn.GroupNorm:
        return 1, module.num_channels
    return (1, module.num_features) if kind in _FOLDS else None


class FoldedGate(Gate):
    """A gate folded into the module that produces its input: the graph calls this instead of the module, and it
    runs the module with the gate applied to its parameters (a norm's affine, a linear layer's rows), which saves
    the elementwise products over the activations. `target` is that module (or a `TaskIndexed` of norms); it
    stays registered where it was (same state dict); a module with hooks (FSDP's, a user's) is called as it is,
    then gated."""

    def __init__(self, index: torch.Tensor, target: nn.Module, target_name: str) -> None:
        super().__init__(index)
        self.__dict__["target"] = target  # not a submodule: it is registered at its own place
        self.target_name = target_name
        module = target.copies[0] if isinstance(target, TaskIndexed) else target
        self.kind = _base_type(module)
        self.fold = _FOLDS[self.kind]

    def forward(self, x: torch.Tensor, masks: torch.Tensor, **kwargs) -> torch.Tensor:
        target = self.__dict__["target"]
        module = target.pick(kwargs["hat_task_id"]) if kwargs else target  # only TaskIndexed takes a task id
        if not isinstance(module, self.kind) or _hooked(module) or (kwargs and _hooked(target)):
            return super().forward(target(x, **kwargs), masks)
        gate = self.piece(masks)
        if not self.eval_ready(masks):
            return self.fold(module, x, gate, lambda value, shape: _scaled(value, gate, shape))
        if self.kind is nn.Linear and x.numel() <= module.in_features ** 2:  # (long sequences: weight rows scaled)
            return self.eval_gated(F.linear(x, module.weight, module.bias), masks, inplace=True)  # a new tensor
        return self.fold(module, x, gate, lambda value, shape: None if value is None else
                         self.eval_gated(value, masks, shape=shape))  # the parameters' bits by 0 / 1


class TaskIndexed(TaskCopies):
    """One copy of a module per task; a finished task's copy is frozen (buffers) and always in eval.
    `shared`: a single copy, frozen after the first finished task. The copies of tasks not begun share their
    parameters' storage (`hatify.pending`); buffers are copied."""

    def __init__(self, module: nn.Module, num_tasks: int, shared: bool = False, exclusive: bool = False) -> None:
        """`exclusive`: nothing else holds `module` or shares its parameters' storage, so the copies may take it."""
        super().__init__()
        first = module if exclusive else detached_deepcopy(module)
        self.copies = nn.ModuleList([first] + [detached_deepcopy(first, _aliases_of(first))
                                               for _ in range(1, 1 if shared else num_tasks)])
        self.names = [str(t) for t in range(len(self.copies))]
        self.shared = shared
        self.frozen: set[int] = set()
        # A module that writes its own parameters in its forward (`max_norm` renormalises embedding rows in place):
        # a pending copy gets storage of its own before its first call, or the write would reach the other copies.
        self.writes_itself = any(getattr(m, "max_norm", None) is not None for m in module.modules())
        self.share_pending(range(len(self.copies)))

    def task_parameters(self, t: int) -> list[tuple[str, str, nn.Parameter]]:
        return [(f"copies.{self.names[t]}.{name}", name, p)
                for name, p in self.copies[t].named_parameters(remove_duplicate=False)]

    def pick(self, hat_task_id: int) -> nn.Module:
        # The ModuleList's own indexing costs as much as a small layer; a list index, not str(task id): dynamo
        # specializes on the index, and str() of a symbolic int breaks the graph.
        return self.copies._modules[self.names[0 if self.shared else hat_task_id]]

    def forward(self, *args, hat_task_id: int, **kwargs):
        if self.writes_itself and self.pending:
            self.materialise(0 if self.shared else hat_task_id)
        return self.pick(hat_task_id)(*args, **kwargs)

    def freeze(self, t: int) -> None:
        t = 0 if self.shared else t
        self.materialise(t)  # (a loaded model's finished tasks) the parameter kept aside owns its storage
        for module in self.copies[t].modules():
            for name in list(module._parameters):
                freeze_parameter(module, name)
        self.frozen.add(t)
        self.copies[t].train(False)

    def unfreeze(self, t: int) -> None:
        if self.shared:  # other finished tasks still read the shared copy
            return
        for module in self.copies[t].modules():
            for name in list(module._buffers):
                if name in module.__dict__.get("_hat_orphans", {}):
                    unfreeze_parameter(module, name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.frozen.discard(t)
        self.copies[t].train(self.training)

    def train(self, mode: bool = True) -> "TaskIndexed":
        super().train(mode)
        for t in self.frozen:
            self.copies[t].train(False)
        return self


class TaskParameter(TaskCopies):
    """A parameter read directly by the graph, one copy per task (or shared, then frozen after the first
    finished task when `shared`); the copies of tasks not begun share storage (`hatify.pending`)."""

    def __init__(self, value: torch.Tensor, num_tasks: int, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.names = [str(t) for t in range(1 if shared else num_tasks)]
        first = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        for name in self.names:
            self.register_parameter(name, first if name == self.names[0] else
                                    nn.Parameter(alias(first), requires_grad=value.requires_grad))
        self.share_pending(range(len(self.names)))

    def task_parameters(self, t: int) -> list[tuple[str, str, nn.Parameter]]:
        p = self._parameters.get(self.names[t])
        return [] if p is None else [(self.names[t], "", p)]

    def forward(self, hat_task_id: int) -> torch.Tensor:
        return getattr(self, self.names[0 if self.shared else hat_task_id])  # see TaskIndexed.forward

    def freeze(self, t: int) -> None:
        t = 0 if self.shared else t
        self.materialise(t)
        freeze_parameter(self, self.names[t])

    def unfreeze(self, t: int) -> None:
        if not self.shared:
            unfreeze_parameter(self, self.names[t])


def _aliases_of(module: nn.Module) -> dict[int, nn.Parameter]:
    """A deep copy's memo that gives the copy parameters of its own sharing `module`'s storage."""
    return {id(p): type(p)(alias(p), p.requires_grad) for p in module.parameters()}


def alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor on `t`'s storage with a version counter of its own (`detach()` shares `t`'s): an in-place write
    through one pending copy shows in its version only (`TaskCopies._check_unwritten`)."""
    with torch.no_grad():
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _arranged(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """A view of `t` with the protection mask's varying dimensions first (`Protect._order`)."""
    if t.ndim == 0:
        return t.view(1)
    return t.permute(order) if order else t  # (): the weight's own order


def _as_units(t: torch.Tensor) -> torch.Tensor | None:
    """`t` (rows first) as rows of 16-byte units on CPU when its rows are contiguous and a multiple of 16 bytes,
    else None: CPU index kernels cost per element, so whole rows move several times faster as wide units (copies:
    the same bits). Other devices index at memory speed (and some have no 16-byte type)."""
    count = t.shape[0] if t.ndim else 0
    if not count or t.device.type != "cpu" or (t.numel() // count * t.element_size()) % 16 or t.data_ptr() % 16 \
            or not t.is_contiguous():
        return None
    return t.view(count, -1).view(torch.complex128)


def _take_rows(t: torch.Tensor, units: torch.Tensor | None, rows: torch.Tensor) -> tuple:
    """(t[rows], its 16-byte units or None): a new tensor (rows first), taken through `units` (`_as_units(t)`)."""
    if units is None:
        return t.index_select(0, rows), None
    part = units.index_select(0, rows)
    return part.view(t.dtype).view(len(rows), *t.shape[1:]), part


def _put_rows(t: torch.Tensor, units: torch.Tensor | None, rows: torch.Tensor, values: torch.Tensor,
              value_units: torch.Tensor | None) -> None:
    """t[rows] = values, in place; through 16-byte units when both have them."""
    if units is None or value_units is None:
        t.index_copy_(0, rows, values)
    else:
        units.index_copy_(0, rows, value_units)


def protected_rows(mask: torch.Tensor, order: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The protected entries of `mask` (arranged by `order`) as blocks of rows: (rows, columns) per distinct
    pattern of protected columns, `columns` a mask over the rest of a row (None: whole rows). HAT protects the
    outer product of the cumulative output and input masks: one block (a grouped convolution: one per group),
    so per-unit indices and one column pattern per block describe a weight's protection."""
    arranged = _arranged(mask, order)
    grid = arranged.reshape(arranged.shape[0], -1)
    rows = grid.any(1).nonzero().flatten()
    patterns, which = torch.unique(grid[rows], dim=0, return_inverse=True)
    return [(rows[which == j], None if bool(pattern.all()) else pattern.view(1, *arranged.shape[1:]))
            for j, pattern in enumerate(patterns)]


def read_through_protect(module: nn.Module, name: str) -> None:
    """Make `module.<name>` (parametrized by one `Protect`) call it directly: torch's parametrization property
    goes through two module calls and a ModuleList lookup on every read, which costs as much as a small
    layer's matmul. `parametrize.cached()`, and parametrizations a user registers on top, keep torch's path."""
    torch_get = type(module).__dict__[name].fget

    def get(self) -> torch.Tensor:
        chain = self._modules["parametrizations"]._modules[name]
        if parametrize._cache_enabled or len(chain._modules) != 1:  # a user's parametrization on top: torch's path
            return torch_get(self)
        return chain._modules["0"].forward(chain.original)

    setattr(type(module), name, property(get, type(module).__dict__[name].fset))


def _mask_accumulated_gradient(protect_ref: "weakref.ref[Protect]", param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a protected parameter: its protected entries' gradient becomes exactly +0,
    in place, before anything reads `.grad` (gradient clipping, DDP's all-reduce, the optimizer)."""
    protect, grad = protect_ref(), param.grad
    if protect is None or grad is None or not protect.active or grad.shape != param.shape:
        return
    bits = _BITS.get(grad.element_size())
    if grad.requires_grad or grad.layout != torch.strided or bits is None or grad.is_complex():
        param.grad = torch.where(protect.protect, grad.new_zeros(()), grad.to_dense())  # create_graph, sparse
        return
    arranged = _arranged(grad.view(bits), protect._order)  # integer products: exactly +0, whatever the value
    row_free, blocks = protect._gradient_selectors(grad.dtype, bits)
    if row_free is not None:
        arranged.mul_(row_free)
    units = _as_units(arranged) if blocks else None
    for rows, free, _, _ in blocks:
        part, part_units = _take_rows(arranged, units, rows)
        _put_rows(arranged, units, rows, part.mul_(free), part_units)


class Protect(nn.Module):
    """Weight parametrization: entries used by earlier tasks hold their frozen values and get a gradient of
    exactly zero, whatever the optimizer does (momentum, weight decay, `.data` writes).

    In eager mode the frozen entries are written back into the parameter itself whenever it is read (in place,
    integer arithmetic on the bits of the protected rows: the same bits for every value, NaN, inf and -0.0
    included; through `.data`, so a graph that saved the weight sees no version change, and it sees the same bits),
    and the layer uses the parameter as it is: an optimizer step may move protected entries, the next forward puts
    them back bit for bit. The gradient is masked in place once it is accumulated into `.grad`, by a hook that
    every training forward attaches to the parameter it reads (so copies and reassigned parameters get it too).
    Under `torch.compile`, or for a weight that is not a leaf parameter (`torch.func.functional_call`), the
    effective weight is computed out of place instead (`index_copy`, whose gradient is exactly +0 at the frozen
    entries).

    State: `protect`, the protection mask (it broadcasts over kernel positions), and `frozen`, the frozen values of
    the rows that hold protected entries only (0 at their free entries), block by block (`protected_rows`): a
    finished task costs about the rows it protects, not a copy of the weight, and the run-time selectors are per
    unit, not per weight entry. Files saved with a weight-shaped `frozen` load as well."""

    def __init__(self, weight: torch.Tensor, protect_shape: tuple[int, ...]) -> None:
        super().__init__()
        # Allocated by the first end_task(): before any task is finished nothing is frozen and nothing costs.
        self.register_buffer("frozen", weight.new_empty(0))
        self.register_buffer("protect", torch.zeros(0, dtype=torch.bool, device=weight.device))
        self.protect_shape = tuple(protect_shape)
        self.weight_shape = tuple(weight.shape)
        varying = [d for d, size in enumerate(self.protect_shape) if size != 1] or [0]
        order = tuple(varying + [d for d in range(max(1, weight.ndim)) if d not in varying])
        self._order = () if order == tuple(range(len(order))) else order  # (): no permute on every read
        self.active = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask, frozen = state_dict.get(prefix + "protect"), state_dict.get(prefix + "frozen")
        if mask is not None and frozen is not None and mask.numel() and frozen.numel():
            packed = self._packed_size(mask)
            if tuple(frozen.shape) == self.weight_shape and (frozen.ndim != 1 or frozen.numel() != packed):
                state_dict[prefix + "frozen"] = self._pack(frozen, mask)  # saved weight-shaped: pack it
            elif frozen.ndim != 1 or frozen.numel() != packed:
                raise HatifyError(f"{prefix}frozen holds {tuple(frozen.shape)} values: its protection mask needs "
                                  f"{packed} (the protected rows) or the weight's shape {self.weight_shape}; the "
                                  "state dict does not belong to this model")
        for name in ("frozen", "protect"):  # a saved model may hold them allocated
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.active = bool(self.protect.numel() and self.protect.any())
        self._prepare()

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_derived_cache", None)  # `.to()`, `.half()`: the blocks follow the buffers
        result = super()._apply(fn, recurse)
        self._prepare()
        return result

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        if torch.compiler.is_compiling():  # the blocks end_task() or the last eager read left: no graph break
            ready = self.__dict__.get("_derived_cache", {}).get(("blocks", weight.dtype, None))
            return self._with_frozen(weight, ready if ready is not None else self._frozen_blocks(weight.dtype))
        training = self.training or torch.is_grad_enabled()
        # Eval-mode inference skips the write-back while nothing was written since the last one: in-place writes
        # bump the version, optimizer steps the step count (fused kernels may not bump the version); `.data` writes
        # do neither, so `train()`/`eval()` and `end_task()` forget the last write-back.
        key = (weight.data_ptr(), weight._version, _STEPS[0])
        if not training and self.__dict__.get("_restored") == key:
            return weight
        target = self._write_target(weight)
        if target is None:
            return self._with_frozen(weight, self._frozen_blocks(weight.dtype))
        data, units, blocks = target
        for rows, free, frozen_bits, frozen_units in blocks:
            if free is None:  # whole rows
                _put_rows(data, units, rows, frozen_bits, frozen_units)
            else:  # the rows, then `frozen_bits + bits * free` (integers: one term is 0): the same bits, NaN and all
                part, part_units = _take_rows(data, units, rows)
                _put_rows(data, units, rows, torch.addcmul(frozen_bits, part, free, out=part), part_units)
        self.__dict__["_restored"] = key
        if training and weight.requires_grad:
            hooked = self.__dict__.get("_hooked")
            if hooked is None or hooked() is not weight:
                weight.register_post_accumulate_grad_hook(
                    functools.partial(_mask_accumulated_gradient, weakref.ref(self)))
                self.__dict__["_hooked"] = weakref.ref(weight)
        return weight

    def _write_target(self, weight: torch.Tensor) -> tuple | None:
        """(the weight's bits arranged, their 16-byte units or None, the frozen blocks as `bits`) for the in-place
        write-back; None where the weight is written out of place (not a leaf parameter: `functional_call`; no
        integer type of its size). Kept while the parameter, its storage and strides, and the blocks stay the same:
        a training step reads each weight once, and these views cost as much as a small weight's write-back."""
        derived = self._derived()
        kept = self.__dict__.get("_write_view")
        if kept is not None and kept[0]() is weight and kept[1] is derived and \
                kept[2] == (weight.data_ptr(), weight.stride(), weight.dtype):
            return kept[3]
        bits = _BITS.get(weight.element_size())
        if bits is None or weight.is_complex() or not (isinstance(weight, nn.Parameter) and weight.is_leaf):
            return None
        data = _arranged(weight.data.view(bits), self._order)
        target = (data, _as_units(data), self._frozen_blocks(weight.dtype, bits))
        self.__dict__["_write_view"] = (weakref.ref(weight), derived, (weight.data_ptr(), weight.stride(),
                                                                          weight.dtype), target)
        return target

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "_write_view"}

    def _with_frozen(self, weight: torch.Tensor, blocks: list) -> torch.Tensor:
        """The effective weight out of place; differentiable, with a gradient of exactly +0 at frozen entries
        (`index_copy` passes none to the rows it replaces; the free entries of those rows come back through the
        `where`)."""
        arranged = _arranged(weight, self._order)
        for rows, free, frozen, _ in blocks:
            replaced = frozen if free is None else torch.where(free, arranged.index_select(0, rows), frozen)
            arranged = arranged.index_copy(0, rows, replaced)
        if self._order:
            arranged = arranged.permute(sorted(range(len(self._order)), key=self._order.__getitem__))
        return arranged.reshape(weight.shape)

    def train(self, mode: bool = True) -> "Protect":
        self.forget_write_back()
        return super().train(mode)

    def forget_write_back(self) -> None:
        """Make the next read write the frozen bits back, in eval too: for writes the version did not see."""
        self.__dict__.pop("_restored", None)

    def _derived(self) -> dict:
        """Tensors derived from the buffers, rebuilt (and the next read writes back) whenever one is replaced or
        written."""
        frozen, protect = self._buffers["frozen"], self._buffers["protect"]
        derived = self.__dict__.get("_derived_cache")
        if derived is None or derived["of"][0] is not frozen or derived["of"][1] is not protect or \
                derived["of"][2:] != (frozen._version, protect._version):
            derived = self.__dict__["_derived_cache"] = {"of": (frozen, protect, frozen._version, protect._version)}
            self.forget_write_back()
        return derived

    def _rows(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return protected_rows(mask.reshape(self.protect_shape), self._order)

    def _arranged_shape(self) -> list[int]:
        return [self.weight_shape[d] for d in self._order] if self._order else list(self.weight_shape) or [1]

    def _packed_size(self, mask: torch.Tensor) -> int:
        return sum(len(rows) for rows, _ in self._rows(mask)) * math.prod(self._arranged_shape()[1:])

    def _pack(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The rows of `values` (weight-shaped) that `mask` protects, block by block, 0 at their free entries."""
        arranged = _arranged(values.reshape(self.weight_shape), self._order)
        parts = [arranged[rows] if columns is None else arranged[rows].masked_fill(~columns, 0)
                 for rows, columns in self._rows(mask)]
        return torch.cat([part.reshape(-1) for part in parts] or [values.new_empty(0)])

    def _frozen_blocks(self, dtype: torch.dtype, bits: torch.dtype | None = None) -> list:
        """(rows, free, frozen values, their 16-byte units or None) per block, in `dtype` (as the integers `bits`
        when given; views into `frozen` when the dtype is its own): `free` is None for whole rows, else the block's
        free columns, 1 / 0 integers (`bits`) or a bool mask, at a row's shape."""
        derived = self._derived()
        key = ("blocks", dtype, bits)
        if key not in derived:
            if "rows" not in derived:
                derived["rows"] = self._rows(self._buffers["protect"])
            frozen = self._buffers["frozen"]
            values = frozen if frozen.dtype == dtype else frozen.to(dtype)
            values = values if bits is None else values.view(bits)
            row = self._arranged_shape()[1:]
            sizes = [len(rows) * math.prod(row) for rows, _ in derived["rows"]]
            if sum(sizes) != values.numel():
                raise HatifyError(f"Protect: {values.numel()} frozen values for a protection mask that covers "
                                  f"{sum(sizes)} entries of the weight {self.weight_shape}; the state is corrupt")
            derived[key] = [(rows, None if columns is None else
                             (~columns).expand(1, *row).to(bits) if bits is not None else ~columns,
                             part.view(len(rows), *row), _as_units(part.view(len(rows), *row)))
                            for (rows, columns), part in zip(derived["rows"], values.split(sizes))]
        return derived[key]

    def _gradient_selectors(self, dtype: torch.dtype, bits: torch.dtype) -> tuple[torch.Tensor | None, list]:
        """(one free value per row for the blocks of whole rows, or None; the other blocks): integer selectors that
        zero the protected gradient by products, per unit, not per weight entry."""
        derived = self._derived()
        key = ("gradient", dtype, bits)
        if key not in derived:
            blocks = self._frozen_blocks(dtype, bits)
            whole = [rows for rows, free, _, _ in blocks if free is None]
            row_free = None
            if whole:
                arranged = self._arranged_shape()
                row_free = torch.ones(arranged[0], *[1] * (len(arranged) - 1), dtype=bits, device=whole[0].device)
                row_free[torch.cat(whole)] = 0
            derived[key] = (row_free, [block for block in blocks if block[1] is not None])
        return derived[key]

    def cached_tensors(self) -> list[torch.Tensor]:
        """The run-time tensors derived from the buffers (indices, converted values), for memory accounting."""
        derived = self.__dict__.get("_derived_cache") or {}
        leaves = pytree.tree_leaves([value for key, value in derived.items() if key != "of"])
        return list({id(t): t for t in leaves if isinstance(t, torch.Tensor)}.values())  # blocks share tensors

    def dense_frozen(self, dtype: torch.dtype) -> torch.Tensor:
        """A weight-shaped tensor holding the frozen values where protected and 0 elsewhere (FSDP's shards)."""
        full = torch.zeros(self.weight_shape, dtype=dtype, device=self.frozen.device)
        arranged = _arranged(full, self._order)
        for rows, _, values, _ in self._frozen_blocks(dtype):
            arranged.index_copy_(0, rows, values)  # free entries of the rows hold 0 in the packed values
        return full

    @torch.no_grad()
    def _store(self, effective: torch.Tensor, mask: torch.Tensor) -> None:
        self.protect = mask.to(device=effective.device, dtype=torch.bool).reshape(self.protect_shape).clone()
        self.frozen = self._pack(effective, self.protect)
        self.active = bool(self.protect.any())
        self._prepare()

    def _prepare(self) -> None:
        """Derive the blocks now, so that a compiled forward finds them (deriving them there breaks the graph)."""
        if self.active:
            self._frozen_blocks(self.frozen.dtype)

    def update(self, effective: torch.Tensor, protect: torch.Tensor) -> None:
        """Freeze the entries `protect` marks at their current effective value (monotone: never unfreezes)."""
        protect = protect.reshape(self.protect_shape)
        self._store(effective, self.protect | protect if self.protect.shape == protect.shape else protect)

    def reset(self, effective: torch.Tensor, protect: torch.Tensor) -> None:
        """Set the frozen entries to exactly `protect` (may release entries, for forget_task)."""
        self._store(effective, protect)
