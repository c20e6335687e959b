"""HATModel: the converted model, its forward with task ids, and the task lifecycle."""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import fsdp, per_sample
from .errors import HatifyError, HatifyWarning
from .inputs import CONSTANTS, inputs_device
from .layers import MaskBank, Protect, TaskIndexed, TaskParameter
from .naming import keep_user_names, user_names
from .norm_stats import has_running_statistics, reestimate_norm_statistics
from .parametrized import hold_norms
from .pending import TaskCopies
from .plan import LayerPlan, Plan
from .rewrite import SCALE_ARG, TASK_ARG, _owner
from .taskinf.statistics import TaskStatistics


class HATModel(nn.Module):
    """A model converted by `hatify.hatify`: `hat(*inputs, task_id=t, mask_scale=s)`.

    Example:
        >>> hat = hatify.hatify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), num_tasks=3,
        ...                     example_inputs=(torch.randn(2, 4),))
        >>> hat(torch.randn(5, 4), task_id=1).shape
        torch.Size([5, 2])
    """

    def __init__(self, net: fx.GraphModule, plan: Plan, source: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.plan = plan
        self.source = source or {}
        self.report: Any = None
        self.num_tasks = plan.num_tasks
        self.register_buffer("trained", torch.zeros(plan.num_tasks, dtype=torch.bool))
        self.register_buffer("cumulative", torch.zeros(plan.total_units, dtype=torch.bool))
        self.current_task: int | None = None
        self.task_stats = TaskStatistics()  # task inference: per observed task, filled by end_task(data=...)
        keep_user_names(self, plan.renamed, "net.")

    # ------------------------------------------------------------------------------ forward
    @property
    def masks(self) -> MaskBank:
        return self.net.hat_masks

    def forward(self, *inputs: Any, task_id: Any = None, mask_scale: float | None = None, **kwargs: Any) -> Any:
        if task_id is None:
            raise HatifyError("task_id is required: call hat(*inputs, task_id=t) with an int or one id per sample")
        if isinstance(task_id, str):
            if task_id != "infer":
                raise HatifyError(f"task_id={task_id!r}: the only task name is 'infer' (predict each sample's task)")
            if mask_scale is not None:
                raise HatifyError("task_id='infer' runs the finished tasks' binary masks: give no mask_scale")
            return self.infer_task(*inputs, **kwargs).outputs
        if mask_scale is not None:
            mask_scale = _checked_scale(mask_scale)
        if kwargs:
            kwargs = self._keywords(inputs, kwargs)
        ids = self._task_ids(task_id, inputs, kwargs)
        if self.__dict__.get("_is_fsdp_managed_module"):
            fsdp.forget_write_backs(self)
        if isinstance(ids, int):
            return self.net(*inputs, **kwargs, **{TASK_ARG: ids, SCALE_ARG: mask_scale})
        return self._mixed(inputs, kwargs, ids, mask_scale)

    def _keywords(self, inputs: tuple, kwargs: dict) -> dict:
        """Keyword inputs the graph takes; the constants fixed at conversion may be repeated, not changed."""
        constants = self.net.meta.get(CONSTANTS, {})
        names = self.__dict__.get("_input_names")
        if names is None:
            names = self.__dict__["_input_names"] = [n.target for n in self.net.graph.nodes if n.op == "placeholder"
                                                     and n.target not in (TASK_ARG, SCALE_ARG)]
        missing = [name for name in names[len(inputs):] if name not in kwargs]
        if missing:
            raise HatifyError(f"missing input {missing[0]!r}: this model was converted with the inputs {names} "
                              "and takes exactly those")
        for key, value in kwargs.items():
            if key in constants and value != constants[key]:
                raise HatifyError(f"{key}={value!r}: this model was converted with {key}={constants[key]!r}, "
                                  "which the trace fixed; convert again with the value you need")
            if key not in constants and key not in names:
                raise HatifyError(f"unexpected keyword input {key!r}: this model was converted with the inputs "
                                  f"{names} (give {key} in example_inputs to convert with it)")
        return {k: v for k, v in kwargs.items() if k not in constants}

    def _task_ids(self, task_id: Any, inputs: tuple, kwargs: dict) -> int | torch.Tensor:
        if isinstance(task_id, (list, tuple)) or type(task_id).__module__ == "numpy":
            try:  # one id per sample as a list or array, or a numpy integer: the same as a tensor of them
                task_id = torch.as_tensor(task_id)
            except (TypeError, ValueError):
                raise HatifyError(f"task_id must be an int or one integer id per sample, got {task_id!r}") from None
        if isinstance(task_id, torch.Tensor):
            if task_id.dtype in (torch.bool,) or task_id.is_floating_point() or task_id.is_complex():
                raise HatifyError(f"task_id tensor must hold integers, got dtype {task_id.dtype}")
            if task_id.ndim == 0:
                task_id = int(task_id)
            else:
                if task_id.ndim != 1:
                    raise HatifyError(f"task_id must be an int or a 1-D tensor of one id per sample, "
                                      f"got shape {tuple(task_id.shape)}")
                batch = _batch_size(inputs, kwargs)
                if batch is not None and task_id.shape[0] != batch:
                    raise HatifyError(f"task_id has {task_id.shape[0]} ids but the batch has {batch} samples")
                bad = task_id[(task_id < 0) | (task_id >= self.num_tasks)]
                if bad.numel():
                    raise HatifyError(f"task_id {int(bad[0])} is out of range: this model has tasks "
                                      f"0..{self.num_tasks - 1}")
                unique = task_id.unique()
                return int(unique[0]) if unique.numel() == 1 else task_id
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise HatifyError(f"task_id must be an int or a 1-D integer tensor, got {type(task_id).__name__}")
        if not 0 <= task_id < self.num_tasks:
            raise HatifyError(f"task_id {task_id} is out of range: this model has tasks 0..{self.num_tasks - 1}")
        return task_id

    def _one_task(self, t: Any, what: str) -> int:
        """One task id (an int, or a numpy or 0-d tensor integer) for the calls about a single task."""
        if isinstance(t, (list, tuple)) or getattr(t, "ndim", 0):
            raise HatifyError(f"{what}({t!r}): expected one task id, an int")
        return self._task_ids(t, (), {})

    def _mixed(self, inputs: tuple, kwargs: dict, ids: torch.Tensor, mask_scale: float | None) -> Any:
        """A batch of several tasks. On an accelerator, in eval with binary masks: one pass, each row under its
        own task's masks (`hatify.per_sample`) where the graph allows it. Else (and on the CPU, where one large
        pass measured 2-3x slower than one cache-sized pass per task) each task's samples run together and the
        outputs are put back in order."""
        device = inputs_device(inputs, kwargs)
        if not self.training and mask_scale is None and device is not None and device.type != "cpu":
            try:
                return per_sample.run(self.net, inputs, kwargs, ids)
            except per_sample.Unsupported:
                pass
        batch = ids.shape[0]
        pieces = []
        for t in ids.unique().tolist():
            where = (ids == t).nonzero().squeeze(1)
            take = lambda v: v.index_select(0, where.to(v.device)) if isinstance(v, torch.Tensor) \
                and v.ndim and v.shape[0] == batch else v
            if self.__dict__.get("_is_fsdp_managed_module"):  # FSDP may gather again between the calls
                fsdp.forget_write_backs(self)
            out = self.net(*pytree.tree_map(take, inputs), **pytree.tree_map(take, kwargs),
                           **{TASK_ARG: t, SCALE_ARG: mask_scale})
            pieces.append((where, out))
        leaves0, spec = pytree.tree_flatten(pieces[0][1])
        merged = []
        for i, leaf in enumerate(leaves0):
            if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
                raise HatifyError("mixed-task batches need every output to be a batched tensor")
            full = leaf.new_empty((batch, *leaf.shape[1:]))
            for where, out in pieces:
                full.index_copy_(0, where.to(full.device), pytree.tree_flatten(out)[0][i])
            merged.append(full)
        return pytree.tree_unflatten(merged, spec)

    # ------------------------------------------------------------------------------ tasks
    @property
    def trained_tasks(self) -> list[int]:
        return [t for t in range(self.num_tasks) if bool(self.trained[t])]

    def begin_task(self, t: int) -> None:
        """Start training task t (its heads, norm copies and mask embedding train; old tasks are frozen)."""
        t = self._one_task(t, "begin_task")
        if self.current_task not in (None, t):  # beginning another task would drop the open one without a word
            raise HatifyError(f"begin_task({t}): task {self.current_task} is still open; call hat.end_task() to "
                              f"finish it first")
        if bool(self.trained[t]):
            raise HatifyError(f"task {t} was already trained; call hat.forget_task({t}) first to retrain it")
        fsdp.refuse_fsdp1(self, "begin_task()")
        fsdp.reshard(self)
        if fsdp.is_sharded(self):  # fully_shard: protect the shards too
            fsdp.adopt(self)
        # The parameter an optimizer holds (under fully_shard: the sharded one, not the unsharded copy a forward
        # sees; under torch.compile the forward does not register it).
        self.masks.register_clamp(self.masks.embedding(t))
        for module in self.net.modules():  # task t's copies get storage of their own (`hatify.pending`)
            if isinstance(module, TaskCopies):
                module.materialise(t)
        self.current_task = t
        self.masks.last = None

    def end_task(self, data: Iterable[Any] | None = None, keep: int = 0) -> None:
        """Finish the current task: its binary mask joins the cumulative mask, the weights it uses are frozen,
        and its own embedding, norm copies, heads and loose parameters become buffers.

        `data`: the task's training batches (`(inputs, labels)`, or dicts of keyword inputs with `labels`; a
        DataLoader; a one-shot iterator is read into a list first, since it is read twice). Its norms' running
        statistics (BatchNorm) are first re-estimated from them under the task's final binary masks, so that
        eval-mode outputs match what the task learned (`norm_stats`); then, after the freeze, the statistics task
        inference needs are recorded (`observe(t, data, keep=keep)`). Without data a model with running
        statistics keeps those gathered under soft masks while the weights moved, and a warning says so.

        On a model sharded with `fully_shard` (FSDP2) every rank must call it: the full values are gathered, the
        frozen values are the same on every rank, and the finished task's own tensors stay sharded parameters
        with `requires_grad=False` (FSDP keeps managing them) instead of becoming buffers."""
        t = self.current_task
        if t is None:
            raise HatifyError("end_task() without begin_task(t)")
        if keep and data is None:
            raise HatifyError("end_task(keep=n) keeps samples of data: give data=the task's training batches")
        fsdp.refuse_fsdp1(self, "end_task()")
        if data is not None and iter(data) is data:
            data = list(data)
        if data is not None:
            reestimate_norm_statistics(self, t, data)
        elif has_running_statistics(self, t):
            warnings.warn(f"end_task() for task {t} without data: its BatchNorm running statistics were gathered "
                          "under soft masks while the weights moved, and eval-mode accuracy can fall far below "
                          "train-mode accuracy; pass end_task(data=train_loader) to re-estimate them under the final "
                          "binary masks", HatifyWarning, stacklevel=2)
        fsdp.reshard(self)
        sharded = fsdp.is_sharded(self)
        with torch.no_grad():
            _sync_buffers(self)
            if sharded:
                fsdp.adopt(self)  # the shards hold the frozen values: gathering them gives the effective weights
            used = fsdp.full(self.masks.embedding(t).detach()) > 0
            self.cumulative |= used.to(self.cumulative.device)
            self._protect_layers()
            self._freeze_task(t)
            if sharded:
                fsdp.adopt(self)
            self.trained[t] = True
        self.current_task = None
        self.masks.last = None
        if data is not None:
            try:
                self.observe(t, data, keep=keep)
            except HatifyError as exc:
                if keep:  # asked for explicitly
                    raise
                warnings.warn(f"end_task(data=...): task {t} is finished, but no task-inference statistics were "
                              f"recorded ({exc}); call hat.observe({t}, data, logits=...) to record them",
                              HatifyWarning, stacklevel=2)

    # ------------------------------------------------------------------------------ task inference
    def observe(self, t: int, data: Any, keep: int = 0, logits: str | int | None = None) -> None:
        """Record finished task t's statistics for task inference from its training batches (each
        `(inputs, labels)` or a dict of keyword inputs holding `labels`); `keep=n` keeps n samples per class."""
        from .taskinf.observe import observe

        observe(self, t, data, keep, logits)

    def infer_task(self, *inputs: Any, method: str | None = None, logits: str | int | None = None,
                   **kwargs: Any):
        """Predict each sample's task among the observed ones: a `TaskPrediction` (task, probs, classes,
        outputs). `method` names the score (`hatify.taskinf.SCORES`), `logits` the output field holding the
        class scores when it is neither the output tensor nor a `logits` field."""
        from .taskinf.infer import infer_task

        return infer_task(self, inputs, kwargs, method, logits)

    def _freeze_task(self, t: int) -> None:
        self.masks.freeze(t)
        hold_norms(self.net, t)
        for module in self.net.modules():
            if isinstance(module, (TaskIndexed, TaskParameter)):
                module.freeze(t)
        fsdp.keep_sharded_parameters(self.net)

    def _protect_layers(self) -> None:
        cum = self.cumulative
        cum_ext = torch.cat([cum, cum.new_ones(1)])
        for layer in self.plan.masked_layers:
            out = cum[layer.offset: layer.offset + layer.units]
            inp = cum_ext[layer.input_index.to(cum.device)].any(0) if layer.input_index is not None else None
            for qualname in layer.protected:  # frozen parameters (requires_grad=False) need no protection
                owner, attr = _owner(self.net, qualname)
                if qualname == layer.weight:
                    shape = tuple(owner.parametrizations[attr].original.shape)  # a DTensor's: the full shape
                    _update_protect(owner, attr, weight_protection(layer, out, inp, shape))
                else:
                    _update_protect(owner, attr, out)

    # ------------------------------------------------------------------------------ training helpers
    def mask_scale(self, batch_index: int, num_batches: int) -> float:
        """The annealed mask scale s for batch b of B (0-based, 0 <= b < B) under the configured schedule."""
        if not 0 <= batch_index < num_batches:
            raise HatifyError(f"mask_scale({batch_index}, {num_batches}): the batch index must be in "
                              f"0..{num_batches - 1} (b counts the batches of the epoch from 0, B is their number)")
        return mask_scale(self.plan.config.schedule, self.plan.config.s_max, batch_index, num_batches)

    def regularization(self) -> torch.Tensor:
        """HAT's attention regulariser for the current task, weighted by c, from the last training forward."""
        last = self.masks.last
        if last is None:
            raise HatifyError("regularization() needs a training forward first: a forward with a mask_scale and "
                              "gradients enabled, in train or eval mode (hat(x, task_id=t, mask_scale=s))")
        return torch.dot(last, self._regularizer_weights(last))

    def _regularizer_weights(self, like: torch.Tensor) -> torch.Tensor:
        """R = dot(a, w): w_i = c (1 - a_i^{<t}) / (free units of the network, or of i's layer times the number
        of layers with free units). Derived from the cumulative mask, rebuilt whenever it is written."""
        cum, cfg = self.cumulative, self.plan.config
        key = (cum._version, like.dtype, like.device, cfg.c, cfg.regularizer)
        cached = self.__dict__.get("_regularizer_cache")
        if cached is not None and cached[0] == key and cached[1] is cum:
            return cached[2]
        free = 1.0 - cum.to(device=like.device, dtype=torch.float64)
        if cfg.regularizer == "network":
            weights = free / free.sum().clamp_min(1.0)
        else:
            weights = torch.zeros_like(free)
            spans = [slice(layer.offset, layer.offset + layer.units) for layer in self.plan.masked_layers]
            spans = [sl for sl in spans if free[sl].sum() > 0]
            for sl in spans:
                weights[sl] = free[sl] / (free[sl].sum() * len(spans))
        weights = (cfg.c * weights).to(like.dtype)
        self.__dict__["_regularizer_cache"] = (key, cum, weights)
        return weights

    def forget_task(self, t: int) -> None:
        """Release task t's exclusive capacity; every other task's outputs stay bit-identical."""
        from .lifecycle import forget_task

        forget_task(self, t)
        self.task_stats.drop(t)

    def extract(self, t: int, prune: bool = False) -> fx.GraphModule:
        """Task t as a plain module that takes the original model's inputs and needs only torch."""
        from .lifecycle import extract

        return extract(self, t, prune)

    def capacity(self) -> dict[str, dict[str, Any]]:
        """Per masked layer: units, units used by each trained task, units still free."""
        result = {}
        used = {t: fsdp.full(self.masks.embedding(t).detach()) > 0 for t in self.trained_tasks}
        for layer in self.plan.masked_layers:
            sl = slice(layer.offset, layer.offset + layer.units)
            per_task = {t: int(u[sl].sum()) for t, u in used.items()}
            result[user_names(layer.name, self.plan.renamed)] = {"units": layer.units, "used": per_task,
                                  "free": int(layer.units - self.cumulative[sl].sum())}
        return result


def weight_protection(layer: LayerPlan, out: torch.Tensor, inp: torch.Tensor | None,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """Which weight entries are frozen: output unit used and input unit used (HAT's min rule with binary
    cumulative masks); grouped convolutions pair each output with its group's inputs."""
    if layer.kind == "embedding":  # (tokens, units): a used unit's column; a tied LM head's used inputs too
        return (out if inp is None else out | inp).view(1, -1)
    if inp is None:  # linear_t weights are (in, out)
        return out.view(1, -1) if layer.kind == "linear_t" else out.view(-1, *([1] * (len(shape) - 1)))
    g = layer.groups
    if layer.kind == "linear":
        return out[:, None] & inp[None, :]
    if layer.kind == "linear_t":
        return inp[:, None] & out[None, :]
    if layer.kind == "conv":
        per_out = inp.view(g, -1).repeat_interleave(shape[0] // g, 0)
        grid = out[:, None] & per_out
    else:  # conv_transpose: weight is (in, out / groups, ...)
        per_in = out.view(g, -1).repeat_interleave(shape[0] // g, 0)
        grid = inp[:, None] & per_in
    return grid.view(*grid.shape, *([1] * (len(shape) - 2)))


def _update_protect(owner: nn.Module, attr: str, protect: torch.Tensor) -> None:
    chain = owner.parametrizations[attr]
    parametrization: Protect = chain[0]
    parametrization.forget_write_back()  # the read below restores frozen entries whatever moved them
    if fsdp.is_dtensor(chain.original):  # fully_shard: its shards hold the frozen values (fsdp.adopt)
        effective = fsdp.full(chain.original.detach())
    else:
        effective = getattr(owner, attr).detach()
    parametrization.update(effective, protect.to(parametrization.protect.device))


def mask_scale(schedule: str, s_max: float, b: int, num_batches: int) -> float:
    if schedule == "constant":
        return float(s_max)
    if schedule == "cosine":
        return max(1.0, s_max / 2 * math.cos(2 * math.pi * b / num_batches) + s_max / 2)
    if num_batches <= 1:
        return float(s_max)
    return 1 / s_max + (s_max - 1 / s_max) * b / (num_batches - 1)


def _checked_scale(value: Any) -> float:
    """A mask scale s > 0 and finite: sigmoid(s * e) with s <= 0 or inf/nan is no mask."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HatifyError(f"mask_scale must be a float or None, got {type(value).__name__}")
    # (not while compiling: a guard on the value would recompile for every new scale)
    if not torch.compiler.is_compiling() and not (math.isfinite(value) and value > 0):
        raise HatifyError(f"mask_scale must be a finite number > 0 (e.g. hat.mask_scale(b, B)), got {value}")
    return float(value)


def _sync_buffers(module: nn.Module) -> None:
    """Under DistributedDataParallel each replica updates running statistics with its own data after the last
    buffer broadcast; take rank 0's before freezing so every replica freezes the same task."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _batch_size(inputs: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((inputs, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return leaf.shape[0]
    return None
