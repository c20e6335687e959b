"""Train a hatify model with Lightning: one `Trainer.fit` per task, `HATCallback` runs the task lifecycle.

    >>> class Net(L.LightningModule):
    ...     def __init__(self, hat):
    ...         super().__init__(); self.hat, self.cb = hat, None
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         out = self.hat(x, task_id=self.cb.task_id, mask_scale=self.cb.mask_scale)
    ...         return F.cross_entropy(out, y) + self.hat.regularization()
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
    >>> net = Net(hat)
    >>> for t in range(5):
    ...     net.cb = HATCallback(hat, t)
    ...     L.Trainer(max_epochs=10, callbacks=[net.cb]).fit(net, loaders[t])

Notes:
- From the second task on, Lightning warns "Found N module(s) in eval mode at the start of training": those are
  the finished tasks' frozen copies (their heads, norm layers, opaque modules), kept in eval mode on purpose so that
  training never updates them. The warning is harmless for a hatify model.
- With `accumulate_grad_batches=k` the mask scale follows the optimizer step (micro-batch `batch_idx // k` of
  `ceil(num_training_batches / k)`), so all micro-batches of one step see the same masks.
"""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from ..errors import HatifyError
from ..model import HATModel
from ..norm_stats import has_running_statistics


class HATCallback(pl.Callback):
    """Trains task `task_id` of `hat` during one `Trainer.fit`: `hat.train()` and `hat.begin_task(task_id)` at
    fit start, `callback.mask_scale` set before every training batch, `hat.end_task()` when training ends.

    The user's `training_step` calls `hat(x, task_id=cb.task_id, mask_scale=cb.mask_scale)` and adds
    `hat.regularization()` to its loss. Validation runs in eval mode: call `hat(x, task_id=t)` there.

    Example:
        >>> cb = HATCallback(hat, task_id=0)
        >>> L.Trainer(max_epochs=5, callbacks=[cb]).fit(module, loader)
        >>> hat.trained_tasks
        [0]

    Where the model has BatchNorm running statistics, `end_task` gets `trainer.train_dataloader` to re-estimate
    them under the task's final masks (see `HATModel.end_task`).
    `observe=True` also records the task's statistics for task inference from `trainer.train_dataloader`
    (`hat.end_task(data=..., keep=keep)`), whose batches are `(inputs, labels)` or dicts holding `labels`.
    """

    def __init__(self, hat: HATModel, task_id: int, observe: bool = False, keep: int = 0) -> None:
        if not isinstance(hat, HATModel):
            raise HatifyError(f"HATCallback needs a model converted by hatify.hatify(...), got {type(hat).__name__}")
        self.hat = hat
        self.task_id = task_id
        self.observe, self.keep = observe, keep
        self.mask_scale: float = hat.plan.config.s_max

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hat not in set(pl_module.modules()):
            raise HatifyError(f"HATCallback: the hatify model is not a submodule of {type(pl_module).__name__}; "
                              f"assign it as an attribute (self.hat = hat) so Lightning moves and trains it")
        self.hat.train()  # Lightning keeps each module's mode; the model may still be in eval mode from the last task
        self.hat.begin_task(self.task_id)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        if math.isinf(batches):  # an iterable of unknown length: no annealing
            self.mask_scale = self.hat.plan.config.s_max
            return
        k = max(1, trainer.accumulate_grad_batches)
        self.mask_scale = self.hat.mask_scale(batch_idx // k, math.ceil(batches / k))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = self.observe or has_running_statistics(self.hat, self.hat.current_task)  # norms re-estimated too
        self.hat.end_task(data=trainer.train_dataloader if wanted else None, keep=self.keep)
