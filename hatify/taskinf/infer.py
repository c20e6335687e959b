"""Predicting the task of each sample: every observed task scores the batch under its own masks (one model
call), a score picks the task, and the chosen task's outputs are returned per sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HatifyError
from .forward import run_tasks, select_rows
from .scores import SCORES, Context, Score

DEFAULT_METHOD = "mahalanobis"


@dataclass
class TaskPrediction:
    """`task` (batch,) the predicted task ids, `probs` (batch, observed tasks) P(task | x) in the order of
    `tasks`, `classes` (batch,) the within-task class under the predicted task, `outputs` the predicted task's
    outputs per sample in the model's output structure. A class-incremental label is (task, class).
    `class_probs` (batch, observed tasks x classes): P(task, class | x) = P(task | x) P(class | x, task), the
    classes of `tasks[i]` at columns i * classes ... (i + 1) * classes - 1 (one head over all classes seen)."""

    task: torch.Tensor
    probs: torch.Tensor
    classes: torch.Tensor
    outputs: Any
    tasks: list[int]
    class_probs: torch.Tensor


def infer_task(hat, inputs: tuple, kwargs: dict, method: str | None = None,
               logits: str | int | None = None) -> TaskPrediction:
    tasks = hat.task_stats.tasks()
    if not tasks:
        raise HatifyError("infer_task needs observed tasks: call hat.end_task(data=...) or hat.observe(t, data) "
                          "after training a task")
    if kwargs:
        kwargs = hat._keywords(inputs, kwargs)
    scorer = _scorer(hat, method, tasks, logits)
    was_training = hat.training
    hat.eval()
    try:
        with torch.no_grad():
            run = run_tasks(hat, inputs, kwargs, tasks, logits, features=scorer.needs_features)
            if scorer.needs_features and run.features is None:
                raise HatifyError(f"method={scorer.name!r} needs the features entering the head, which this model "
                                  "does not expose to hatify (its head is no module); use method='max_logit'")
            score = scorer.score(run.logits, run.features)
    finally:
        hat.train(was_training)
    batch = score.shape[0]
    best = score.argmax(1)
    chosen = torch.tensor(tasks, device=best.device)[best]
    rows = best * batch + torch.arange(batch, device=best.device)
    classes = run.logits.reshape(len(tasks) * batch, -1)[rows].argmax(1)
    probs = (score / scorer.temperature).softmax(1)
    joint = probs[:, :, None] * run.logits.softmax(-1).transpose(0, 1)
    return TaskPrediction(chosen, probs, classes, select_rows(run.outputs, rows, len(tasks) * batch), tasks,
                          joint.reshape(batch, -1))


def _scorer(hat, method: str | None, tasks: list[int], logits: str | int | None) -> Score:
    """The score, set up for the current statistics (cached until they change)."""
    name = DEFAULT_METHOD if method is None else method
    if name not in SCORES:
        raise HatifyError(f"unknown task-inference method {name!r}; known: {', '.join(SCORES)}")
    stats = hat.task_stats
    key = (name, stats.version, tuple(tasks), logits)
    cache = hat.__dict__.setdefault("_task_scores", {})
    if key not in cache:
        scorer = SCORES[name]()
        if scorer.needs_buffer and any(stats.buffer(t) is None for t in tasks):
            raise HatifyError(f"method={name!r} needs kept samples of every task: observe them with keep=n")
        was_training = hat.training
        hat.eval()
        try:
            with torch.no_grad():
                scorer.setup(Context(stats, tasks, lambda i, k: run_tasks(hat, i, k, tasks, logits,
                                                                          features=scorer.needs_features)))
        finally:
            hat.train(was_training)
        cache.clear()
        cache[key] = scorer
    return cache[key]
