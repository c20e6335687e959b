"""Property tests: random small architectures built from the supported ops convert, validate, and the static
mask-flow plan matches what zeroing mask units does at run time (activations and weight gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hatify
from hatify.validate import original_parameter_map

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])
BATCH = 3


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, left: nn.Module, right: nn.Module, dim: int) -> None:
        super().__init__()
        self.left, self.right, self.dim = left, right, dim

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=self.dim)


class Clamp(nn.Module):
    def __init__(self, low: float) -> None:
        super().__init__()
        self.low = low

    def forward(self, x):
        return x.clamp(min=self.low)


class Crop(nn.Module):
    """Keep the top half of the rows: makes per-position maps (after a spatial concat) observable."""

    def forward(self, x):
        return x[:, :, : x.shape[2] // 2]


class ChannelsLastLayerNorm(nn.Module):
    """ConvNeXt-style LayerNorm over channels of an NCHW tensor: permute, normalise, permute back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RandomNet(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "relu6": nn.ReLU6, "clamp0": lambda: Clamp(0.0),
               "clamp_shifted": lambda: Clamp(0.1), "hardtanh_shifted": lambda: nn.Hardtanh(0.1, 1.0)}
widths = st.integers(2, 6)

conv_layer = st.tuples(st.just("conv"), widths, st.sampled_from([1, 3]), st.booleans())
conv_op = st.one_of(
    conv_layer,
    st.tuples(st.just("bn")),
    st.tuples(st.just("layernorm")),
    st.tuples(st.just("act"), st.sampled_from(sorted(ACTIVATIONS))),
    st.tuples(st.just("residual"), st.booleans()),
    st.tuples(st.just("concat"), widths, widths),
    st.tuples(st.just("concat_rows"),),
    st.tuples(st.just("crop"),),
    st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])),
    st.tuples(st.just("smooth"), st.sampled_from(["max", "avg"])),
)
linear_layer = st.tuples(st.just("linear"), widths)
linear_op = st.one_of(
    linear_layer,
    st.tuples(st.just("act"), st.sampled_from(sorted(ACTIVATIONS))),
    st.tuples(st.just("layernorm")),
    st.tuples(st.just("residual"), st.booleans()),
    st.tuples(st.just("concat"), widths, widths),
)
architectures = st.fixed_dictionaries({
    "channels": st.integers(1, 3),
    "size": st.sampled_from([2, 4, 6]),
    # Every stage starts with a producer, so masks flow through whatever follows.
    "conv": st.builds(lambda first, rest: [first, *rest], conv_layer, st.lists(conv_op, max_size=4)),
    "to_vector": st.sampled_from(["flatten", "global_pool"]),
    "linear": st.builds(lambda first, rest: [first, *rest], linear_layer, st.lists(linear_op, max_size=3)),
    "outputs": st.integers(1, 4),
    "seed": st.integers(0, 2 ** 16),
})


def build(spec: dict) -> tuple[nn.Module, tuple]:
    """A RandomNet and its example input from an architecture spec (plain data, shown on failure)."""
    torch.manual_seed(spec["seed"])
    c, height, width, layers = spec["channels"], spec["size"], spec["size"], []
    for op in spec["conv"]:
        kind = op[0]
        if kind == "conv":
            _, out, k, grouped = op
            groups = next(g for g in (c, 2, 1) if grouped and c % g == 0 and out % g == 0) if grouped else 1
            layers.append(nn.Conv2d(c, out, k, padding=k // 2, groups=groups))
            c = out
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif kind == "layernorm":
            layers.append(ChannelsLastLayerNorm(c))
        elif kind == "act":
            layers.append(ACTIVATIONS[op[1]]())
        elif kind == "residual":
            body = [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
            if op[1]:
                body += [nn.ReLU(), nn.Conv2d(c, c, 1)]
            layers.append(Residual(nn.Sequential(*body)))
        elif kind == "concat":
            layers.append(Concat(nn.Conv2d(c, op[1], 3, padding=1),
                                 nn.Sequential(nn.Conv2d(c, op[2], 1), nn.ReLU()), dim=1))
            c = op[1] + op[2]
        elif kind == "concat_rows":
            layers.append(Concat(nn.Conv2d(c, c, 3, padding=1), nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()), dim=2))
            height *= 2
        elif kind == "crop" and height >= 2:
            layers.append(Crop())
            height //= 2
        elif kind == "pool" and min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2) if op[1] == "max" else nn.AvgPool2d(2))
            height, width = height // 2, width // 2
        elif kind == "smooth":
            layers.append(nn.MaxPool2d(3, 1, 1) if op[1] == "max" else nn.AvgPool2d(3, 1, 1))
    if spec["to_vector"] == "flatten":
        layers.append(nn.Flatten())
        c = c * height * width
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for op in spec["linear"]:
        kind = op[0]
        if kind == "linear":
            layers.append(nn.Linear(c, op[1]))
            c = op[1]
        elif kind == "act":
            layers.append(ACTIVATIONS[op[1]]())
        elif kind == "layernorm":
            layers.append(nn.LayerNorm(c))
        elif kind == "residual":
            body = [nn.Linear(c, c)] + ([nn.ReLU(), nn.Linear(c, c)] if op[1] else [])
            layers.append(Residual(nn.Sequential(*body)))
        elif kind == "concat":
            layers.append(Concat(nn.Linear(c, op[1]), nn.Sequential(nn.Linear(c, op[2]), nn.GELU()), dim=-1))
            c = op[1] + op[2]
    layers.append(nn.Linear(c, spec["outputs"]))
    inputs = (torch.randn(BATCH, spec["channels"], spec["size"], spec["size"],
                          generator=torch.Generator().manual_seed(1)),)
    return RandomNet(layers), inputs


