"""The validator keeps its power: a wrong mask-flow plan, a parameter cut off from the loss, and a converted model
that computes something else each fail validation (the probe, the gradient check, the open-mask comparison)."""
from __future__ import annotations

import sys
import threading
import types

import pytest
import timm
import torch

import hatify
from hatify import probe
from models import ResidualBlock


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _converted():
    torch.manual_seed(0)
    model = ResidualBlock()
    return model, hatify.hatify(model, 2, (X,))


def _layer(hat, name):
    return next(layer for layer in hat.plan.masked_layers if layer.name == name)


def _drop_residual_operand(hat):  # conv3 reads stem + conv2 (a residual add): forget conv2
    _layer(hat, "conv3").input_index = _layer(hat, "conv3").input_index[:1].clone()


def _reverse_units(hat):  # conv2 reads conv1's units in order: a permutation of them
    _layer(hat, "conv2").input_index = _layer(hat, "conv2").input_index.flip(-1).clone()


def _wrong_producer(hat):  # conv1 reads the stem's units: name conv3's instead
    layer = _layer(hat, "conv1")
    layer.input_index = layer.input_index - _layer(hat, "stem").offset + _layer(hat, "conv3").offset


def _unknown_taken_as_masked(hat):  # the stem reads the image (always ones): call it conv2's units
    layer = _layer(hat, "stem")
    layer.input_index = torch.arange(3).unsqueeze(0) + _layer(hat, "conv2").offset


@pytest.mark.parametrize("corrupt", [_drop_residual_operand, _reverse_units, _wrong_producer,
                                     _unknown_taken_as_masked])
def test_probe_finds_a_wrong_plan(corrupt):
    model, hat = _converted()
    assert hatify.validate(model, hat, (X,)).passed
    corrupt(hat)
    result = hatify.validate(model, hat, (X,))
    assert not result.passed and result.probe_violations > 0
    assert any("mask-flow probe" in m for m in result.messages)


def test_observe_zeros_reports_the_units_found_zero():
    _, hat = _converted()
    watch = probe.watched_sites(hat)
    assert set(watch) == {"stem", "conv1", "conv2", "conv3"}
    inputs = hatify.inputs.Inputs.of((X,))
    every = probe.observe_zeros(hat, inputs, torch.zeros(hat.plan.total_units), watch)
    assert not bool(every["stem"][0].any())  # the image carries no mask
    assert all(bool(every[name][0].all()) for name in ("conv1", "conv2", "conv3"))
    keep = torch.ones(hat.plan.total_units)
    keep[_layer(hat, "conv1").offset:][:3] = 0  # conv1's first three units: conv2's first three inputs
    some = probe.observe_zeros(hat, inputs, keep, watch)
    assert some["conv2"][0].tolist() == [True] * 3 + [False] * 5


@pytest.mark.parametrize("corrupt", [_drop_residual_operand, _reverse_units, _wrong_producer,
                                     _unknown_taken_as_masked])
def test_probe_rows_find_a_wrong_plan(corrupt):
    _, hat = _converted()
    inputs = hatify.inputs.Inputs.of((X,))
    assert probe.probe_flow(hat, inputs, rows=True)[1] == 0
    corrupt(hat)
    assert probe.probe_flow(hat, inputs, rows=True)[1] > 0


def test_probe_rows_record_what_one_pattern_at_a_time_records():
    _, hat = _converted()
    watch, inputs = probe.watched_sites(hat), hatify.inputs.Inputs.of((X,))
    keeps = [keep for _, keep in probe.probe_patterns(hat)]
    hat.eval()
    rows, as_rows, _ = probe._observe_all(hat, inputs, keeps, watch, rows=True)
    assert as_rows and len(rows) == len(keeps) > 3
    for keep, observed in zip(keeps, rows):
        alone = probe.observe_zeros(hat, inputs, keep, watch)
        assert observed.keys() == alone.keys()
        assert all(torch.equal(a, b) for node in alone for a, b in zip(observed[node], alone[node], strict=True))


