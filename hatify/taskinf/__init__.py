"""Task inference: predict which task a sample belongs to, for class-incremental use of a HAT model.

    >>> hat.end_task(data=train_batches)          # statistics of the finished task, under its binary masks
    >>> pred = hat.infer_task(x)                  # TaskPrediction(task, probs, classes, outputs, tasks)
"""
from .infer import DEFAULT_METHOD, TaskPrediction
from .scores import SCORES, Score, register

__all__ = ["DEFAULT_METHOD", "SCORES", "Score", "TaskPrediction", "register"]
