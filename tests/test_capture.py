"""Capture: concrete tracing resolves shape-dependent Python at the example shapes (and says where), keeps
the batch size free, and falls back to opaque leaves with a reason code and source line."""
import torch
import torch.nn.functional as F
from torch import fx, nn

import hatify


class ShapeBranches(nn.Module):
    """Python control flow on shapes, tensor factories and buffer expands sized by traced values, len() of a
    shape, int() of a float computed from sizes, and in-place item assignment: all untraceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("token", torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        B, C, H, W = h.shape
        if H % 4 != 0:  # pad to a multiple of 4
            h = F.pad(h, (0, 4 - W % 4, 0, 4 - H % 4))
        tokens = h.flatten(2).transpose(1, 2)
        side = int(tokens.shape[1] ** 0.5)
        grid = torch.zeros(B, side * side, C)
        grid[:, :, :] = 1.0
        tokens = torch.cat([self.token.expand(B, -1, -1), tokens * grid], dim=1)
        for _ in range(len(tokens.shape) - 2):
            tokens = F.gelu(self.proj(tokens))
        return self.head(tokens.mean(1))


def _train_two_tasks(hat, x):
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(3):
            loss = hat(x, task_id=t, mask_scale=hat.mask_scale(b, 3)).square().mean() + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        if t == 0:
            hat.eval()
            with torch.no_grad():
                first = hat(x, task_id=0)
    hat.eval()
    with torch.no_grad():
        return torch.equal(hat(x, task_id=0), first)


def test_shape_branches_trace_concretely_and_keep_the_batch_free():
    model, x = ShapeBranches().eval(), torch.randn(2, 3, 6, 6)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert not hat.plan.opaque
    assert {layer.name for layer in hat.plan.masked_layers} == {"conv", "proj"}
    uses = {entry["use"] for entry in hat.plan.specialized}
    assert {"bool", "int", "len"} <= uses
    assert all(entry["line"].startswith("test_capture.py:") for entry in hat.plan.specialized
               if entry["use"] != "none")
    assert hatify.validate(model, hat, (x,)).passed
    bigger = torch.randn(5, 3, 6, 6)  # another batch size runs and matches the original
    with torch.no_grad(), hatify.masks_open(hat):
        torch.testing.assert_close(hat(bigger, task_id=0), model(bigger))
    assert _train_two_tasks(hat, x)


class WrittenInPlace(nn.Module):
    """A masked tensor partly overwritten by another: the written tensor's units are unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        B = h.shape[0]
        out = torch.zeros(B, 6)
        out[:, :3] = h[:, :3]
        out[:, 3:] = self.b(x)[:, 3:]
        return self.head(F.relu(self.c(out)))


