"""What weight protection keeps: the frozen values of the protected rows only, per-unit selectors, and files saved
with a weight-shaped `frozen` still load."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import hatify
from hatify.layers import Protect


class Net(nn.Module):
    """A 3x3 conv on the image (whole rows protected), a 3x3 conv on masked inputs and a grouped one (rows by
    columns), a linear layer on masked inputs, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1, groups=2)
        self.fc, self.head = nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.head(F.relu(self.fc(h.mean((2, 3)))))


def _finished_task(pattern) -> tuple:
    """Task 0 ended with the units `pattern(unit, layer size)` picks as its binary mask; task 1 begun and trained
    for two steps (the write-back and gradient selectors exist)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    hat = hatify.hatify(Net(), num_tasks=2, example_inputs=(x[:2],))
    hat.train()
    hat.begin_task(0)
    with torch.no_grad():
        e = hat.masks.embedding(0)
        for layer in hat.plan.masked_layers:
            e[layer.offset:layer.offset + layer.units] = torch.tensor(
                [1.0 if pattern(u, layer.units) else -1.0 for u in range(layer.units)])
    hat.end_task()
    hat.begin_task(1)
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    for b in range(2):
        loss = hat(x, task_id=1, mask_scale=hat.mask_scale(b, 2)).square().mean() + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hat, x


def _protects(hat) -> dict[str, tuple[Protect, torch.Tensor]]:
    return {name: (owner.parametrizations.weight[0], owner.parametrizations.weight.original)
            for name, owner in hat.net.named_modules() if name in ("c1", "c2", "c3", "fc")}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_protection_costs_the_protected_rows_not_copies_of_the_weight():
    """Half of every layer's units used: a layer's frozen values, protection mask and run-time selectors together
    take half its weight's bytes (the protected rows), the mask, and per-unit terms: an index and a selector per
    row, a row-shaped selector per block. A frozen copy of the weight plus a weight-shaped selector took 2x; for
    the wider convolutions the sum stays under 0.6x."""
    hat, _ = _finished_task(lambda u, n: u < n // 2)
    for name, (protect, raw) in _protects(hat).items():
        assert protect.active
        frozen = protect.frozen.untyped_storage().data_ptr()
        cached = [t for t in protect.cached_tensors() if t.untyped_storage().data_ptr() != frozen]
        assert cached, name  # the write-back and gradient selectors were built by the training steps
        total = _bytes(protect.frozen) + _bytes(protect.protect) + sum(_bytes(t) for t in cached)
        assert _bytes(protect.frozen) == _bytes(raw) // 2, name  # the protected rows, whole
        per_unit = 16 * raw.shape[0] + 4 * raw[0].numel() * len(protect._frozen_blocks(raw.dtype))
        assert total <= _bytes(raw) // 2 + _bytes(protect.protect) + per_unit, name
        if name in ("c2", "c3"):
            assert total <= 0.6 * _bytes(raw), (name, total / _bytes(raw))


def test_grouped_convolution_gets_one_block_per_column_pattern_and_every_bit_back():
    """A grouped convolution whose groups use different inputs: one block of rows per group, each with its own
    free columns; junk written over every entry (NaN payloads, inf, -0.0) comes back as the frozen bits in
    place and out of place, and the protected gradient is exactly +0 while the free entries learn."""
    hat, x = _finished_task(lambda u, n: u % 3 != 1)  # the two groups of c3 see different input patterns
    protect, raw = _protects(hat)["c3"]
    blocks = protect._frozen_blocks(raw.dtype)
    assert len(blocks) == 2 and all(free is not None for _, free, _, _ in blocks)
    where = protect.protect.expand(raw.shape)
    frozen = protect.dense_frozen(raw.dtype).view(torch.int32)[where]
    junk = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-45]).repeat(raw.numel() // 4 + 1)[:raw.numel()]
    junk = junk.view(torch.int32).add(3).view(torch.float32).view(raw.shape)  # NaN payloads
    outside = junk.clone().requires_grad_()
    assert torch.equal(protect(outside).detach().view(torch.int32)[where], frozen)
    with torch.no_grad():
        raw.copy_(junk)
    assert torch.equal(protect(raw).detach().view(torch.int32)[where], frozen)
    assert torch.equal(raw.detach().view(torch.int32)[~where], junk.view(torch.int32)[~where])  # free: untouched
    raw.grad = None
    (protect(raw) * torch.randn(raw.shape)).sum().backward()
    assert torch.equal(raw.grad.view(torch.int32)[where], torch.zeros_like(frozen))
    assert bool((raw.grad[~where] != 0).all())


@pytest.mark.parametrize("through_file", [False, True])
def test_weight_shaped_frozen_buffers_of_earlier_files_load_packed(tmp_path, through_file):
    """A state dict (or a hatify file) written when `frozen` held a full copy of the weight loads into the packed
    layout: the same frozen values, and the old task's outputs are bit-identical."""
    hat, x = _finished_task(lambda u, n: u % 4 != 0)
    hat.eval()
    with torch.no_grad():
        want = hat(x, task_id=0)
    state = hat.state_dict()
    old = dict(state)
    for name, (protect, raw) in _protects(hat).items():
        key = f"net.{name}.parametrizations.weight.0.frozen"
        assert key in old and old[key].ndim == 1
        old[key] = protect.dense_frozen(raw.dtype)  # the earlier layout: the weight's shape
        assert old[key].shape == raw.shape
    if through_file:
        path = tmp_path / "model.hat"
        hatify.save(hat, path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        for key in old:
            if key.endswith(".frozen") and key in tensors:
                tensors[key] = old[key].contiguous()
        save_file(tensors, str(path), metadata=meta)
        loaded = hatify.load(path, model=Net())
    else:
        torch.manual_seed(1)
        loaded = hatify.hatify(Net(), num_tasks=2, example_inputs=(x[:2],))
        loaded.begin_task(0)
        loaded.end_task()  # the same parameters become buffers as in `hat`
        loaded.load_state_dict(old)
    for name, (protect, _) in _protects(loaded).items():
        assert torch.equal(protect.frozen, state[f"net.{name}.parametrizations.weight.0.frozen"]), name
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, task_id=0), want)


def test_channels_last_weights_keep_the_old_task_exact():
    """Convolution weights in channels_last order (rows not contiguous: no wide copies) are restored too."""
    hat, x = _finished_task(lambda u, n: u % 3 != 1)
    hat.to(memory_format=torch.channels_last).eval()  # (the layout changes the convolution's rounding)
    assert not _protects(hat)["c2"][1].is_contiguous()
    with torch.no_grad():
        want = hat(x, task_id=0)
    hat.train()
    opt = torch.optim.SGD(hat.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for b in range(3):
        loss = hat(x, task_id=1, mask_scale=hat.mask_scale(b, 3)).square().mean() + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hat.eval()
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), want)


def test_frozen_values_that_fit_neither_layout_are_refused():
    hat, x = _finished_task(lambda u, n: u % 4 != 0)
    state = hat.state_dict()
    key = "net.c2.parametrizations.weight.0.frozen"
    state[key] = state[key][:-1]
    with pytest.raises(hatify.HatifyError, match="net.c2.parametrizations.weight.0.frozen holds"):
        hat.load_state_dict(state)
