"""HATConfig: every knob of the conversion and of HAT training, with the defaults documented."""
from __future__ import annotations

import dataclasses
import fnmatch
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
    # Heads: "auto" makes every layer whose output reaches a task output (`task_outputs`) without passing
    # another HAT layer a per-task head; "none" masks every layer; a tuple names the head modules explicitly.
    heads: Any = "auto"
    # Which outputs a task is trained on (heads="auto" makes heads only of the layers reaching these): "auto" is
    # `logits` and `loss` for a transformers `ModelOutput` that has `logits` (a task head), else "all";
    # a tuple names outputs by key or position (`("logits",)`, `("last_hidden_state",)`, `(0,)`). The other
    # outputs (`encoder_last_hidden_state`) are gated like any hidden state, bit-identical for finished tasks too.
    task_outputs: Any = "auto"
    # Parameters outside HAT layers (position embeddings, class tokens, layer scale, loose biases, the
    # parameters of opaque leaves): "per_task" keeps one copy per task; "freeze" freezes them after the
    # first trained task.
    loose_params: Literal["per_task", "freeze"] = "per_task"
    # Parameters with requires_grad=False at conversion (a frozen pretrained backbone) stay as they are: no
    # protection buffers, no gradient mask, no per-task copy (a BatchNorm with running statistics still gets one
    # copy per task: its statistics move in train mode). For a layer whose parameters are all frozen, "keep"
    # (default) leaves it without a gate, as in the original; "gate" gives it a per-task gate on its output units
    # (each task selects units of the fixed layer). A frozen head is kept as it is, not copied per task.
    frozen_layers: Literal["keep", "gate"] = "keep"
    # Where HAT goes: fnmatch patterns on module and parameter names (`blocks.10.*`, `*.lora_*`); a pattern also
    # matches everything inside the module it names. Empty `include`: everything. Heads follow `heads`.
    include: tuple = ()
    exclude: tuple = ()
    # Every parameter outside the selection: "frozen" (requires_grad=False, kept as it is), "per_task" (one
    # copy per task) or "shared" (trainable and shared by every task: unprotected, old tasks FORGET; warned
    # about at conversion and listed in the report).
    unselected: Literal["frozen", "per_task", "shared"] = "frozen"
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
                              ("regularizer", ("network", "layer")), ("loose_params", ("per_task", "freeze")),
                              ("frozen_layers", ("keep", "gate")), ("unselected", ("frozen", "per_task", "shared"))):
            if getattr(self, name) not in allowed:
                raise HatifyError(f"HATConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.heads in ("auto", "none") or isinstance(self.heads, (tuple, list))):
            raise HatifyError(f"HATConfig.heads must be 'auto', 'none' or a tuple of module names, got {self.heads!r}")
        if not (self.task_outputs in ("auto", "all") or isinstance(self.task_outputs, (tuple, list))):
            raise HatifyError(f"HATConfig.task_outputs must be 'auto', 'all' or a tuple of output names, got "
                              f"{self.task_outputs!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
                raise HatifyError(f"HATConfig.{name} must be a tuple of name patterns (fnmatch, e.g. 'blocks.10.*'), "
                                  f"got {patterns!r}")

    def selects(self, name: str) -> bool:
        """Whether HAT goes on the module or parameter `name` (`include`/`exclude`; a pattern naming a module
        covers everything inside it).

        Example:
            >>> HATConfig(include=("blocks.1",)).selects("blocks.1.attn.qkv")
            True
        """
        def hit(patterns: tuple) -> bool:
            parts = name.split(".")
            scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            return any(fnmatch.fnmatchcase(scope, p) for p in patterns for scope in scopes)

        return (not self.include or hit(self.include)) and not hit(self.exclude)

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
        out["task_outputs"] = self.task_outputs if isinstance(self.task_outputs, str) else list(self.task_outputs)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out