def test_item_assignment_is_sound():
    model, x = WrittenInPlace().eval(), torch.randn(3, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert hat.plan.layer("c").input_map.startswith("ones")
    result = hatify.validate(model, hat, (x,))
    assert result.passed and result.probe_violations == 0


class ReadsWeightDtype(nn.Module):
    """A layer's weight read for its dtype only (`x.to(self.fc.weight.dtype)`), the layer itself a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.body(x))
        return self.fc(h.to(self.fc.weight.dtype))


def test_parameter_read_for_dtype_is_no_data_use():
    model, x = ReadsWeightDtype().eval(), torch.randn(2, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert hat.plan.layer("fc").role == "head" and not hat.plan.params
    assert hatify.validate(model, hat, (x,)).passed
    assert _train_two_tasks(hat, x)


def test_weight_standardised_conv_with_gain_is_a_hat_layer():
    from timm.layers import ScaledStdConv2d

    model = nn.Sequential(ScaledStdConv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    layer = hat.plan.layer("0")
    assert layer.role == "masked" and layer.weight == "0.weight"
    assert "output unit only" in layer.reason  # the standardisation mixes a row: whole rows are frozen
    assert [p.name for p in hat.plan.params] == ["0.gain"]
    assert hatify.validate(model, hat, (x,)).passed
    assert _train_two_tasks(hat, x)


def padding_mask(valid, dtype):
    """An additive mask from a validity tensor, or None without one (timm's `create_attention_mask`)."""
    if valid is None:
        return None
    return torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, float("-inf")).unsqueeze(-1)


fx.wrap("padding_mask")  # one node when called with a traced argument, like timm's no-trace helpers


class OptionalPaddingMask(nn.Module):
    """A wrapped helper called with a traced argument (`x.dtype`) whose result is None at the example inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, valid=None):
        mask = padding_mask(valid, x.dtype)
        h = F.relu(self.proj(x))
        if mask is not None:
            h = h + mask
        return self.head(h.mean(1))


def test_wrapped_helper_with_none_result_passes_none_on():
    model, x = OptionalPaddingMask().eval(), torch.randn(2, 5, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert not hat.plan.opaque
    assert [(e["use"], e["line"]) for e in hat.plan.specialized if e["node"] == "padding_mask"] == [
        ("none", f"test_capture.py:{OptionalPaddingMask.forward.__code__.co_firstlineno + 1}")]
    assert {layer.name for layer in hat.plan.masked_layers} == {"proj"}
    assert hatify.validate(model, hat, (x,)).passed
    assert _train_two_tasks(hat, x)


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # a branch on data: cannot be resolved from shapes
            h = h * 2
        return h


def test_data_branch_becomes_opaque_with_reason_code_and_line():
    model = nn.Sequential(nn.Linear(4, 4), DataBranch(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    why = hat.plan.opaque["1"]
    assert why.startswith("untraceable at test_capture.py:"), why
    assert hatify.validate(model, hat, (x,)).passed


def clipped_window(window, size):
    """Mutates its list argument in place, like torchvision's `_get_window_and_shift_size` (swin3d)."""
    for i in range(len(size)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


fx.wrap("clipped_window")  # one node called with traced sizes: fx freezes its list arguments


class MutatingHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        window = clipped_window([3, 7], [x.shape[1], x.shape[2]])
        h = F.relu(self.proj(x))[:, : window[0], : window[1]]
        return self.head(h.mean((1, 2)))


def test_wrapped_helper_that_mutates_its_list_argument():
    model, x = MutatingHelper().eval(), torch.randn(2, 5, 3, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    assert [n.target for n in hat.net.graph.nodes if n.op == "call_function"].count(clipped_window) == 1
    assert {layer.name for layer in hat.plan.masked_layers} == {"proj"}
    assert hatify.validate(model, hat, (x,)).passed
    assert _train_two_tasks(hat, x)


def test_trace_leaves_no_wrapper_in_torch_caches_and_frees_the_traced_copy():
    """torch.overrides caches its tables of torch functions the first time it is asked, which may be during a
    trace: they must hold torch's functions, not the trace's wrappers (which would keep the tracer, and the traced
    copy of the model, alive for the life of the process)."""
    import gc
    import weakref

    tables = (torch.overrides.get_ignored_functions, torch.overrides.get_testing_overrides,
              torch.overrides._get_overridable_functions, torch.overrides._get_tensor_methods)
    for table in tables:
        table.cache_clear()
    traced = []
    capture = hatify.capture.HatTracer.trace

    def trace(self, root, concrete_args=None):
        traced.append(weakref.ref(root))
        return capture(self, root, concrete_args)

    hatify.capture.HatTracer.trace = trace
    try:
        hatify.hatify(ShapeBranches().eval(), num_tasks=2, example_inputs=(torch.randn(2, 3, 6, 6),), validate=False)
    finally:
        hatify.capture.HatTracer.trace = capture
    gc.collect()
    assert traced and all(ref() is None for ref in traced)
    assert torch.zeros in torch.overrides.get_ignored_functions()
    assert torch.Tensor.view in torch.overrides._get_tensor_methods()
