"""Train a hatify model with Avalanche: a `MultiTaskModule` wrapper, a plugin and a ready strategy.

    >>> from avalanche.training import Naive
    >>> from hatify.integrations.avalanche import HAT, HATMultiTaskModule, HATPlugin
    >>> strategy = Naive(model=HATMultiTaskModule(hat), optimizer=opt, plugins=[HATPlugin()], train_epochs=10)
    >>> strategy = HAT(model=hat, optimizer=opt, train_epochs=10)          # the same, in one name
    >>> for experience in benchmark.train_stream:
    ...     strategy.train(experience); strategy.eval(benchmark.test_stream)

The layout follows Avalanche's PackNet (model wrapper, plugin, strategy = `SupervisedTemplate` + plugin). Notes:
- The benchmark must carry task labels (task-incremental: `nc_benchmark(..., task_labels=True)`,
  `task_incremental_benchmark(bm)`); a training experience holds one task, its label below `hat.num_tasks`.
  Evaluation minibatches may mix tasks (one label per sample).
- Online streams: a task begins with its first sub-experience and ends after the last one where the stream
  gives access to task boundaries; without it, a task ends when the next task's label arrives (call
  `hat.end_task()` yourself after the last one).
- The optimizer keeps the parameter objects of a finished task (they are buffers in the model now); they get
  no gradient, so it never moves them. `make_optimizer(remove_params=True)` drops them.
- `avalanche.checkpointing` pickles the model, which torch refuses for parametrized modules: save with
  `hatify.save(hat, path)` between experiences instead.
"""
from __future__ import annotations

from typing import Any

import torch
from avalanche.benchmarks import OnlineCLExperience
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..errors import HatifyError
from ..model import HATModel
from ..norm_stats import has_running_statistics


class HATMultiTaskModule(MultiTaskModule):
    """A hatify model as an Avalanche `MultiTaskModule`: Avalanche then passes each minibatch's task labels.

    `forward(x, task_labels)` runs `hat(x, task_id=task_labels, mask_scale=...)`: soft masks at the mask scale
    `HATPlugin` sets while training, binary masks in eval mode. Per-sample labels may mix tasks. Without labels
    it trains the task in progress, and in eval mode returns every task's outputs as a dict. With
    `infer_task=True` evaluation is class-incremental: the task labels are ignored, the task is predicted
    (`hat.infer_task`, tasks observed with `HATPlugin(observe=True)`), and the output is log P(task, class | x)
    over all classes seen, the column of class j of task t being t * classes + j.

    Example:
        >>> model = HATMultiTaskModule(hatify.hatify(net, num_tasks=5, example_inputs=(x,)))
        >>> model.eval(); model(x, torch.zeros(len(x), dtype=torch.long)).shape
    """

    def __init__(self, hat: HATModel, infer_task: bool = False) -> None:
        if not isinstance(hat, HATModel):
            raise HatifyError(f"HATMultiTaskModule wraps a model converted by hatify.hatify(...), "
                              f"got {type(hat).__name__}")
        super().__init__()
        self.hat = hat
        self.mask_scale: float | None = None
        # Class-incremental evaluation: ignore the task labels and predict the task (see `forward`).
        self.infer_task = infer_task

    def adaptation(self, experience: Any) -> None:
        """Nothing to adapt: every task's heads and masks exist from the conversion on."""

    def forward(self, x: Any, task_labels: torch.Tensor | int | None = None) -> Any:
        if self.infer_task and not self.training:
            # One head over every class seen: log P(task, class | x), class j of task t at column t * C + j
            # (tasks 0..T-1 observed, C classes each), as a class-incremental stream labels them.
            return self.hat.infer_task(x).class_probs.clamp_min(1e-30).log()
        if task_labels is None:  # Avalanche passes none for experiences without a `task_labels` attribute (online)
            if self.training and self.hat.current_task is not None:
                task_labels = self.hat.current_task
            else:
                return self.forward_all_tasks(x)
        scale = self.mask_scale if self.training else None
        return self.hat(x, task_id=task_labels, mask_scale=scale)

    def forward_single_task(self, x: Any, task_label: int) -> Any:
        return self.forward(x, task_label)

    def forward_all_tasks(self, x: Any) -> dict[int, Any]:
        """Outputs of every trained task (and the one in training), keyed by task id."""
        tasks = list(self.hat.trained_tasks)
        if self.hat.current_task is not None:
            tasks.append(self.hat.current_task)
        return {t: self.forward(x, t) for t in tasks}


