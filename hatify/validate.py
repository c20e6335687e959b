"""The validator: open masks reproduce the original, the mask-flow plan matches what zeroing masks does at
run time, and every original parameter still receives a gradient."""
from __future__ import annotations

import contextlib
import itertools
import math
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
from .nested import nested_paths, positional_call
from .plan import LayerPlan, input_sites
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


def _hat_outputs(hat: HATModel, inputs: Inputs, grad: bool) -> dict[str, torch.Tensor]:
    """Task 0's outputs in eval mode with every mask open (seeded as the original's run)."""
    was = hat.training
    hat.eval()
    try:
        with masks_open(hat), torch.set_grad_enabled(grad):
            return _leaves(_seeded(inputs.call, hat, task_id=0))
    finally:
        hat.train(was)


def _differences(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    with torch.no_grad():
        diffs = {k: float((ref[k].double() - got[k].double()).abs().max()) if ref[k].numel() else 0.0 for k in ref}
        scale = max((float(v.double().abs().max()) for v in ref.values() if v.numel() and v.is_floating_point()),
                    default=1.0)
    return diffs, 1e-5 * max(1.0, scale)


def compare_open(model: nn.Module, hat: HATModel, inputs: Inputs) -> tuple[dict[str, float], float]:
    """Largest absolute difference per output between the original (eval) and the open-mask HAT model."""
    return _differences(*_open_outputs(model, hat, inputs))


class _LastWatched(Exception):
    """Raised by `_ZeroRecorder` once the last watched node has run: nothing after it is observed."""


class _ZeroRecorder(Interpreter):
    """Runs the graph and records, at each watched layer call, which of its input units are exactly zero; the
    input itself is not kept (the interpreter frees every value after its last use), and the run stops after the
    last watched call."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, LayerPlan], prefix: str = "",
                 zeros: dict | None = None) -> None:
        super().__init__(gm)
        self.watch, self.prefix, self.zeros = watch, prefix, {} if zeros is None else zeros
        self.reduced: dict[tuple, torch.Tensor] = {}  # layers reading the same tensor (same version) the same way
        # No early stop where nested subgraphs are watched: they run inside an opaque call, the model's graph may
        # go on after its last watched node; and a nested subgraph's own stop would end the model's run.
        nested = prefix or any("." in name for name in watch)
        self.last = [] if nested else [n for n in gm.graph.nodes if n.name in watch][-1:]

    def run_node(self, n: fx.Node) -> Any:
        layer = self.watch.get(self.prefix + n.name)
        if layer is not None:
            data = producer_input(n)
            value = self.env.get(data) if isinstance(data, fx.Node) else None
            if isinstance(value, torch.Tensor):
                key = (data, layer.kind in ("linear", "linear_t", "embedding"), value._version)
                if key not in self.reduced:
                    self.reduced[key] = _zero_units(value, layer)
                self.zeros.setdefault(self.prefix + n.name, []).append(self.reduced[key])
        if self.last and n is self.last[0]:
            raise _LastWatched
        return super().run_node(n)


def _positional(hat: HATModel, inputs: Inputs, task: int, scale: float | None) -> list:
    args = list(inputs.flat)
    placeholders = [n for n in hat.net.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if node.target == TASK_ARG:
            args.append(task)
        elif node.target == SCALE_ARG:
            args.append(scale)
        elif len(args) <= i:
            args.append(node.args[0] if node.args else None)
    return args


def _zero_units(value: torch.Tensor, layer: LayerPlan) -> torch.Tensor:
    """Per input unit of `layer` (the last axis of a linear layer's input, else axis 1): exactly zero everywhere.
    One reduction over the other axes (moving the unit axis last would copy the activation); NaN is nonzero."""
    axis = (-1 if layer.kind in ("linear", "linear_t", "embedding") else 1) % value.ndim  # (a tied LM head's input)
    others = tuple(d for d in range(value.ndim) if d != axis)
    if not others:
        return (value == 0).cpu()
    if value.is_floating_point() and value.numel():
        return (torch.linalg.vector_norm(value, float("inf"), dim=others) == 0).cpu()
    return value.ne(0).any(dim=others).logical_not_().cpu()


def _separating_codes(n: int) -> list[tuple[int, ...]]:
    """n distinct sets of the same size k // 2 over k positions, k as small as that allows: for any two of them
    each has a position the other lacks (neither contains the other), with about log2(n) + log2(log2(n)) / 2
    positions where one bit per position and both polarities per bit take 2 log2(n)."""
    k = 1
    while math.comb(k, k // 2) < n:
        k += 1
    return list(itertools.islice(itertools.combinations(range(k), k // 2), n))


def probe_patterns(hat: HATModel, random_draws: int = 2) -> list[tuple[str, torch.Tensor]]:
    """Deterministic mask patterns (1 = unit kept) for the mask-flow probe: every unit zero; `random_draws` seeded
    draws zeroing half the units (a wrong map within a layer, an offset, a permutation, shows where one unit is
    zero and the unit it really depends on is not); and layer groups from `_separating_codes`: for every ordered
    pair of layers (A, B), one group has A zeroed and B not (a map that names the wrong layer, or misses an
    operand, shows)."""
    units = hat.plan.total_units
    patterns = [("all zero", torch.zeros(units))]
    for seed in range(random_draws):
        gen = torch.Generator().manual_seed(seed)
        patterns.append((f"random half, seed {seed}", (torch.rand(units, generator=gen) >= 0.5).float()))
    layers = [layer for layer in hat.plan.masked_layers if layer.offset is not None]
    codes = _separating_codes(len(layers)) if len(layers) > 1 else []
    for group in range(max((max(code) + 1 for code in codes if code), default=0)):
        keep = torch.ones(units)
        for layer, code in zip(layers, codes):
            if group in code:
                keep[layer.offset: layer.offset + layer.units] = 0
        patterns.append((f"layer group {group} zero", keep))
    return patterns


def watched_sites(hat: HATModel) -> dict[str, LayerPlan]:
    """Graph node of every call of a masked layer whose input the plan maps -> that layer."""
    return {site.node: layer for layer in hat.plan.masked_layers if layer.input_index is not None
            for site in input_sites(layer)}


def observe_zeros(hat: HATModel, inputs: Inputs, keep: torch.Tensor, watch: dict[str, LayerPlan] | None = None
                  ) -> dict[str, list[torch.Tensor]]:
    """Run the converted model (eval, task 0) with the mask vector `keep` (1 = unit kept) and return, per watched
    call (`watched_sites`), one bool vector per time it ran: which input units of its layer were exactly zero."""
    watch = watched_sites(hat) if watch is None else watch
    if not watch:
        return {}
    was = hat.training
    if was:  # probe_flow puts the model in eval once for all patterns
        hat.eval()
    hat.masks.override = keep
    recorder = _ZeroRecorder(hat.net, watch)
    try:
        with torch.no_grad(), _recording_nested(hat, watch, recorder.zeros):
            recorder.run(*_positional(hat, inputs, 0, None))
    except _LastWatched:
        pass
    finally:
        hat.masks.override = None
        if was:
            hat.train(was)
    return recorder.zeros


@contextlib.contextmanager
def _recording_nested(hat: HATModel, watch: dict[str, LayerPlan], zeros: dict) -> Iterator[None]:
    """Every nested subgraph (`hatify.nested`) runs through its own `_ZeroRecorder` writing into `zeros` under
    its full names, so that the probe sees its layers' inputs as the model's."""
    subgraphs = [(path, hat.net.get_submodule(path)) for path in nested_paths(hat.plan)]
    for path, sub in subgraphs:
        def run(*args, _sub=sub, _prefix=f"{path}.", **kwargs):
            return _ZeroRecorder(_sub, watch, _prefix, zeros).run(*positional_call(_sub, args, kwargs))
        sub.forward = run
    try:
        yield
    finally:
        for _, sub in subgraphs:
            del sub.forward


def probe_flow(hat: HATModel, inputs: Inputs, patterns: list[tuple[str, torch.Tensor]] | None = None
               ) -> tuple[list[dict], int, dict[str, int]]:
    """Zero mask units (`probe_patterns`), run the model, and check that every consumer input unit the plan
    predicts to be zero is exactly zero (soundness). Also counts zeros the plan did not predict (conservatism),
    and per layer the unknown input units that the masks do zero (imprecision, see `ValidationResult`)."""
    watch = watched_sites(hat)
    results, violations = [], 0
    zero_when_closed: dict[str, torch.Tensor] = {}   # layer -> input units zero with every mask zero
    ever_nonzero: dict[str, torch.Tensor] = {}       # layer -> input units nonzero under some pattern
    was = hat.training
    hat.eval()
    try:
        observed = [(name, keep, observe_zeros(hat, inputs, keep, watch))
                    for name, keep in (patterns if patterns is not None else probe_patterns(hat))]
    finally:
        hat.train(was)
    for name, keep, zeros in observed:
        predicted = actual = bad = 0
        keep_ext = torch.cat([keep, torch.ones(1)])
        for node, per_call in zeros.items():
            layer = watch[node]
            pred = (keep_ext[layer.input_index] == 0).all(0)
            for zero in per_call:
                predicted += int(pred.sum())
                actual += int(zero.sum())
                bad += int((pred & ~zero).sum())
                if not bool(keep.any()):
                    zero_when_closed[layer.name] = zero_when_closed.get(layer.name, zero) & zero
                ever_nonzero[layer.name] = ever_nonzero.get(layer.name, ~zero) | ~zero
        violations += bad
        results.append({"pattern": name, "layers": len(zeros), "predicted_zero": predicted,
                        "actual_zero": actual, "violations": bad})
    imprecise = {}
    for layer in {layer.name: layer for layer in watch.values()}.values():
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
    open-mask comparison's forward)."""
    if outputs is None:
        outputs = _hat_outputs(hat, inputs, grad=True)
    params = dict(hat.net.named_parameters())
    mapping = {orig: params[name] for orig, name in original_parameter_map(hat).items()
               if name in params and params[name].requires_grad}
    reached = _reached_leaves(outputs)
    unreached = {name: p for name, p in mapping.items() if id(p) not in reached}
    # a real backward decides the unreached ones (a function may reach a leaf outside the recorded graph)
    missing = _ungraded_from(outputs, unreached) if unreached else set()
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
