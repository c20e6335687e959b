"""The validator: open masks reproduce the original, the mask-flow plan matches what zeroing masks does at
run time, and every original parameter still receives a gradient."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import HatifyError
from .model import HATModel
from .plan import LayerPlan
from .rewrite import ROOT_HOLDER, SCALE_ARG, TASK_ARG
from .shapes import Interpreter


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

    @property
    def largest_difference(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "largest_difference": self.largest_difference, "probe_violations": self.probe_violations,
                "probes": self.probes, "missing_gradients": self.missing_gradients, "messages": self.messages}


def _leaves(out: Any) -> dict[str, torch.Tensor]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return {pytree.keystr(path) or "output": leaf for path, leaf in flat if isinstance(leaf, torch.Tensor)}


def compare_open(model: nn.Module, hat: HATModel, inputs: tuple) -> tuple[dict[str, float], float]:
    """Largest absolute difference per output between the original (eval) and the open-mask HAT model."""
    was_model, was_hat = model.training, hat.training
    model.eval(), hat.eval()
    try:
        with torch.no_grad(), masks_open(hat):
            ref = _leaves(model(*inputs))
            got = _leaves(hat(*inputs, task_id=0))
    finally:
        model.train(was_model), hat.train(was_hat)
    if ref.keys() != got.keys():
        raise HatifyError(f"output structure differs: original {sorted(ref)} vs converted {sorted(got)}")
    diffs = {k: float((ref[k].double() - got[k].double()).abs().max()) if ref[k].numel() else 0.0 for k in ref}
    scale = max((float(v.double().abs().max()) for v in ref.values() if v.numel() and v.is_floating_point()),
                default=1.0)
    return diffs, 1e-5 * max(1.0, scale)


class _InputRecorder(Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[str]) -> None:
        super().__init__(gm)
        self.watch, self.seen = watch, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            data = n.args[0] if n.args else n.kwargs.get("input")
            value = self.env.get(data) if isinstance(data, fx.Node) else None
            if isinstance(value, torch.Tensor):
                self.seen.setdefault(n.name, []).append(value.detach())
        return super().run_node(n)


def _positional(hat: HATModel, inputs: tuple, task: int, scale: float | None) -> list:
    args = list(inputs)
    for node in hat.net.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target == TASK_ARG:
            args.append(task)
        elif node.target == SCALE_ARG:
            args.append(scale)
        elif len(args) <= [n for n in hat.net.graph.nodes if n.op == "placeholder"].index(node):
            args.append(node.args[0] if node.args else None)
    return args


def _zero_units(value: torch.Tensor, layer: LayerPlan, axis: int) -> torch.Tensor:
    moved = value.movedim(axis, -1).reshape(-1, value.shape[axis])
    return (moved == 0).all(0)


def probe_flow(hat: HATModel, inputs: tuple, fractions=(0.5, 0.9, 1.0), seeds=(0, 1)) -> tuple[list[dict], int]:
    """Zero random mask units, run the model, and check that every consumer input unit the plan predicts to
    be zero is exactly zero (soundness). Also counts zeros the plan did not predict (conservatism)."""
    layers = [layer for layer in hat.plan.masked_layers if layer.input_index is not None]
    watch = {site.node: layer for layer in layers for site in layer.sites}
    units = hat.plan.total_units
    results, violations = [], 0
    was = hat.training
    hat.eval()
    try:
        for fraction in fractions:
            for seed in seeds:
                gen = torch.Generator().manual_seed(seed)
                keep = (torch.rand(units, generator=gen) >= fraction).float()
                hat.masks.override = keep
                recorder = _InputRecorder(hat.net, set(watch))
                with torch.no_grad():
                    recorder.run(*_positional(hat, inputs, 0, None))
                predicted = actual = bad = 0
                keep_ext = torch.cat([keep, torch.ones(1)])
                for name, values in recorder.seen.items():
                    layer = watch[name]
                    pred = (keep_ext[layer.input_index] == 0).all(0)
                    for value in values:
                        axis = (-1 if layer.kind == "linear" else 1) % value.ndim
                        zero = _zero_units(value, layer, axis).cpu()
                        predicted += int(pred.sum())
                        actual += int(zero.sum())
                        bad += int((pred & ~zero).sum())
                violations += bad
                results.append({"fraction": fraction, "seed": seed, "layers": len(recorder.seen),
                                "predicted_zero": predicted, "actual_zero": actual, "violations": bad})
    finally:
        hat.masks.override = None
        hat.train(was)
    return results, violations


def original_parameter_map(hat: HATModel) -> dict[str, str]:
    """Original parameter name -> the converted model's parameter holding task 0's copy of it."""
    plan, mapping = hat.plan, {}
    for layer in plan.masked_layers:
        for qualname in (layer.weight, layer.bias):
            if qualname:
                owner, _, attr = qualname.rpartition(".")
                mapping[qualname] = f"{owner or ROOT_HOLDER}.parametrizations.{attr}.original"
    for module_plan in plan.modules:
        module = hat.net.get_submodule(module_plan.name).copies[0]
        for name, _ in module.named_parameters():
            mapping[f"{module_plan.name}.{name}"] = f"{module_plan.name}.copies.0.{name}"
    for param_plan in plan.params:
        mapping[param_plan.name] = f"{param_plan.name}.0"
    return mapping


def _without_gradient(out: Any, mapping: dict[str, torch.Tensor]) -> list[str]:
    loss = sum(v.float().square().mean() for v in _leaves(out).values() if v.is_floating_point() and v.requires_grad)
    if not isinstance(loss, torch.Tensor):
        return sorted(mapping)
    grads = torch.autograd.grad(loss, list(mapping.values()), allow_unused=True)
    return [orig for orig, g in zip(mapping, grads) if g is None]


def check_gradients(hat: HATModel, inputs: tuple, model: nn.Module | None = None) -> list[str]:
    """Names of original parameters that receive no gradient through the converted model (task 0). Given
    the original `model`, those that get none through it either are left out (a detector's eval outputs
    are chosen boxes: its proposal head gets no gradient from them in the original)."""
    trial = copy.deepcopy(hat).eval()  # eval: norms use running statistics, so a batch of one works too
    params = dict(trial.net.named_parameters())
    mapping = {orig: params[name] for orig, name in original_parameter_map(trial).items()
               if name in params and params[name].requires_grad}
    missing = _without_gradient(trial(*inputs, task_id=0, mask_scale=1.0), mapping)
    if model is None or not missing:
        return missing
    reference = copy.deepcopy(model).eval()
    own = dict(reference.named_parameters())
    unreached = set(_without_gradient(reference(*inputs), {n: own[n] for n in mapping if n in own}))
    return [name for name in missing if name not in unreached]


def validate(model: nn.Module, hat: nn.Module, example_inputs: Any) -> ValidationResult:
    """Check a conversion: (a) open masks equal the original, (b) the mask-flow probe finds no unit the plan
    calls zero that is not, (c) every original parameter gets a gradient.

    Example:
        >>> result = hatify.validate(model, hat, (x,))
        >>> result.passed, result.largest_difference
        (True, 0.0)
    """
    hat = _unwrap(hat)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    diffs, tol = compare_open(model, hat, inputs)
    probes, violations = probe_flow(hat, inputs)
    missing = check_gradients(hat, inputs, model)
    messages = [f"output {k}: open-mask difference {v:.3g} > {tol:.3g}" for k, v in diffs.items() if v > tol]
    if violations:
        messages.append(f"mask-flow probe: {violations} input units predicted zero were not")
    if missing:
        messages.append(f"{len(missing)} parameter(s) get no gradient: {', '.join(missing[:5])}")
    passed = not messages
    return ValidationResult(passed, diffs, tol, probes, violations, missing, messages)
