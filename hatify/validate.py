"""The validator: open masks reproduce the original, the mask-flow plan matches what zeroing masks does at
run time, and every original parameter still receives a gradient."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .copying import detached_deepcopy
from .errors import HatifyError
from .inputs import Inputs
from .model import HATModel
from .probe import probe_flow
from .rewrite import KEPT, ROOT_HOLDER


def _unwrap(hat: Any) -> HATModel:
    while not isinstance(hat, HATModel) and isinstance(getattr(hat, "module", None), nn.Module):
        hat = hat.module
    if not isinstance(hat, HATModel):
        hat = getattr(hat, "_orig_mod", hat)
    if not isinstance(hat, HATModel):
        raise HatifyError(f"expected a model returned by hatify.hatify, got {type(hat).__name__}")
    return hat


@contextlib.contextmanager
def masks_open(hat: nn.Module) -> Iterator[None]:
    """Inside this context every mask is exactly 1, so `hat(*x, task_id=t)` equals the original model.

    Example:
        >>> with hatify.masks_open(hat):
        ...     torch.testing.assert_close(hat(x, task_id=0), model.eval()(x))
    """
    bank = _unwrap(hat).masks
    previous, bank.open = bank.open, True
    try:
        yield
    finally:
        bank.open = previous


@dataclass
class ValidationResult:
    passed: bool
    max_abs_diff: dict[str, float]
    tolerance: float
    probes: list[dict] = field(default_factory=list)
    probe_violations: int = 0
    missing_gradients: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    # Imprecision (not a failure): input units the plan leaves unknown that the probe finds exactly zero when
    # every mask is zero and nonzero under another pattern, so a mask does zero them: per layer, and in all.
    imprecise_units: dict[str, int] = field(default_factory=dict)

    @property
    def largest_difference(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "largest_difference": self.largest_difference, "probe_violations": self.probe_violations,
                "probes": self.probes, "missing_gradients": self.missing_gradients, "messages": self.messages,
                "imprecise_units": sum(self.imprecise_units.values()), "imprecise_layers": self.imprecise_units}


def _leaves(out: Any) -> dict[str, torch.Tensor]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return {pytree.keystr(path) or "output": leaf for path, leaf in flat if isinstance(leaf, torch.Tensor)}


def _seeded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return fn(*args, **kwargs)


def _open_outputs(model: nn.Module, hat: HATModel, inputs: Inputs, grad: bool = False
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original's (eval) and the open-mask HAT model's (task 0, eval) outputs, with the same random draws.
    `grad`: the HAT model's forward records its autograd graph, so the same forward serves `check_gradients`."""
    was = model.training
    model.eval()
    try:
        # the same random draws for both: random ops that run in eval mode (`F.dropout(x, 0.1)`,
        # `scaled_dot_product_attention(..., dropout_p=0.1)`) then match when the graphs match
        with torch.no_grad():
            ref = _leaves(_seeded(inputs.call, model))
    finally:
        model.train(was)
    got = _hat_outputs(hat, inputs, grad)
    if ref.keys() != got.keys():
        raise HatifyError(f"output structure differs: original {sorted(ref)} vs converted {sorted(got)}")
    return ref, got


def _hat_outputs(hat: HATModel, inputs: Inputs, grad: bool, backward: bool = False) -> dict[str, torch.Tensor]:
    """Task 0's outputs in eval mode with every mask open (seeded as the original's run). `grad`: record the
    autograd graph; the tensors a backward would read are kept only with `backward` (a walk of the graph,
    `_reached_leaves`, needs none of them, and they are a forward's worth of activations)."""
    was = hat.training
    hat.eval()
    try:
        with masks_open(hat), torch.set_grad_enabled(grad), \
                contextlib.nullcontext() if backward or not grad else _graph_only():
            return _leaves(_seeded(inputs.call, hat, task_id=0))
    finally:
        hat.train(was)


def _dropped(_: Any) -> None:
    raise HatifyError("internal: a backward through a forward recorded for the gradient walk only")


def _graph_only() -> contextlib.AbstractContextManager:
    """Autograd records the graph but keeps none of the tensors saved for a backward."""
    return torch.autograd.graph.saved_tensors_hooks(lambda _: None, _dropped)


