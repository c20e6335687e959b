"""Recording a finished task's statistics (and optional buffer) from its training batches, under its final
binary masks, in eval mode and without gradients: the task's outputs are not changed by it."""
from __future__ import annotations

from typing import Any

import torch

from ..batches import iterate_batches, model_device
from ..errors import HatifyError
from .forward import run_tasks

# Features wider than this get no class means / covariance (the covariance would be too large to keep).
MAX_FEATURES = 4096


def observe(hat, t: int, data: Any, keep: int = 0, logits: str | int | None = None) -> None:
    """Record task t's statistics from `data` (see `hatify.batches.iterate_batches`); `keep=n` also keeps up to
    n samples per class as a buffer. Replaces what was recorded for t before."""
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < hat.num_tasks or not bool(hat.trained[t]):
        raise HatifyError(f"observe({t!r}): task {t} is not a finished task (trained: {hat.trained_tasks}); "
                          "call it after end_task()")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise HatifyError(f"keep must be a number of samples per class (an int >= 0), got {keep!r}")
    stats = hat.task_stats
    was_training = hat.training
    hat.eval()
    try:
        with torch.no_grad():
            summary, kept = _summarise(hat, t, data, keep, logits)
    finally:
        hat.train(was_training)
    stats.drop(t)
    for name, value in summary.items():
        stats.put(t, name, value)
    for name, value in kept.items():
        stats.put(t, name, value)


def _summarise(hat, t: int, data: Any, keep: int, logits: str | int | None) -> tuple[dict, dict]:
    n = 0
    moments = torch.zeros(4, dtype=torch.float64)  # sum, sum of squares of max logit; same of energy
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    use_features = True
    kept: dict[str, list] = {}
    kept_labels: list[torch.Tensor] = []
    for inputs, kwargs, labels in iterate_batches(data, model_device(hat)):  # a loader's batches may be on the CPU
        run = run_tasks(hat, inputs, kwargs, [t], logits, features=use_features)
        scores = run.logits[0].double()
        if labels.shape[0] != scores.shape[0]:
            raise HatifyError(f"a batch has {labels.shape[0]} labels for {scores.shape[0]} samples")
        if int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]:
            raise HatifyError(f"labels must be within-task classes 0..{scores.shape[1] - 1}, got "
                              f"{int(labels.min())}..{int(labels.max())}")
        top, energy = scores.max(1).values, scores.logsumexp(1)
        moments += torch.stack([top.sum(), (top ** 2).sum(), energy.sum(), (energy ** 2).sum()]).cpu()
        n += scores.shape[0]
        feats = run.features
        if feats is None or feats.shape[-1] > MAX_FEATURES:
            use_features, sums = False, None
        if use_features:
            f = feats[0].double().cpu()
            if sums is None:
                sums = f.new_zeros(scores.shape[1], f.shape[1])
                counts = f.new_zeros(scores.shape[1])
                outer = f.new_zeros(f.shape[1], f.shape[1])
            y = labels.cpu()
            sums.index_add_(0, y, f)
            counts.index_add_(0, y, torch.ones_like(y, dtype=f.dtype))
            outer += f.T @ f
        if keep:
            _keep(kept, kept_labels, inputs, kwargs, labels, keep)
    if n == 0:
        raise HatifyError(f"observe({t}): data holds no batches")
    mean_top, mean_energy = moments[0] / n, moments[2] / n
    std = lambda squares, mean: (squares / n - mean ** 2).clamp_min(1e-12).sqrt()
    summary = {"logit_moments": torch.stack([mean_top, std(moments[1], mean_top), mean_energy,
                                             std(moments[3], mean_energy)]).float()}
    if use_features and sums is not None:
        means = sums / counts.clamp_min(1)[:, None]
        within = (outer - (means.T * counts) @ means) / max(n - int((counts > 0).sum()), 1)
        summary.update(class_means=means.float(), covariance=within.float(), class_counts=counts.float())
    buffer = {}
    if keep and kept_labels:
        buffer["buffer_labels"] = torch.cat(kept_labels)
        for name, parts in kept.items():
            buffer[name] = torch.cat(parts)
    return summary, buffer


def _keep(kept: dict, kept_labels: list, inputs: tuple, kwargs: dict, labels: torch.Tensor, keep: int) -> None:
    """Take the first samples of each class until `keep` of it are held."""
    have = torch.cat(kept_labels) if kept_labels else labels.new_zeros(0)
    take = []
    for i, y in enumerate(labels.tolist()):
        if int((have == y).sum()) + sum(1 for j in take if int(labels[j]) == y) < keep:
            take.append(i)
    if not take:
        return
    rows = torch.tensor(take)
    named = [(f"buffer_arg{i}", v) for i, v in enumerate(inputs)] + [(f"buffer_kw_{k}", v) for k, v in kwargs.items()]
    for name, value in named:
        if not isinstance(value, torch.Tensor) or value.shape[0] != labels.shape[0]:
            raise HatifyError(f"keep= needs every input to be a batched tensor; {name[7:]} is not")
        kept.setdefault(name, []).append(value.detach().index_select(0, rows.to(value.device)).cpu())
    kept_labels.append(labels.index_select(0, rows).cpu())