class HATPlugin(SupervisedPlugin, supports_distributed=True):
    """Runs HAT's task lifecycle inside any Avalanche strategy whose model is (or holds) a `HATMultiTaskModule`.

    - before a training experience: `hat.begin_task(t)`, t the experience's task label;
    - before each forward: the mask scale from the batch index within the epoch
      (`hat.mask_scale(clock.train_epoch_iterations, len(dataloader))`);
    - before backward: `hat.regularization()` added to the loss;
    - after the experience: `hat.end_task()` (the task's outputs are then bit-identical forever), given the
      experience's training data where the model has BatchNorm running statistics (re-estimated); with
      `observe=True` also the task's statistics for task inference from its training data (`keep=n` samples per
      class kept), for class-incremental evaluation with `HATMultiTaskModule(hat, infer_task=True)`.
    Every rank of a distributed run does the same, so the replicas stay equal.

    Example:
        >>> strategy = Naive(model=HATMultiTaskModule(hat), optimizer=opt, plugins=[HATPlugin()])
    """

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        module = _hat_module(strategy.model)
        hat, task = module.hat, _task_label(strategy.experience, module.hat.num_tasks)
        if hat.current_task == task:  # the next sub-experience of an online stream
            return
        if hat.current_task is not None:  # a boundary-agnostic online stream moved on to the next task
            hat.end_task()
        hat.begin_task(task)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        module = _hat_module(strategy.model)
        try:
            batches = len(strategy.dataloader)
        except TypeError:  # an iterable without a length: no annealing
            batches = 1
        module.mask_scale = module.hat.mask_scale(strategy.clock.train_epoch_iterations, batches)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss = strategy.loss + _hat_module(strategy.model).hat.regularization()

    def __init__(self, observe: bool = False, keep: int = 0) -> None:
        super().__init__()
        # Record task-inference statistics (and keep n samples per class) from each experience's training data.
        self.observe, self.keep = observe, keep

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        module = _hat_module(strategy.model)
        module.mask_scale = None
        experience = strategy.experience
        if isinstance(experience, OnlineCLExperience) and not (
                experience.access_task_boundaries and experience.is_last_subexp):
            return
        if module.hat.current_task is not None:
            hat = module.hat
            wanted = self.observe or has_running_statistics(hat, hat.current_task)  # norms re-estimated too
            hat.end_task(data=_batches(experience, strategy) if wanted else None, keep=self.keep)


def _batches(experience: Any, strategy: Any) -> Any:
    """The experience's training data as (inputs, labels) batches, with its evaluation transforms."""
    data = experience.dataset.eval() if hasattr(experience.dataset, "eval") else experience.dataset
    loader = torch.utils.data.DataLoader(data, batch_size=strategy.train_mb_size)
    return ((batch[0], batch[1]) for batch in loader)  # Avalanche's batches are (x, y, task label)


class HAT(SupervisedTemplate):
    """Task-incremental learning with hard attention to the task: Avalanche's `SupervisedTemplate` plus
    `HATPlugin`, the model wrapped in `HATMultiTaskModule` (the same results as `Naive` with the plugin).

    Example:
        >>> hat = hatify.hatify(net, num_tasks=5, example_inputs=(x,))
        >>> strategy = HAT(model=hat, optimizer=torch.optim.AdamW(hat.parameters(), lr=1e-2), train_epochs=10)
    """

    def __init__(self, *, model: HATModel | HATMultiTaskModule, optimizer: torch.optim.Optimizer,
                 criterion: nn.Module | None = None, train_mb_size: int = 1, train_epochs: int = 1,
                 eval_mb_size: int | None = None, device: str | torch.device = "cpu",
                 plugins: list[Any] | None = None, evaluator: Any = default_evaluator, eval_every: int = -1,
                 **base_kwargs: Any) -> None:
        if isinstance(model, HATModel):
            model = HATMultiTaskModule(model)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion or nn.CrossEntropyLoss(),
                         train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size,
                         device=device, plugins=[*(plugins or []), HATPlugin()], evaluator=evaluator,
                         eval_every=eval_every, **base_kwargs)


def _hat_module(model: nn.Module) -> HATMultiTaskModule:
    """The strategy's `HATMultiTaskModule` (also inside a DistributedDataParallel or other wrapper)."""
    for module in model.modules():
        if isinstance(module, HATMultiTaskModule):
            return module
    hint = ("wrap it: HATMultiTaskModule(hat), or use the HAT strategy" if isinstance(model, HATModel)
            else "build the model with hatify.hatify(...) and wrap it in HATMultiTaskModule")
    raise HatifyError(f"HATPlugin needs the strategy's model to be a HATMultiTaskModule, got "
                      f"{type(model).__name__}: {hint}")


def _task_label(experience: Any, num_tasks: int) -> int:
    """The single task label of a training experience (an online sub-experience may only know its origin's)."""
    labels = getattr(experience, "task_labels", None)
    if labels is None and isinstance(experience, OnlineCLExperience):
        labels = getattr(experience.origin_experience, "task_labels", None)
    if labels is None:
        raise HatifyError("HATPlugin: the training experience carries no task labels; build a task-incremental "
                          "benchmark (nc_benchmark(..., task_labels=True) or task_incremental_benchmark(bm))")
    labels = sorted(set(int(t) for t in labels))
    if len(labels) != 1:
        raise HatifyError(f"HATPlugin: training experience {getattr(experience, 'current_experience', '?')} holds "
                          f"task labels {labels}; HAT trains one task at a time, so each training experience "
                          f"must hold exactly one task")
    if not 0 <= labels[0] < num_tasks:
        raise HatifyError(f"HATPlugin: task label {labels[0]} of training experience "
                          f"{getattr(experience, 'current_experience', '?')} is out of range: the model was "
                          f"converted with num_tasks={num_tasks}; convert it with more tasks")
    return labels[0]
