"""The mask-flow probe of `hatify.validate`: zero mask units, run the model, and check that every consumer input
unit the plan predicts to be zero is exactly zero.

On an accelerator, several patterns run as rows of one batch where the graph allows it: the example batch repeated
once per pattern, each copy under its own pattern through the per-sample mask path (`hatify.per_sample`), so the
model runs once for several patterns (fewer, larger kernels; one interpreter walk) instead of once per pattern. On
the CPU one pattern at a time stays the default, as for mixed-task batches (`HATModel._mixed`): the rows measured
slower there (timm resnet50, one thread: the per-row gates cannot fold into the norms, and large batches leave the
cache); there each pattern's run starts where it first differs from one shared open run and stops after the
last call where the plan predicts a zero (`observe_forked`). One pattern at a time (`observe_zeros`) is the
definition: it runs where rows cannot (a gated activation that does not lead with the batch, inputs that do not
repeat), and it decides every pattern whose rows or forked run report a violation, so that a model which mixes
rows in eval (batch statistics) cannot fail a sound plan."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Any, Iterator

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .flow import producer_input
from .inputs import Inputs
from .maps import ONES
from .model import HATModel
from .nested import call_opaque, nested_paths, positional_call
from .per_sample import Unsupported, _PerSample, _static_reason, _TaskMasks, batch_size
from .plan import LayerPlan, input_sites
from .rewrite import MASK_BANK, SCALE_ARG, TASK_ARG
from .shapes import SPEC, Interpreter, TensorSpec
from .layers import Gate

ROWS_BYTES = 2 ** 28  # one batched probe run holds at most this much of its largest activation (all patterns)


class _LastWatched(Exception):
    """Raised by a recorder once the last call its run must observe has run: nothing after it is observed."""


# Where a run of the model's graph has observed a watched call: (node, after). The model's own call is observed
# at its node, before the node runs (its input is there); a nested subgraph's call inside the opaque call that
# runs it, so after that node (the subgraph's own run never stops: the opaque code may call it again).
StopPoint = tuple[fx.Node, bool]


def stop_points(hat: HATModel, watch: dict[str, LayerPlan]) -> dict[str, StopPoint | None]:
    """Per watched call, where a run of `hat.net` has observed it (None: not known, the run goes to the end)."""
    nodes = {n.name: n for n in hat.net.graph.nodes}
    opaque = {n.args[0].target: n for n in hat.net.graph.nodes if n.op == "call_function"
              and n.target is call_opaque and isinstance(n.args[0], fx.Node)}
    points: dict[str, StopPoint | None] = {}
    for site in watch:
        part = next((p for path, p in hat.plan.nested.items() if site.startswith(f"{path}.")), None)
        points[site] = (nodes[site], False) if site in nodes else \
            (opaque[part.opaque], True) if part is not None and part.opaque in opaque else None
    return points


def last_point(hat: HATModel, points: list[StopPoint | None]) -> StopPoint | None:
    """The latest of `points` (at least one) in the graph's order: where a run that must observe them all can
    stop (None: it runs to the end)."""
    if any(point is None for point in points):
        return None
    order = {n: i for i, n in enumerate(hat.net.graph.nodes)}
    return max(points, key=lambda p: 2 * order[p[0]] + p[1])


def _start_recording(recorder: fx.Interpreter, watch: dict[str, LayerPlan], patterns: int, prefix: str = "",
                     zeros: dict | None = None, stop: StopPoint | None = None) -> None:
    recorder.watch, recorder.patterns, recorder.prefix, recorder.stop = watch, patterns, prefix, stop
    recorder.before = set()
    recorder.zeros = {} if zeros is None else zeros
    recorder.reduced = {}  # layers reading the same tensor (same version) the same way


def _record(recorder: fx.Interpreter, n: fx.Node) -> None:
    """At a watched layer call: per pattern, which of its input units are exactly zero; at the stop, stop."""
    layer = recorder.watch.get(recorder.prefix + n.name)
    if layer is not None:
        data = producer_input(n)
        value = recorder.env.get(data) if isinstance(data, fx.Node) else None
        if isinstance(value, torch.Tensor):
            key = (data, layer.kind in ("linear", "linear_t", "embedding"), value._version)
            if key not in recorder.reduced:
                recorder.reduced[key] = _zero_units(value, layer, recorder.patterns)
            recorder.zeros.setdefault(recorder.prefix + n.name, []).append(recorder.reduced[key])
    if recorder.stop == (n, False):
        raise _LastWatched


def _run_node(recorder: fx.Interpreter, n: fx.Node, run) -> Any:
    if n in recorder.before:  # a forked run (`observe_forked`): this node ran in the open run, or is not needed
        return None
    _record(recorder, n)
    result = run(n)
    if recorder.stop == (n, True):
        raise _LastWatched
    return result


class _ZeroRecorder(Interpreter):
    """Runs the graph and records, at each watched layer call, which of its input units are exactly zero; the
    input itself is not kept (the interpreter frees every value after its last use), and the run stops at `stop`."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, LayerPlan], prefix: str = "",
                 zeros: dict | None = None, stop: StopPoint | None = None) -> None:
        super().__init__(gm)
        _start_recording(self, watch, 0, prefix, zeros, stop)

    def run_node(self, n: fx.Node) -> Any:
        return _run_node(self, n, super().run_node)


