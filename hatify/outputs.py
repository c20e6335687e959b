"""Task outputs: which of the model's outputs a task is trained on. A layer becomes a per-task head only where it
reaches one of them without passing another HAT layer; an auxiliary output (a returned hidden state such as
`encoder_last_hidden_state` next to `logits`) is gated like any other tensor and stays bit-identical for finished
tasks all the same, since every tensor a finished task computes depends only on protected weights and its own
copies."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .config import HATConfig
from .errors import HatifyError
from .inputs import StructuredOutput

# A transformers output with `logits`: the task is trained on the logits (and the loss computed from them).
_DEFAULT_WITH_LOGITS = ("logits", "loss")


def output_leaves(gm: fx.GraphModule) -> list[tuple[str, str, Any]]:
    """The graph's output leaves in order: (first key of the leaf's path, its full path, the leaf). The first key
    is an output's name (`logits`), a dict key, or a tuple position (`0`); the full path is `pytree.keystr`."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    returned = output.args[0]
    codegen = gm.graph._codegen
    if isinstance(codegen, StructuredOutput):
        # Paths from the structure rebuilt around stand-in tensors (a ModelOutput checks its first field's type).
        stand_ins = pytree.tree_unflatten([torch.empty(0)] * codegen.spec.num_leaves, codegen.spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(stand_ins)[0]]
        pairs = list(zip(paths, returned))
    else:
        pairs = pytree.tree_flatten_with_path(returned)[0]
    return [(_key_name(path[0]) if path else "", pytree.keystr(path), leaf) for path, leaf in pairs]


def _returns_model_output(gm: fx.GraphModule) -> bool:
    """Whether the model returns a transformers `ModelOutput` (whose `logits` are what its task head computes; a
    plain dict's `logits` may sit next to another head's output)."""
    codegen = gm.graph._codegen
    kind = codegen.spec.type if isinstance(codegen, StructuredOutput) else None
    return isinstance(kind, type) and any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers")
                                          for c in kind.__mro__)


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def task_output_nodes(gm: fx.GraphModule, config: HATConfig) -> set[fx.Node]:
    """The graph nodes returned as task outputs (`HATConfig.task_outputs`): "all"; names of outputs (first keys
    or full paths); "auto", the default: `logits` and `loss` where the output is a transformers `ModelOutput` with
    `logits`, else all.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: {"logits": x * 2, "features": x + 1})
        >>> [n.name for n in task_output_nodes(gm, HATConfig(task_outputs=("logits",)))]
        ['mul']
    """
    leaves = output_leaves(gm)
    wanted = config.task_outputs
    names = {name for name, _, _ in leaves}
    if wanted == "auto":
        wanted = _DEFAULT_WITH_LOGITS if "logits" in names and _returns_model_output(gm) else "all"
    if wanted == "all":
        return {leaf for _, _, leaf in leaves if isinstance(leaf, fx.Node)}
    wanted = {str(w) for w in wanted}
    found = {leaf for name, path, leaf in leaves if (name in wanted or path in wanted) and isinstance(leaf, fx.Node)}
    unknown = wanted - names - {path for _, path, _ in leaves} - {"loss"}  # a loss is returned only with labels
    if unknown or not found:
        known = ", ".join(dict.fromkeys(name for name, _, _ in leaves if name)) or "one unnamed tensor"
        raise HatifyError(f"HATConfig.task_outputs names {', '.join(sorted(unknown or wanted))}, which the model "
                          f"does not return as a tensor; its outputs: {known}")
    return found