class _BatchCentred(torch.nn.Module):
    """Subtracts the batch mean between two layers: rows of different probe patterns reach each other."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.head(torch.relu(self.conv2(h - h.mean(0, keepdim=True))))


def test_a_model_that_mixes_rows_is_probed_one_pattern_at_a_time():
    torch.manual_seed(0)
    model = _BatchCentred()
    hat = hatify.hatify(model, 2, (X,), validate=False)
    watch, inputs = probe.watched_sites(hat), hatify.inputs.Inputs.of((X,))
    patterns = probe.probe_patterns(hat)
    hat.eval()
    rows, as_rows, _ = probe._observe_all(hat, inputs, [keep for _, keep in patterns], watch, rows=True)
    assert as_rows and any(probe._counts(keep, zeros, watch)[2] for (_, keep), zeros in zip(patterns, rows))
    _, violations, _ = probe.probe_flow(hat, inputs, rows=True)
    assert violations == 0 and hatify.validate(model, hat, (X,)).passed


def test_gradient_check_finds_a_parameter_cut_off():
    model, hat = _converted()
    graph = hat.net.graph
    bn1 = next(n for n in graph.nodes if n.name == "bn1")
    bn1.replace_all_uses_with(bn1.args[0])  # bn1's output no longer reaches anything
    graph.erase_node(bn1)
    hat.net.recompile()
    result = hatify.validate(model, hat, (X,))
    assert not result.passed
    assert set(result.missing_gradients) == {"bn1.weight", "bn1.bias"}


def test_the_comparison_forward_keeps_no_tensors_for_a_backward():
    """validate's open-mask forward serves the gradient walk: its graph holds no activations (peak memory); the
    real backward that decides an unreached parameter runs a forward of its own."""
    _, hat = _converted()
    inputs = hatify.inputs.Inputs.of((X,))
    walked = sys.modules["hatify.validate"]._hat_outputs(hat, inputs, grad=True)
    with pytest.raises(hatify.HatifyError, match="gradient walk only"):
        sum(v.square().sum() for v in walked.values()).backward()
    full = sys.modules["hatify.validate"]._hat_outputs(hat, inputs, grad=True, backward=True)
    sum(v.square().sum() for v in full.values()).backward()
    assert all(v.requires_grad for v in walked.values())


def test_open_mask_comparison_finds_a_changed_computation():
    model, hat = _converted()
    with torch.no_grad():
        hat.net.get_submodule("bn2").copies[0].bias.add_(0.5)
    result = hatify.validate(model, hat, (X,))
    assert not result.passed and result.largest_difference > result.tolerance
    assert result.missing_gradients == [] and result.probe_violations == 0


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5, 20, 53, 300])
def test_layer_groups_separate_every_ordered_pair(n, ordered):
    ends = sorted(torch.randint(-1, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist(), reverse=True)
    codes = probe._separating_codes(n, ends if ordered else None)
    assert len(set(codes)) == n
    assert all(set(a) - set(b) for a in codes for b in codes if a != b)  # A zeroed while B is not, both ways
    positions = max(max(code) for code in codes) + 1
    assert positions <= 2 * max(1, n - 1).bit_length()  # never more probes than one bit each way
    assert positions == max(max(code) for code in probe._separating_codes(n)) + 1  # ordering adds no probe


def test_output_differences_are_exact_without_whole_float64_copies():
    """The open-mask comparison reads outputs a million elements at a time: the same float64 maxima (NaN kept)."""
    import math

    from hatify.validate import _largest

    gen = torch.Generator().manual_seed(0)
    for shape in [(), (7,), (2, 64, 32000), (3 * 2 ** 20 + 5,)]:
        a = torch.randn(shape, generator=gen)
        b = a + 1e-3 * torch.randn(shape, generator=gen)
        assert _largest(a, b) == float((a.double() - b.double()).abs().max())
        assert _largest(a) == float(a.double().abs().max())
    b = a.clone()
    b[2 ** 20 + 1] = float("nan")
    assert math.isnan(_largest(a, b))
    assert _largest(torch.ones(2, 3), torch.zeros(3)) == 1.0  # broadcast, as a plain difference


def _only_zero(hat, name):
    keep = torch.ones(hat.plan.total_units)
    keep[_layer(hat, name).offset:][:_layer(hat, name).units] = 0
    return keep


def test_a_violation_past_the_zeroed_layers_readers_is_found():
    """A pattern's run stops after the last call where the plan predicts a zero under it, wherever the zeroed
    layers' real readers are: conv1 is read by conv2 only, but a plan that says conv3 (the last call) reads it
    sends conv1's pattern through conv3, where the violation shows."""
    model, hat = _converted()
    inputs = hatify.inputs.Inputs.of((X,))
    patterns = [("conv1 zero", _only_zero(hat, "conv1"))]
    results, violations, _ = probe.probe_flow(hat, inputs, patterns)
    assert violations == 0 and results[0]["layers"] == 1  # conv2: from conv1's gate on, stopped before conv3
    conv3 = _layer(hat, "conv3")
    conv3.input_index = torch.arange(conv3.input_units).unsqueeze(0) + _layer(hat, "conv1").offset
    results, violations, _ = probe.probe_flow(hat, inputs, patterns)
    assert violations > 0 and results[0]["layers"] == 4  # decided by the pattern's own full run
    assert not hatify.validate(model, hat, (X,)).passed