def _differences(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    with torch.no_grad():
        diffs = {k: _largest(ref[k], got[k]) if ref[k].numel() else 0.0 for k in ref}
        scale = max((_largest(v) for v in ref.values() if v.numel() and v.is_floating_point()), default=1.0)
    return diffs, 1e-5 * max(1.0, scale)


_CHUNK = 1 << 20


def _largest(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """max |a - b| (or max |a|) in float64, NaN if any is, a million elements at a time: no float64 copies of a
    whole output (an LM's logits are the model's largest activation)."""
    if b is not None and a.shape != b.shape:  # (broadcast, as a plain difference would)
        return float((a.double() - b.double()).abs().max())
    a, b = a.reshape(-1), None if b is None else b.reshape(-1)
    parts = []
    for start in range(0, a.numel(), _CHUNK):
        part = a[start:start + _CHUNK].double()
        if b is not None:
            part = part - b[start:start + _CHUNK].double()
        parts.append(part.abs().max())
    return float(torch.stack(parts).max())


def compare_open(model: nn.Module, hat: HATModel, inputs: Inputs) -> tuple[dict[str, float], float]:
    """Largest absolute difference per output between the original (eval) and the open-mask HAT model."""
    return _differences(*_open_outputs(model, hat, inputs))


def original_parameter_map(hat: HATModel) -> dict[str, str]:
    """Original parameter name -> the converted model's parameter holding task 0's copy of it."""
    plan, mapping = hat.plan, {}
    for layer in plan.masked_layers:
        for qualname in (layer.weight, layer.bias):
            if qualname in layer.protected:
                owner, _, attr = qualname.rpartition(".")
                mapping[qualname] = f"{owner or ROOT_HOLDER}.parametrizations.{attr}.original"
            elif qualname:
                mapping[qualname] = qualname
    for module_plan in plan.modules:
        kept = module_plan.policy in KEPT
        module = hat.net.get_submodule(module_plan.name)
        for name, _ in (module if kept else module.copies[0]).named_parameters():
            mapping[f"{module_plan.name}.{name}"] = f"{module_plan.name}.{name}" if kept else \
                f"{module_plan.name}.copies.0.{name}"
    for param_plan in plan.params:
        mapping[param_plan.name] = param_plan.name if param_plan.policy in KEPT else f"{param_plan.name}.0"
    return mapping


def _loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    terms = [v.float().square().mean() for v in outputs.values() if v.is_floating_point() and v.requires_grad]
    return sum(terms) if terms else None


def _ungraded(model: nn.Module, params: dict[str, torch.Tensor], run) -> set[str]:
    """Names in `params` that get no gradient from a loss on `run(model)`'s outputs."""
    return _ungraded_from(_leaves(run(model)), params)


def _ungraded_from(outputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> set[str]:
    loss = _loss(outputs)
    if loss is None or not loss.requires_grad:  # (a detector that found nothing on the example: no gradient)
        return set(params)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {name for name, g in zip(params, grads) if g is None}


def _reached_leaves(outputs: dict[str, torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors the autograd graph of `outputs` reaches: those a backward would give a gradient,
    found by walking the graph instead of computing the backward."""
    reached = {id(v) for v in outputs.values() if v.requires_grad and v.grad_fn is None}
    stack = [v.grad_fn for v in outputs.values() if v.is_floating_point() and v.grad_fn is not None]
    seen = {id(fn) for fn in stack}
    while stack:
        for fn, _ in stack.pop().next_functions:
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
            if variable is not None:
                reached.add(id(variable))
            stack.append(fn)
    return reached


def check_gradients(hat: HATModel, inputs: Inputs, model: nn.Module | None = None,
                    outputs: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of original parameters that receive no gradient through the converted model (task 0, eval, masks
    open), leaving out those that get none through `model` (the original) either: an unused pooler, an untaken
    branch. `outputs`: that forward's outputs with their autograd graph, if already run (`validate` reuses the
    open-mask comparison's forward, recorded without saved tensors: a real backward, where one is needed, runs
    the forward again)."""
    if outputs is None:
        outputs = _hat_outputs(hat, inputs, grad=True)
    params = dict(hat.net.named_parameters())
    mapping = {orig: params[name] for orig, name in original_parameter_map(hat).items()
               if name in params and params[name].requires_grad}
    reached = _reached_leaves(outputs)
    unreached = {name: p for name, p in mapping.items() if id(p) not in reached}
    # a real backward decides the unreached ones (a function may reach a leaf outside the recorded graph)
    missing = _ungraded_from(_hat_outputs(hat, inputs, grad=True, backward=True), unreached) if unreached else set()
    if missing and model is not None:
        reference = detached_deepcopy(model).eval()
        own = {name: p for name, p in reference.named_parameters(remove_duplicate=False)
               if name in missing and p.requires_grad}
        missing -= _ungraded(reference, own, inputs.call) if own else set()
    return [name for name in mapping if name in missing]


def validate(model: nn.Module, hat: nn.Module, example_inputs: Any) -> ValidationResult:
    """Check a conversion: (a) open masks equal the original, (b) the mask-flow probe finds no unit the plan
    calls zero that is not, (c) every original parameter gets a gradient. `example_inputs` as for `hatify`.

    Example:
        >>> result = hatify.validate(model, hat, (x,))
        >>> result.passed, result.largest_difference
        (True, 0.0)
    """
    hat = _unwrap(hat)
    inputs = Inputs.of(example_inputs)
    ref, got = _open_outputs(model, hat, inputs, grad=True)  # one forward: the comparison and the gradients
    diffs, tol = _differences(ref, got)
    missing = check_gradients(hat, inputs, model, got)
    del ref, got  # free the recorded graph before the probes
    probes, violations, imprecise = probe_flow(hat, inputs)
    messages = [f"output {k}: open-mask difference {v:.3g} > {tol:.3g}" for k, v in diffs.items() if v > tol]
    if violations:
        messages.append(f"mask-flow probe: {violations} input units predicted zero were not")
    if missing:
        messages.append(f"{len(missing)} parameter(s) get no gradient: {', '.join(missing[:5])}")
    passed = not messages
    return ValidationResult(passed, diffs, tol, probes, violations, missing, messages, imprecise)
