"""HATConfig: every knob of the conversion and of HAT training, with the defaults documented."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import HatifyError


@dataclass(frozen=True)
class HATConfig:
    """Frozen configuration for `hatify.hatify`.

    Example:
        >>> cfg = HATConfig(s_max=400.0, init="normal", schedule="linear")
        >>> cfg.replace(c=0.5).c
        0.5
    """

    # Mask scale: s anneals within every epoch up to s_max; evaluation uses binary masks.
    s_max: float = 400.0
    # Annealing strategy of `mask_scale(b, B)`: "linear" (Serra et al.), "cosine" or "constant" (HAT-CL).
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    # Task embedding initialisation: "normal" N(0, 1) as the paper, or "dense" (all gates open, e = dense_value).
    init: Literal["normal", "dense"] = "normal"
    dense_value: float = 1.0
    # Regulariser weight c and form: "network" (Serra et al.) or "layer" (HAT-CL's per-layer average).
    c: float = 0.75
    regularizer: Literal["network", "layer"] = "network"
    # Embeddings are clamped to [-clamp, clamp] after every optimizer step.
    clamp: float = 6.0
    # Heads: "auto" makes every layer whose output reaches the model output without passing another
    # HAT layer a per-task head; "none" masks every layer; a tuple names the head modules explicitly.
    heads: Any = "auto"
    # Parameters outside HAT layers (position embeddings, class tokens, layer scale, loose biases, the
    # parameters of opaque leaves): "per_task" keeps one copy per task; "freeze" freezes them after the
    # first trained task.
    loose_params: Literal["per_task", "freeze"] = "per_task"
    # Capture: extra leaf module types or qualified names, and concrete args for torch.fx.
    leaf_modules: tuple = ()
    concrete_args: dict | None = None
    # Mask flow: more union terms than this for one tensor is treated as unknown (all ones).
    max_union_terms: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.s_max <= 1:
            raise HatifyError(f"HATConfig.s_max must be > 1, got {self.s_max}")
        for name, allowed in (("schedule", ("linear", "cosine", "constant")), ("init", ("normal", "dense")),
                              ("regularizer", ("network", "layer")), ("loose_params", ("per_task", "freeze"))):
            if getattr(self, name) not in allowed:
                raise HatifyError(f"HATConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.heads in ("auto", "none") or isinstance(self.heads, (tuple, list))):
            raise HatifyError(f"HATConfig.heads must be 'auto', 'none' or a tuple of module names, got {self.heads!r}")

    def replace(self, **changes: Any) -> "HATConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise HatifyError(f"unknown HATConfig field(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["leaf_modules"] = [m if isinstance(m, str) else f"{m.__module__}.{m.__qualname__}"
                               for m in self.leaf_modules]
        out["heads"] = self.heads if isinstance(self.heads, str) else list(self.heads)
        return out