def early_runs_record_what_full_runs_record(hat, inputs):
    """Every probe pattern, run up to its stop: each call where the plan predicts a zero is recorded, and every
    recorded call as the full run records it."""
    watch = probe.watched_sites(hat)
    hat.eval()
    stopped_early = 0
    keeps = [keep for alone in (False, True) for _, keep in probe.probe_patterns(hat, alone=alone)]
    needs = [probe.predicted_sites(keep, watch) for keep in keeps]
    forked = probe.observe_forked(hat, inputs, keeps, watch, needs)  # each from where it leaves the open run
    for keep, needed, late in zip(keeps, needs, forked):
        early = probe.observe_zeros(hat, inputs, keep, watch, needed)
        full = probe.observe_zeros(hat, inputs, keep, watch)
        assert needed <= late.keys() <= early.keys() <= full.keys()
        for node in early:
            assert all(torch.equal(a, b) for a, b in zip(early[node], full[node], strict=True))
        for node in late:
            assert all(torch.equal(a, b) for a, b in zip(late[node], full[node], strict=True))
        stopped_early += early.keys() != full.keys()
    return stopped_early


def test_early_stopped_runs_record_what_full_runs_record():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    hat = hatify.hatify(model, 2, (x,))
    assert hat.report.validation["passed"]
    assert early_runs_record_what_full_runs_record(hat, hatify.inputs.Inputs.of((x,))) >= 3


def test_a_forked_run_gets_its_own_copy_of_the_live_values():
    """A forked probe run may write in place: it gets copies in which views still alias their base; parameters
    stay themselves; other objects are deep-copied with those copies; one that cannot be copied makes the pattern
    run from the start instead."""
    weight = torch.nn.Parameter(torch.randn(3))
    base = torch.randn(4, 3)
    before = base.clone()
    env = {"base": base, "row": base[1], "pair": (base[2:], weight), "n": 3}
    live = probe._copy_live(env, {id(weight): weight})
    live["row"].add_(1.0)  # in place, as relu_ or += would
    assert torch.equal(live["base"][1], live["row"]) and torch.equal(live["pair"][0], live["base"][2:])
    assert torch.equal(base, before) and not torch.equal(live["base"], before)
    assert live["pair"][1] is weight and live["n"] == 3
    holder = types.SimpleNamespace(images=base, sizes=[(4, 3)])  # an object holding a live tensor (ImageList)
    live = probe._copy_live({**env, "holder": holder}, {})
    assert live["holder"] is not holder and live["holder"].images is live["base"]
    assert probe._copy_live({**env, "lock": threading.Lock()}, {}) is None  # cannot be copied: run from the start
