"""Train one task of a hatify model with the Hugging Face `Trainer`: a model wrapper and a callback.

    >>> from hatify.integrations.transformers import HATTaskModel, HATTrainerCallback
    >>> for t in range(5):
    ...     Trainer(model=HATTaskModel(hat, task_id=t), args=TrainingArguments(output_dir="out", num_train_epochs=8),
    ...             train_dataset=datasets[t], callbacks=[HATTrainerCallback()]).train()

- `HATTaskModel(hat, task_id, loss=F.cross_entropy)` is what the `Trainer` trains: it takes the batch's keys as
  keyword inputs (`hat(**inputs, task_id=t, mask_scale=s)`), and given `labels` returns `{"loss", "logits"}`
  with the loss `loss(logits, labels) + hat.regularization()` while training (no regulariser in evaluation, which
  uses binary masks). Its forward signature lists the model's inputs, so the Trainer keeps those batch keys.
- `HATTrainerCallback()` runs `hat.begin_task(t)` when training begins and `hat.end_task()` when it ends, and sets
  the mask scale before every optimizer step from the step's index within the epoch. `HATTrainerCallback(
  observe=True, keep=0)` also records the task's statistics for task inference from the training dataloader, which
  `end_task` also gets where the model has BatchNorm running statistics (re-estimated under the final masks).
- Gradient accumulation: the mask scale follows the optimizer step (every micro-batch of a step sees the same
  masks, the schedule spans `ceil(batches / gradient_accumulation_steps)` steps per epoch), and the Trainer
  divides each micro-batch's loss, regulariser included, by the number of micro-batches of the step
  (`accepts_loss_kwargs = False`): one step's gradient is the mean over its micro-batches.
- Do not pass `compute_loss_func`: the Trainer then expects a loss already normalised over the accumulated batch
  and would not divide the regulariser.
"""
from __future__ import annotations

import inspect
import math
import types
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..errors import HatifyError
from ..model import HATModel
from ..rewrite import SCALE_ARG, TASK_ARG
from ..norm_stats import has_running_statistics


class HATTaskModel(nn.Module):
    """Task `task_id` of a hatify model, called the way the `Trainer` calls models: `model(**batch)`.

    Example:
        >>> task = HATTaskModel(hat, task_id=0)
        >>> task.eval(); task(x=torch.randn(4, 64), labels=torch.zeros(4, dtype=torch.long))["logits"].shape
        torch.Size([4, 2])
    """

    accepts_loss_kwargs = False  # the Trainer then averages the loss over the micro-batches of one step

    def __init__(self, hat: HATModel, task_id: int,
                 loss: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy) -> None:
        if not isinstance(hat, HATModel):
            raise HatifyError(f"HATTaskModel needs a model converted by hatify.hatify(...), got {type(hat).__name__}")
        super().__init__()
        hat._task_ids(task_id, (), {})  # range check, with hatify's message
        self.hat = hat
        self.task_id = task_id
        self.loss = loss
        self.mask_scale: float = hat.plan.config.s_max
        # The Trainer keeps only the batch keys that forward's signature names: name the model's own inputs.
        names = [node.target for node in hat.net.graph.nodes
                 if node.op == "placeholder" and node.target not in (TASK_ARG, SCALE_ARG)]
        self.forward = types.MethodType(_forward_named(names), self)

    def forward(self, *inputs: Any, labels: torch.Tensor | None = None, **kw_inputs: Any) -> Any:
        scale = self.mask_scale if self.training else None
        out = self.hat(*inputs, **kw_inputs, task_id=self.task_id, mask_scale=scale)
        if labels is None:
            return out
        logits = out["logits"] if isinstance(out, Mapping) and "logits" in out else out
        loss = self.loss(logits, labels)
        if self.training:
            loss = loss + self.hat.regularization()
        return {"loss": loss, **out} if isinstance(out, Mapping) else {"loss": loss, "logits": out}


class HATTrainerCallback(TrainerCallback):
    """Runs the task lifecycle of the `HATTaskModel` the `Trainer` trains: `begin_task` when training begins,
    the mask scale before every optimizer step, `end_task` when training ends.

    Example:
        >>> Trainer(model=HATTaskModel(hat, 0), args=args, train_dataset=data,
        ...         callbacks=[HATTrainerCallback()]).train()
    """

    def __init__(self, observe: bool = False, keep: int = 0) -> None:
        self.observe, self.keep = observe, keep  # record task-inference statistics from the training data
        self.task: HATTaskModel | None = None
        self.steps_per_epoch: float = math.inf
        self.epoch_start = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        self.task = _task_model(model)
        try:
            self.steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        except TypeError:  # an iterable dataset: no epoch length, no annealing
            self.steps_per_epoch = math.inf
        self.task.hat.train()
        self.task.hat.begin_task(self.task.task_id)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.epoch_start = state.global_step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        hat = self.task.hat
        if math.isinf(self.steps_per_epoch):
            self.task.mask_scale = hat.plan.config.s_max
        else:
            self.task.mask_scale = hat.mask_scale(state.global_step - self.epoch_start, self.steps_per_epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                     **kwargs: Any) -> None:
        hat = self.task.hat
        wanted = self.observe or has_running_statistics(hat, hat.current_task)  # norms re-estimated too
        hat.end_task(data=train_dataloader if wanted else None, keep=self.keep)
        self.task = None


def _task_model(model: nn.Module | None) -> HATTaskModel:
    for module in model.modules() if model is not None else ():
        if isinstance(module, HATTaskModel):
            return module
    raise HatifyError(f"HATTrainerCallback: the Trainer's model must be (or hold) a HATTaskModel, got "
                      f"{type(model).__name__}; pass Trainer(model=HATTaskModel(hat, task_id), ...)")


def _forward_named(names: list[str]) -> Callable[..., Any]:
    """`HATTaskModel.forward` with a signature naming the model's inputs, one function per model."""
    def forward(self: HATTaskModel, *inputs: Any, **kw_inputs: Any) -> Any:
        return type(self).forward(self, *inputs, **kw_inputs)  # a subclass may override forward

    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", keyword)] + [inspect.Parameter(n, keyword, default=None) for n in names]
        + [inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None)])
    return forward