def convert(spec: dict) -> tuple[nn.Module, hatify.HATModel, tuple]:
    model, inputs = build(spec)
    return model, hatify.hatify(model, num_tasks=2, example_inputs=inputs), inputs


@PROPERTY_SETTINGS
@given(architectures)
def test_random_architecture_validates(spec: dict) -> None:
    model, hat, inputs = convert(spec)
    result = hatify.validate(model, hat, inputs)
    assert result.passed, result.messages
    assert result.probe_violations == 0
    assert result.missing_gradients == []
    watched = [layer for layer in hat.plan.masked_layers if layer.input_index is not None]
    if watched:  # a pattern's run passes the calls where it predicts a zero (others may stop before any call)
        assert all(probe["layers"] > 0 for probe in result.probes if probe["pattern"] == "all zero")
        assert all(probe["layers"] > 0 for probe in result.probes if probe["predicted_zero"])
    if any(layer.input_producers for layer in watched):  # all masks closed: the probe is not vacuous
        assert all(probe["predicted_zero"] > 0 for probe in result.probes if probe["pattern"] == "all zero")


def _weight_grad_columns(layer, grad: torch.Tensor) -> torch.Tensor:
    """Per input unit of the layer: is its whole weight column (every output, every kernel position) zero?"""
    if layer.kind == "linear":
        return (grad == 0).all(0)
    per_group = grad.shape[1]
    out_per_group = grad.shape[0] // layer.groups
    columns = []
    for j in range(layer.input_units):
        group = j // per_group
        rows = grad[group * out_per_group:(group + 1) * out_per_group, j % per_group]
        columns.append(bool((rows == 0).all()))
    return torch.tensor(columns)


@PROPERTY_SETTINGS
@given(architectures, st.integers(0, 2 ** 16), st.sampled_from([0.3, 0.6, 1.0]))
def test_predicted_zero_inputs_get_no_weight_gradient(spec: dict, seed: int, fraction: float) -> None:
    """HAT's guarantee rests on this: a weight whose input unit the plan predicts zero (because masks are zero)
    receives exactly zero gradient, and so does every weight row and bias of a zeroed output unit."""
    _, hat, inputs = convert(spec)
    layers = [layer for layer in hat.plan.masked_layers if layer.input_index is not None]
    keep = (torch.rand(hat.plan.total_units, generator=torch.Generator().manual_seed(seed)) >= fraction).float()
    keep_ext = torch.cat([keep, torch.ones(1)])
    params = dict(hat.net.named_parameters())
    names = original_parameter_map(hat)
    hat.eval()
    hat.masks.override = keep
    try:
        out = hat(*inputs, task_id=0)
    finally:
        hat.masks.override = None
    hat.zero_grad()
    out.square().sum().backward()
    for layer in layers:
        grad = params[names[layer.weight]].grad
        grad = torch.zeros_like(params[names[layer.weight]]) if grad is None else grad
        predicted = (keep_ext[layer.input_index] == 0).all(0)
        zero_columns = _weight_grad_columns(layer, grad)
        assert not bool((predicted & ~zero_columns).any()), (layer.name, predicted, zero_columns)
        closed = keep[layer.offset: layer.offset + layer.units] == 0
        assert bool((grad[closed] == 0).all()), layer.name
        if layer.bias is not None and params[names[layer.bias]].grad is not None:
            assert bool((params[names[layer.bias]].grad[closed] == 0).all()), layer.name


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(architectures)
def test_old_task_bit_identical_after_training_a_new_one(spec: dict) -> None:
    _, hat, inputs = convert(spec)
    (x,) = inputs
    opt = torch.optim.AdamW(hat.parameters(), lr=0.05, weight_decay=0.1)
    targets = torch.arange(BATCH) % spec["outputs"]

    def train(t: int) -> None:
        hat.train()
        hat.begin_task(t)
        for b in range(3):
            loss = F.cross_entropy(hat(x, task_id=t, mask_scale=hat.mask_scale(b, 3)), targets)
            loss = loss + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()

    train(0)
    hat.eval()
    with torch.no_grad():
        before = hat(x, task_id=0)
    train(1)
    hat.eval()
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), before)
    assert hat.trained_tasks == [0, 1]
