"""Continual-learning metrics from an accuracy matrix R[i][j] = accuracy on task j after training task i."""
from __future__ import annotations

from typing import Sequence


def summarize(acc: Sequence[Sequence[float]]) -> dict[str, float | list[float]]:
    """ACC, BWT and per-task forgetting (HAT.md, "Metrics").

    Example:
        >>> summarize([[0.9, 0.0], [0.8, 0.95]])["bwt"]
        -0.09999999999999998
    """
    last = len(acc) - 1
    acc_final = sum(acc[last]) / len(acc[last])
    bwt = sum(acc[last][j] - acc[j][j] for j in range(last)) / last if last else 0.0
    forgetting = [max(acc[i][j] for i in range(j, last)) - acc[last][j] if j < last else 0.0
                  for j in range(len(acc[last]))]
    return {"acc": acc_final, "bwt": bwt, "forgetting": forgetting}