class _RowRecorder(_PerSample, Interpreter):
    """`_ZeroRecorder` over the example batch repeated once per pattern: the rows of copy p run under mask pattern
    p (the per-sample gates), every task-indexed module as task 0, and each record is split per pattern."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, LayerPlan], table: torch.Tensor, batch: int,
                 stop: StopPoint | None) -> None:
        super().__init__(gm, torch.arange(len(table), device=table.device).repeat_interleave(batch))
        self.tasks, self.table = [0], table
        _start_recording(self, watch, len(table), stop=stop)

    def masks(self, bank: Any) -> _TaskMasks:
        return _TaskMasks(self.table, self.ids)

    def run_node(self, n: fx.Node) -> Any:
        return _run_node(self, n, super().run_node)


def _positional(hat: HATModel, flat: tuple, task: Any, scale: float | None) -> list:
    args = list(flat)
    placeholders = [n for n in hat.net.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if node.target == TASK_ARG:
            args.append(task)
        elif node.target == SCALE_ARG:
            args.append(scale)
        elif len(args) <= i:
            args.append(node.args[0] if node.args else None)
    return args


def _zero_units(value: torch.Tensor, layer: LayerPlan, patterns: int = 0) -> torch.Tensor:
    """Per input unit of `layer` (the last axis of a linear layer's input, else axis 1): exactly zero everywhere.
    `patterns` > 0: the rows are that many copies of the batch, one result row per copy (patterns, units).
    One reduction over the other axes (moving the unit axis last would copy the activation); NaN is nonzero.
    The largest magnitude: `abs().amax` measured 4-30x faster than `linalg.vector_norm(inf)` on the CPU."""
    axis = (-1 if layer.kind in ("linear", "linear_t", "embedding") else 1) % value.ndim  # (a tied LM head's input)
    if patterns:
        if axis == 0 or value.shape[0] % patterns:
            raise Unsupported(f"the input of {layer.name} does not lead with the batch")
        value, axis = value.unflatten(0, (patterns, -1)), axis + 1
    others = tuple(d for d in range(value.ndim) if d != axis and not (patterns and d == 0))
    if not others:
        return (value == 0).cpu()
    if value.is_floating_point() and value.numel():
        return (value.abs().amax(dim=others) == 0).cpu()
    return value.ne(0).any(dim=others).logical_not_().cpu()


def _separating_codes(n: int, ends: list[int] | None = None) -> list[tuple[int, ...]]:
    """n distinct sets of one size over k positions, k as small as sets of size k // 2 allow: for any two of them
    each has a position the other lacks (neither contains the other), with about log2(n) + log2(log2(n)) / 2
    positions where one bit per position and both polarities per bit take 2 log2(n).

    `ends` (descending): per set, how far a run that zeroes its layer must go. Then the sets are the first n of
    one size w in colex order, where the first C(j, w) use only the first j positions: the latest layers share a
    few groups and the other groups stop early. w is the size (k // 2 or less, k positions still needed) whose
    groups stop earliest in sum."""
    k = 1
    while math.comb(k, k // 2) < n:
        k += 1
    if ends is None:
        return list(itertools.islice(itertools.combinations(range(k), k // 2), n))
    best: tuple[int, list] | None = None
    for w in range(k // 2, 0, -1):
        if math.comb(k, w) < n:
            break
        codes = sorted(itertools.combinations(range(k), w), key=lambda code: code[::-1])[:n]
        cost = sum(max((end for code, end in zip(codes, ends) if g in code), default=0) for g in range(k))
        if best is None or cost < best[0]:
            best = (cost, codes)
    return best[1] if best else []


def _layer_ends(hat: HATModel, layers: list[LayerPlan]) -> list[int]:
    """Per layer, the graph position where a run that zeroes only it can stop: after the last watched call whose
    input the plan maps to its units (-1: none; the length of the graph where not known)."""
    watch = watched_sites(hat)
    points = stop_points(hat, watch)
    order = {n: i for i, n in enumerate(hat.net.graph.nodes)}
    owner = torch.full((hat.plan.total_units + 1,), -1)
    for i, layer in enumerate(layers):
        owner[layer.offset: layer.offset + layer.units] = i
    ends = [-1] * len(layers)
    for site, layer in watch.items():
        index = layer.input_index[layer.input_index != ONES]
        point = points[site]
        position = 2 * len(order) if point is None else 2 * order[point[0]] + point[1]
        for i in owner[index].unique().tolist():
            if i >= 0:
                ends[i] = max(ends[i], position)
    return ends


def probe_patterns(hat: HATModel, random_draws: int = 2, alone: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Deterministic mask patterns (1 = unit kept) for the mask-flow probe: every unit zero; `random_draws` seeded
    draws zeroing half the units (a wrong map within a layer, an offset, a permutation, shows where one unit is
    zero and the unit it really depends on is not); and layer groups from `_separating_codes`: for every ordered
    pair of layers (A, B), one group has A zeroed and B not (a map that names the wrong layer, or misses an
    operand, shows). The latest-read layers share a few groups, so that the other groups' runs stop early.
    `alone`: every layer is a group of its own (the same pairs, and more: for runs that start where they first
    differ from the open run, `observe_forked`, each costs little more than the run from its gate to its readers)."""
    units = hat.plan.total_units
    patterns = [("all zero", torch.zeros(units))]
    for seed in range(random_draws):
        gen = torch.Generator().manual_seed(seed)
        patterns.append((f"random half, seed {seed}", (torch.rand(units, generator=gen) >= 0.5).float()))
    layers = [layer for layer in hat.plan.masked_layers if layer.offset is not None]
    ends = _layer_ends(hat, layers)
    layers = [layer for _, layer in sorted(zip(ends, layers), key=lambda pair: -pair[0])]
    codes = [] if len(layers) < 2 else [(i,) for i in range(len(layers))] if alone else \
        _separating_codes(len(layers), sorted(ends, reverse=True))
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


def observe_zeros(hat: HATModel, inputs: Inputs, keep: torch.Tensor, watch: dict[str, LayerPlan] | None = None,
                  needed: set[str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Run the converted model (eval, task 0) with the mask vector `keep` (1 = unit kept) and return, per watched
    call (`watched_sites`), one bool vector per time it ran: which input units of its layer were exactly zero.
    The run stops once every call in `needed` (default: every watched call) has been observed; the calls before
    that point are all recorded."""
    watch = watched_sites(hat) if watch is None else watch
    needed = set(watch) if needed is None else needed
    if not needed:
        return {}
    points = stop_points(hat, watch)
    was = hat.training
    if was:  # probe_flow puts the model in eval once for all patterns
        hat.eval()
    hat.masks.override = keep
    recorder = _ZeroRecorder(hat.net, watch, stop=last_point(hat, [points[site] for site in needed]))
    try:
        with torch.no_grad(), _recording_nested(hat, watch, recorder.zeros):
            recorder.run(*_positional(hat, inputs.flat, 0, None))
    except _LastWatched:
        pass
    finally:
        hat.masks.override = None
        if was:
            hat.train(was)
    return recorder.zeros


@contextlib.contextmanager
def _recording_nested(hat: HATModel, watch: dict[str, LayerPlan], zeros: dict | list[dict]) -> Iterator[None]:
    """Every nested subgraph (`hatify.nested`) runs through its own `_ZeroRecorder` writing into `zeros` under
    its full names (a list: into its first dict at the time of the call), so that the probe sees its layers'
    inputs as the model's."""
    sink = zeros if isinstance(zeros, list) else [zeros]
    subgraphs = [(path, hat.net.get_submodule(path)) for path in nested_paths(hat.plan)]
    previous = [sub.__dict__.get("forward") for _, sub in subgraphs]  # an enclosing recording's (a forked run's)
    for path, sub in subgraphs:
        def run(*args, _sub=sub, _prefix=f"{path}.", **kwargs):
            return _ZeroRecorder(_sub, watch, _prefix, sink[0]).run(*positional_call(_sub, args, kwargs))
        sub.forward = run
    try:
        yield
    finally:
        for (_, sub), forward in zip(subgraphs, previous):
            if forward is None:
                del sub.forward
            else:
                sub.forward = forward


def _bank_node(hat: HATModel) -> fx.Node | None:
    return next((n for n in hat.net.graph.nodes if n.op == "call_module" and n.target == MASK_BANK), None)


def _mask_readers(hat: HATModel) -> list[tuple[fx.Node, torch.Tensor | None]]:
    """Each node of the model's graph that reads the mask vector, in order, with the units it reads (None: any;
    the constant 1 is the index `total_units`)."""
    bank = _bank_node(hat)
    readers = []
    for n in hat.net.graph.nodes:
        if bank is not None and bank in n.all_input_nodes:
            module = hat.net.get_submodule(n.target) if n.op == "call_module" else None
            readers.append((n, module.index if isinstance(module, Gate) else None))
    return readers


def _start(hat: HATModel, keep: torch.Tensor, readers: list, first_needed: fx.Node, order: dict) -> fx.Node:
    """Where a run under `keep` first differs from the open run: the first node that reads a zeroed mask unit;
    earlier if a call it must observe (`first_needed`) comes first."""
    keep_ext = torch.cat([keep, torch.ones(1)])
    for n, units in readers:
        if order[n] >= order[first_needed]:
            break
        if bool((keep_ext == 0).any() if units is None else (keep_ext[units.cpu()] == 0).any()):
            return n
    return first_needed


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, slice, type(Ellipsis), torch.dtype, torch.device,
              torch.Size, torch.layout, torch.memory_format)


def _copy_live(env: dict, shared: dict[int, Any]) -> dict | None:
    """The open run's live values for a forked run, which may write into them in place: every tensor storage
    copied once, so that views still alias as they did; other objects (an `ImageList`, a cache a layer appends
    to) deep-copied with those copies, the model's modules, parameters and buffers (`shared`: id -> itself) kept
    as they are. None where an object cannot be copied: the pattern then runs from the start."""
    storages: dict[int, Any] = {}
    memo = dict(shared)

    def copy_tensor(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or id(v) in memo or v.layout != torch.strided:
            return memo.get(id(v), v)
        key = v.untyped_storage().data_ptr()
        if key not in storages:
            storages[key] = v.untyped_storage().clone()
        memo[id(v)] = v.new_empty(0).set_(storages[key], v.storage_offset(), v.size(), v.stride())
        return memo[id(v)]

    def copy_object(v: Any) -> Any:
        return v if isinstance(v, (torch.Tensor, *_IMMUTABLE)) else copy.deepcopy(v, memo)

    try:
        tensors = {node: pytree.tree_map(copy_tensor, value) for node, value in env.items()}
        return {node: pytree.tree_map(copy_object, value) for node, value in tensors.items()}
    except Exception:  # noqa: BLE001 - an object deepcopy cannot take
        return None


def observe_forked(hat: HATModel, inputs: Inputs, keeps: list[torch.Tensor], watch: dict[str, LayerPlan],
                   needed: list[set[str]], open_needed: set[str] = frozenset()) -> list[dict[str, list[torch.Tensor]]]:
    """`observe_zeros(hat, inputs, keep, watch, need)` for each mask vector, restricted to the calls from where
    the run under it first differs from the open run (`_start`) on: one run with every mask open goes up to the
    last start, and at each start the pattern's own run takes over from a copy of the open run's live values,
    with its mask vector in place of the open one, and stops where `observe_zeros` stops. Values before the start
    are the open run's (no mask read there differs), so the calls from the start on see what a full run sees.
    The open run's own record (every mask kept) comes last; it passes at least the calls in `open_needed`."""
    points, readers = stop_points(hat, watch), _mask_readers(hat)
    order = {n: i for i, n in enumerate(hat.net.graph.nodes)}
    bank = _bank_node(hat)
    if bank is None:
        return [observe_zeros(hat, inputs, keep, watch, need) for keep, need in zip(keeps, needed)] + \
            [observe_zeros(hat, inputs, torch.ones(hat.plan.total_units), watch, set(open_needed))]
    shared = {id(v): v for v in itertools.chain(hat.net.modules(), hat.net.parameters(), hat.net.buffers())}
    results: list[dict] = [{} for _ in keeps] + [{}]
    forks: dict[fx.Node, list[int]] = {}
    for i, (keep, need) in enumerate(zip(keeps, needed)):
        if need:
            first = min((points[site][0] if points[site] else bank for site in need), key=order.get)
            forks.setdefault(_start(hat, keep, readers, first, order), []).append(i)
    sink: list[dict] = [results[-1]]
    args = _positional(hat, inputs.flat, 0, None)

    def fork(env: dict, start: fx.Node) -> None:
        for i in forks.pop(start):
            recorder = _ZeroRecorder(hat.net, watch, zeros=results[i], stop=last_point(
                hat, [points[site] for site in needed[i]]))
            live = _copy_live(env, shared)
            if live is None:
                results[i].update(observe_zeros(hat, inputs, keeps[i], watch, needed[i]))
                continue
            recorder.before = {n for n in order if order[n] < order[start]}
            if bank in live:
                live[bank] = torch.cat([keeps[i], keeps[i].new_ones(1)])
            sink[0], hat.masks.override = results[i], keeps[i]  # (the bank runs again where the fork precedes it)
            try:
                recorder.run(*args, initial_env=live)
            except _LastWatched:
                pass
        sink[0], hat.masks.override = results[-1], open_masks

    class OpenRun(_ZeroRecorder):
        def run_node(self, n: fx.Node) -> Any:
            if n in forks:
                fork(self.env, n)
            return super().run_node(n)

    hat.masks.override = open_masks = torch.ones(hat.plan.total_units)
    try:
        with torch.no_grad(), _recording_nested(hat, watch, sink):
            ends = [points[site] for site in open_needed] + [(n, False) for n in forks]
            if ends:
                OpenRun(hat.net, watch, zeros=results[-1], stop=last_point(hat, ends)).run(*args)
    except _LastWatched:
        pass
    finally:
        hat.masks.override = None
    return results


def _patterns_per_run(net: fx.GraphModule, watch: dict[str, LayerPlan]) -> int:
    """How many patterns one batched run takes: the largest activation up to the last watched call (where the
    run stops; the whole graph where only nested subgraphs are watched), repeated that many times, stays within
    `ROWS_BYTES`."""
    last = ([n for n in net.graph.nodes if n.name in watch] or [None])[-1]
    largest = 1
    for node in net.graph.nodes:
        spec = node.meta.get(SPEC)
        if isinstance(spec, TensorSpec) and node.op != "get_attr":
            largest = max(largest, math.prod(spec.shape) * spec.dtype.itemsize)
        if node is last:
            break
    return max(1, ROWS_BYTES // largest)


def observe_rows(hat: HATModel, inputs: Inputs, keeps: list[torch.Tensor], watch: dict[str, LayerPlan],
                 needed: set[str] | None = None) -> list[dict[str, list[torch.Tensor]]]:
    """`observe_zeros` for every mask vector in `keeps` in one run: the example batch repeated once per pattern,
    up to where every call in `needed` has been observed. Raises `Unsupported` where the graph or the inputs do
    not allow rows (the caller runs one at a time)."""
    batch = batch_size(hat.net)
    reason = _static_reason(hat.net, one_task=True) if batch else "no tensor input leads with a batch"
    if reason:
        raise Unsupported(reason)
    needed = set(watch) if needed is None else needed
    if not needed:
        return [{} for _ in keeps]
    points = stop_points(hat, watch)
    repeat = lambda v: v.repeat(len(keeps), *([1] * (v.ndim - 1))) \
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
    device = hat.masks.embedding(0).device
    table = torch.stack([torch.cat([keep, keep.new_ones(1)]) for keep in keeps]).to(device)
    recorder = _RowRecorder(hat.net, watch, table, batch, last_point(hat, [points[site] for site in needed]))
    try:
        with torch.no_grad():
            recorder.run(*_positional(hat, tuple(map(repeat, inputs.flat)), recorder.ids, None))
    except _LastWatched:
        pass
    return [{node: [zero[p] for zero in per_call] for node, per_call in recorder.zeros.items()}
            for p in range(len(keeps))]


def _observe_all(hat: HATModel, inputs: Inputs, keeps: list[torch.Tensor], watch: dict[str, LayerPlan],
                 rows: bool, needed: list[set[str]] | None = None, open_needed: set[str] = frozenset()
                 ) -> tuple[list[dict[str, list[torch.Tensor]]], bool, dict[str, list[torch.Tensor]]]:
    """Per mask vector, `observe_zeros`' result (`needed`: per mask vector, the calls it must observe; default
    all): with `rows`, as rows of a few batched runs where the graph allows it, else one run per pattern, forked
    from one open run (`observe_forked`). Also says whether they ran as rows, and gives the open run's record
    (passing `open_needed`; with rows, each pattern passes those calls instead)."""
    needed = [set(watch)] * len(keeps) if needed is None else needed
    per_run = _patterns_per_run(hat.net, watch)
    try:
        if not rows:
            raise Unsupported("one pattern at a time asked for")
        return [observed for i in range(0, len(keeps), per_run) for observed in observe_rows(
            hat, inputs, keeps[i:i + per_run], watch, set(open_needed).union(*needed[i:i + per_run]))], True, {}
    except Exception:  # noqa: BLE001 - repeated inputs this graph cannot take: one pattern at a time decides
        observed = observe_forked(hat, inputs, keeps, watch, needed, open_needed)
        return observed[:-1], False, observed[-1]


def predicted_sites(keep: torch.Tensor, watch: dict[str, LayerPlan]) -> set[str]:
    """The watched calls where the plan predicts some input unit zero under the mask vector `keep`."""
    keep_ext = torch.cat([keep, torch.ones(1)])
    return {site for site, layer in watch.items() if bool((keep_ext[layer.input_index] == 0).all(0).any())}


def _counts(keep: torch.Tensor, zeros: dict[str, list[torch.Tensor]], watch: dict[str, LayerPlan]
            ) -> tuple[int, int, int]:
    """(input units predicted zero, found zero, predicted zero but not found so) over every watched call."""
    predicted = actual = bad = 0
    keep_ext = torch.cat([keep, torch.ones(1)])
    for node, per_call in zeros.items():
        pred = (keep_ext[watch[node].input_index] == 0).all(0)
        for zero in per_call:
            predicted += int(pred.sum())
            actual += int(zero.sum())
            bad += int((pred & ~zero).sum())
    return predicted, actual, bad


def probe_flow(hat: HATModel, inputs: Inputs, patterns: list[tuple[str, torch.Tensor]] | None = None,
               rows: bool | None = None) -> tuple[list[dict], int, dict[str, int]]:
    """Zero mask units (`probe_patterns`), run the model, and check that every consumer input unit the plan
    predicts to be zero is exactly zero (soundness). Also counts zeros the plan did not predict (conservatism),
    and per layer the unknown input units that the masks do zero (imprecision, see `ValidationResult`).
    `rows`: the patterns as rows of batched runs (default: where the model is on an accelerator).

    A pattern's run stops once it has passed every call where the plan predicts a zero under it (no violation
    can come later) and every call that imprecision still needs: the patterns that close every mask run first
    and to the end; where those found unknown units zero, the others pass the call (rows) or the shared open run
    does (every mask kept: also a pattern under which such units show nonzero). One pattern at a time,
    a run also starts late, where it first differs from one shared open run (`observe_forked`), and the layer
    groups are single layers (`probe_patterns(alone=True)`: the same ordered pairs separated, each run short).
    So violations and predicted zeros are those of full runs (a pattern with a violation is decided by a full
    run of its own), and so is imprecision; a result's "layers" and "actual_zero" count the calls its run
    passed."""
    watch = watched_sites(hat)
    rows = hat.masks.embedding(0).device.type != "cpu" if rows is None else rows
    patterns = patterns if patterns is not None else probe_patterns(hat, alone=not rows)
    results: list[dict] = [{} for _ in patterns]
    violations = 0
    zero_when_closed: dict[str, torch.Tensor] = {}   # layer -> input units zero with every mask zero
    ever_nonzero: dict[str, torch.Tensor] = {}       # layer -> input units nonzero under some pattern
    was = hat.training
    hat.eval()
    try:
        closed = [i for i, (_, keep) in enumerate(patterns) if not bool(keep.any())]
        for batch in (closed, [i for i in range(len(patterns)) if i not in closed]):
            pending = {site for site, layer in watch.items() if layer.name in zero_when_closed
                       and bool(((layer.input_index == ONES).any(0) & zero_when_closed[layer.name]).any())}
            keeps = [patterns[i][1] for i in batch]
            needed = [predicted_sites(keep, watch) if keep.any() else set(watch) for keep in keeps]
            observed, as_rows, opened = _observe_all(hat, inputs, keeps, watch, rows, needed, pending) \
                if watch and batch else ([{} for _ in batch], False, {})
            for node, per_call in opened.items():  # every mask kept: a pattern that shows what masks zero
                for zero in per_call:
                    ever_nonzero[watch[node].name] = ever_nonzero.get(watch[node].name, ~zero) | ~zero
            for i, keep, need, zeros in zip(batch, keeps, needed, observed):
                predicted, actual, bad = _counts(keep, zeros, watch)
                if bad:  # decided by the pattern's own full run (rows of other patterns may have reached these)
                    zeros = observe_zeros(hat, inputs, keep, watch, need)
                    predicted, actual, bad = _counts(keep, zeros, watch)
                for node, per_call in zeros.items():
                    layer = watch[node]
                    for zero in per_call:
                        if not bool(keep.any()):
                            zero_when_closed[layer.name] = zero_when_closed.get(layer.name, zero) & zero
                        ever_nonzero[layer.name] = ever_nonzero.get(layer.name, ~zero) | ~zero
                violations += bad
                results[i] = {"pattern": patterns[i][0], "layers": len(zeros), "predicted_zero": predicted,
                              "actual_zero": actual, "violations": bad}
    finally:
        hat.train(was)
    imprecise = {}
    for layer in {layer.name: layer for layer in watch.values()}.values():
        if layer.name in zero_when_closed and layer.name in ever_nonzero:
            unknown = (layer.input_index == ONES).any(0)
            count = int((unknown & zero_when_closed[layer.name] & ever_nonzero[layer.name]).sum())
            if count:
                imprecise[layer.name] = count
    return results, violations, imprecise
