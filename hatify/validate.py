"""The validator: open masks reproduce the original, the mask-flow plan matches what zeroing masks does at
run time, and every original parameter still receives a gradient."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .copying import detached_deepcopy
from .errors import HatifyError
from .flow import producer_input
from .inputs import Inputs
from .maps import ONES
from .model import HATModel
from .plan import LayerPlan
from .rewrite import KEPT, ROOT_HOLDER, SCALE_ARG, TASK_ARG
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


def compare_open(model: nn.Module, hat: HATModel, inputs: Inputs) -> tuple[dict[str, float], float]:
    """Largest absolute difference per output between the original (eval) and the open-mask HAT model."""
    was_model, was_hat = model.training, hat.training
    model.eval(), hat.eval()
    try:
        with torch.no_grad(), masks_open(hat):
            # the same random draws for both: random ops that run in eval mode (`F.dropout(x, 0.1)`,
            # `scaled_dot_product_attention(..., dropout_p=0.1)`) then match when the graphs match
            ref = _leaves(_seeded(inputs.call, model))
            got = _leaves(_seeded(inputs.call, hat, task_id=0))
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
            data = producer_input(n)
            value = self.env.get(data) if isinstance(data, fx.Node) else None
            if isinstance(value, torch.Tensor):
                self.seen.setdefault(n.name, []).append(value.detach())
        return super().run_node(n)


def _positional(hat: HATModel, inputs: Inputs, task: int, scale: float | None) -> list:
    args = list(inputs.flat)
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


def probe_patterns(hat: HATModel, random_draws: int = 2) -> list[tuple[str, torch.Tensor]]:
    """Deterministic mask patterns (1 = unit kept) for the mask-flow probe: every unit zero; `random_draws` seeded
    draws zeroing half the units (a wrong map within a layer, an offset, a permutation, shows where one unit is
    zero and the unit it really depends on is not); and, for every bit of the layer index, the layers with that
    bit set zeroed and then the others (every pair of layers is split by one of these: a map that names the
    wrong layer, or misses an operand, shows)."""
    units = hat.plan.total_units
    patterns = [("all zero", torch.zeros(units))]
    for seed in range(random_draws):
        gen = torch.Generator().manual_seed(seed)
        patterns.append((f"random half, seed {seed}", (torch.rand(units, generator=gen) >= 0.5).float()))
    layers = [layer for layer in hat.plan.masked_layers if layer.offset is not None]
    for bit in range(max(1, len(layers) - 1).bit_length()):
        for polarity in (1, 0):
            keep = torch.ones(units)
            for i, layer in enumerate(layers):
                if (i >> bit) & 1 == polarity:
                    keep[layer.offset: layer.offset + layer.units] = 0
            patterns.append((f"layers with index bit {bit} = {polarity} zero", keep))
    return patterns


def probe_flow(hat: HATModel, inputs: Inputs, patterns: list[tuple[str, torch.Tensor]] | None = None
               ) -> tuple[list[dict], int, dict[str, int]]:
    """Zero mask units (`probe_patterns`), run the model, and check that every consumer input unit the plan
    predicts to be zero is exactly zero (soundness). Also counts zeros the plan did not predict (conservatism),
    and per layer the unknown input units that the masks do zero (imprecision, see `ValidationResult`)."""
    layers = [layer for layer in hat.plan.masked_layers if layer.input_index is not None]
    watch = {site.node: layer for layer in layers for site in layer.sites}
    results, violations = [], 0
    zero_when_closed: dict[str, torch.Tensor] = {}   # layer -> input units zero with every mask zero
    ever_nonzero: dict[str, torch.Tensor] = {}       # layer -> input units nonzero under some pattern
    was = hat.training
    hat.eval()
    try:
        for name, keep in patterns if patterns is not None else probe_patterns(hat):
            hat.masks.override = keep
            recorder = _InputRecorder(hat.net, set(watch))
            with torch.no_grad():
                recorder.run(*_positional(hat, inputs, 0, None))
            predicted = actual = bad = 0
            keep_ext = torch.cat([keep, torch.ones(1)])
            for node, values in recorder.seen.items():
                layer = watch[node]
                pred = (keep_ext[layer.input_index] == 0).all(0)
                for value in values:
                    axis = (-1 if layer.kind in ("linear", "linear_t") else 1) % value.ndim
                    zero = _zero_units(value, layer, axis).cpu()
                    predicted += int(pred.sum())
                    actual += int(zero.sum())
                    bad += int((pred & ~zero).sum())
                    if not bool(keep.any()):
                        zero_when_closed[layer.name] = zero_when_closed.get(layer.name, zero) & zero
                    ever_nonzero[layer.name] = ever_nonzero.get(layer.name, ~zero) | ~zero
            violations += bad
            results.append({"pattern": name, "layers": len(recorder.seen), "predicted_zero": predicted,
                            "actual_zero": actual, "violations": bad})
    finally:
        hat.masks.override = None
        hat.train(was)
    imprecise = {}
    for layer in layers:
        if layer.name in zero_when_closed and layer.name in ever_nonzero:
            unknown = (layer.input_index == ONES).any(0)
            count = int((unknown & zero_when_closed[layer.name] & ever_nonzero[layer.name]).sum())
            if count:
                imprecise[layer.name] = count
    return results, violations, imprecise


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


def _ungraded(model: nn.Module, params: dict[str, torch.Tensor], run) -> set[str]:
    """Names in `params` that get no gradient from a loss on `run(model)`'s outputs."""
    out = _leaves(run(model))
    loss = sum(v.float().square().mean() for v in out.values() if v.is_floating_point() and v.requires_grad)
    if not isinstance(loss, torch.Tensor):
        return set(params)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name for name, g in zip(params, grads) if g is None}


def check_gradients(hat: HATModel, inputs: Inputs, model: nn.Module | None = None) -> list[str]:
    """Names of original parameters that receive no gradient through the converted model (task 0), leaving out
    those that get none through `model` (the original) either: an unused pooler, an untaken branch."""
    trial = detached_deepcopy(hat).eval()  # eval: norms use running statistics, so a batch of one works too
    params = dict(trial.net.named_parameters())
    mapping = {orig: params[name] for orig, name in original_parameter_map(trial).items()
               if name in params and params[name].requires_grad}
    missing = _ungraded(trial, mapping, lambda m: inputs.call(m, task_id=0, mask_scale=1.0))
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
    diffs, tol = compare_open(model, hat, inputs)
    probes, violations, imprecise = probe_flow(hat, inputs)
    missing = check_gradients(hat, inputs, model)
    messages = [f"output {k}: open-mask difference {v:.3g} > {tol:.3g}" for k, v in diffs.items() if v > tol]
    if violations:
        messages.append(f"mask-flow probe: {violations} input units predicted zero were not")
    if missing:
        messages.append(f"{len(missing)} parameter(s) get no gradient: {', '.join(missing[:5])}")
    passed = not messages
    return ValidationResult(passed, diffs, tol, probes, violations, missing, messages, imprecise)
