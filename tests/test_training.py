"""Training with HAT: schedule, compensation, regulariser, and bit-exact protection of finished tasks."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify
from hatify.layers import Gate, _arranged, compensated_sigmoid
from hatify.model import mask_scale

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=1e-3),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_foreach_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                                      foreach=True),
}


class ConvNet(nn.Module):
    """Conv + BN, a residual add, flatten into LayerNorm and Linear, a loose bias parameter, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.ln, self.fc = nn.LayerNorm(8 * 8 * 8), nn.Linear(8 * 8 * 8, 16)
        self.loose = nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = h + F.relu(self.c2(h))
        return self.head(F.gelu(self.fc(self.ln(h.flatten(1)))) + self.loose)


class TokenNet(nn.Module):
    """Embedding, position embedding, multi-head attention (traced as its projections), mean pooling, per-task
    head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.pos = nn.Parameter(torch.randn(1, 6, 16) * 0.1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(F.relu(self.fc(h)).mean(1))


def _data(model_name: str, n: int = 16):
    gen = torch.Generator().manual_seed(1)
    if model_name == "conv":
        return ConvNet(), torch.randn(n, 3, 8, 8, generator=gen), 4
    return TokenNet(), torch.randint(0, 20, (n, 6), generator=gen), 3


def train_tasks(hat, opt, x, classes, tasks, steps=6, clip=True, autocast=False, copy_between=False):
    """The API.md loop; returns each task's eval output right after it ended, and the final model."""
    gen = torch.Generator().manual_seed(2)
    after = {}
    for t in tasks:
        hat.train()
        hat.begin_task(t)
        for b in range(steps):
            y = torch.randint(0, classes, (x.shape[0],), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = hat(x, task_id=t, mask_scale=hat.mask_scale(b, steps))
                loss = F.cross_entropy(out.float(), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(hat.parameters(), 1.0)
            opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            after[t] = hat(x, task_id=t)
        if copy_between:
            hat, opt = copy.deepcopy((hat, opt))
    return after, hat


def _assert_old_tasks_identical(after, hat, x, autocast=False):
    hat.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for t, expected in after.items():
            assert torch.equal(hat(x, task_id=t), expected), f"task {t} changed"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_old_tasks_bit_identical_with_any_optimizer(model_name, opt_name):
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS[opt_name](hat.parameters())  # one optimizer object, reused across tasks
    after, hat = train_tasks(hat, opt, x, classes, range(3))
    _assert_old_tasks_identical(after, hat, x)
    assert hat.trained_tasks == [0, 1, 2]


@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_protection_survives_deepcopy_between_tasks(model_name):
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adamw"](hat.parameters())
    after, hat = train_tasks(hat, opt, x, classes, range(3), copy_between=True)
    _assert_old_tasks_identical(after, hat, x)


def test_protection_under_bfloat16_autocast():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adamw"](hat.parameters())
    after, hat = train_tasks(hat, opt, x, classes, range(3), autocast=True)
    _assert_old_tasks_identical(after, hat, x, autocast=True)


def test_protection_survives_load_state_dict_assign():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS["sgd_momentum_wd"](hat.parameters())
    after, hat = train_tasks(hat, opt, x, classes, range(2))
    hat.load_state_dict(copy.deepcopy(hat.state_dict()), assign=True)
    opt = OPTIMIZERS["sgd_momentum_wd"](hat.parameters())
    more, hat = train_tasks(hat, opt, x, classes, [2])
    _assert_old_tasks_identical({**after, **more}, hat, x)


def _protected_parameters(hat):
    """(raw parameter, Protect) of every protected weight and bias."""
    return [(owner.parametrizations[attr].original, owner.parametrizations[attr][0])
            for owner in hat.modules() if hasattr(owner, "parametrizations") for attr in owner.parametrizations]


@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_protected_entries_get_exactly_zero_gradient_before_clipping(model_name):
    """The gradient is masked once accumulated, so clip_grad_norm_ and DDP see HAT's conditioned gradient;
    a deep copy made between tasks (fresh parameter objects) gets the masking too."""
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, [0])
    for copy_first in (False, True):
        net = copy.deepcopy(hat) if copy_first else hat
        net.train()
        net.begin_task(1)
        net.zero_grad(set_to_none=True)
        for _ in range(2):  # accumulated over two backward passes
            net(x, task_id=1, mask_scale=10.0).pow(2).sum().backward()
        checked = 0
        for raw, protect in _protected_parameters(net):
            mask = protect.protect.expand_as(raw)
            assert raw.grad is not None and bool(mask.any())
            assert torch.equal(raw.grad[mask], torch.zeros_like(raw.grad[mask]))
            assert bool((raw.grad[~mask] != 0).any())  # free entries still learn
            checked += 1
        assert checked


def test_writes_through_data_cannot_move_finished_tasks():
    """A hand-written update through `.data` (no version bump, no optimizer) still leaves old tasks exact."""
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    after, hat = train_tasks(hat, OPTIMIZERS["adamw"](hat.parameters()), x, classes, [0])
    hat.train()
    hat.begin_task(1)
    gen = torch.Generator().manual_seed(3)
    for b in range(4):
        loss = hat(x, task_id=1, mask_scale=hat.mask_scale(b, 4)).pow(2).mean() + hat.regularization()
        hat.zero_grad()
        loss.backward()
        for p in hat.parameters():
            p.data.mul_(0.9).add_(torch.randn(p.shape, generator=gen))   # weight decay and noise, by hand
    hat.end_task()
    hat.eval()  # in eval mode as well: an in-place write (version bump) is put back before the next read
    with torch.no_grad():
        for raw, _ in _protected_parameters(hat):
            raw.add_(1.0)
    _assert_old_tasks_identical(after, hat, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_write_back_restores_every_bit_and_zeroes_every_gradient_bit(model_name, dtype):
    """NaN payloads, infinities, -0.0 and subnormals written over frozen entries are undone bit for bit, in place
    (a parameter) and out of place (a tensor from outside); the protected gradient is exactly +0. Covers every
    layout of the packed frozen values: whole rows (the first layer), the mask broadcast over leading dimensions
    (an embedding), rows by columns (a linear layer, a convolution); one rectangle per group of a grouped
    convolution: test_protect_memory."""
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    _, hat = train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, [0])
    hat.to(dtype).train()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    shapes = set()
    for raw, protect in _protected_parameters(hat):
        where = protect.protect.expand(raw.shape)
        frozen = protect.dense_frozen(dtype).view(bits)[where]
        rows = _arranged(where, protect._order)
        rows = rows.reshape(len(rows), -1)
        assert protect.frozen.numel() == int(rows.any(1).sum()) * rows.shape[1]  # the protected rows only
        junk = torch.tensor([float("nan"), float("-inf"), -0.0, torch.finfo(dtype).tiny / 4], dtype=dtype)
        junk = junk.repeat(raw.numel() // 4 + 1)[:raw.numel()].view(raw.shape).view(bits) + 3  # NaN payloads
        outside = junk.view(dtype).clone().requires_grad_()
        assert torch.equal(protect(outside).detach().view(bits)[where], frozen)   # out of place
        with torch.no_grad():
            raw.copy_(junk.view(dtype))
        assert torch.equal(protect(raw).detach().view(bits)[where], frozen)       # in place
        raw.grad = None
        (protect(raw) * junk.view(dtype).nan_to_num(0.5)).sum().backward()
        assert torch.equal(raw.grad.view(bits)[where], torch.zeros_like(frozen))
        assert not torch.equal(raw.grad.view(bits)[~where], torch.zeros_like(frozen[:0]).new_zeros((~where).sum()))
        blocks = protect._frozen_blocks(dtype)
        shapes.add("leading" if protect._order else "row" if all(free is None for _, free, _, _ in blocks)
                   else "groups" if len(blocks) > 1 else "rectangle")
    assert shapes == ({"rectangle", "row"} if model_name == "conv" else {"rectangle", "leading", "row"})


def test_two_forwards_one_backward_match_the_out_of_place_weights():
    """`.grad` with the weights written back in place equals the gradient through the out-of-place selection
    (the path `torch.func.functional_call` takes), also when one backward covers two forwards."""
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    train_tasks(hat, OPTIMIZERS["sgd_momentum_wd"](hat.parameters()), x, classes, [0])
    hat.train()
    hat.begin_task(1)
    params = dict(hat.named_parameters())

    def loss_of(forward):
        return forward(x[:8]).pow(2).sum() + forward(x[8:]).abs().sum()

    hat.zero_grad(set_to_none=True)
    loss_of(lambda v: hat(v, task_id=1, mask_scale=5.0)).backward()
    inplace = [p.grad for p in params.values()]
    detached = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    functional = torch.autograd.grad(
        loss_of(lambda v: torch.func.functional_call(hat, detached, (v,), {"task_id": 1, "mask_scale": 5.0})),
        list(detached.values()))
    for name, a, b in zip(params, inplace, functional):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_parametrization_registered_on_top_of_protect_is_applied():
    """Reads of a protected weight skip torch's parametrization machinery only while Protect is alone on it."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, [0])
    fc = hat.net.fc
    before = fc.weight.detach().clone()
    parametrize.register_parametrization(fc, "weight", Double())
    assert torch.equal(fc.weight, 2 * before)


def test_every_task_learns_and_changes_outputs():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2)
    y = torch.arange(x.shape[0]) % classes
    for t in range(3):
        hat.train()
        hat.begin_task(t)
        hat.eval()
        with torch.no_grad():
            before = hat(x, task_id=t).clone()
        hat.train()
        losses = []
        for b in range(30):
            loss = F.cross_entropy(hat(x, task_id=t, mask_scale=hat.mask_scale(b, 30)), y)
            losses.append(float(loss.detach()))
            loss = loss + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad():
            assert not torch.equal(hat(x, task_id=t), before), f"task {t} outputs did not change"
        assert losses[-1] < losses[0], f"task {t} loss did not go down: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_finished_task_embeddings_are_buffers_and_clamped():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    opt = torch.optim.SGD(hat.parameters(), lr=0.1)
    train_tasks(hat, opt, x, classes, [0])
    names = {n for n, _ in hat.named_parameters()}
    assert "net.hat_masks.task0" not in names and "net.hat_masks.task1" in names
    # Any optimizer step clamps the live embeddings to [-6, 6], without the user asking.
    hat.train()
    hat.begin_task(1)
    hat(x, task_id=1, mask_scale=1.0).sum().backward()
    e1 = hat.masks.embedding(1)
    e1.grad = torch.full_like(e1, -1000.0)
    opt.step()
    assert float(e1.max()) == 6.0


def test_mask_scale_schedules_against_hand_values():
    s_max, B = 400.0, 5
    linear = [mask_scale("linear", s_max, b, B) for b in range(B)]
    assert linear[0] == pytest.approx(1 / 400) and linear[-1] == pytest.approx(400)
    assert linear[2] == pytest.approx(1 / 400 + (400 - 1 / 400) * 2 / 4)
    assert mask_scale("cosine", 100.0, 0, 10) == pytest.approx(100.0)
    assert mask_scale("cosine", 100.0, 5, 10) == pytest.approx(1.0)  # 50 cos(pi) + 50 = 0 -> floored at 1
    assert mask_scale("cosine", 100.0, 2, 10) == pytest.approx(50 * math.cos(2 * math.pi * 0.2) + 50)
    assert mask_scale("constant", 100.0, 3, 10) == 100.0
    hat = hatify.hatify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 2,
                        example_inputs=(torch.randn(2, 4),), config=hatify.HATConfig(s_max=10.0, schedule="linear"))
    assert hat.mask_scale(0, 3) == pytest.approx(0.1) and hat.mask_scale(2, 3) == pytest.approx(10.0)


def test_compensated_gradient_matches_hand_formula():
    e = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], requires_grad=True)
    s, s_max = 7.0, 400.0
    out = compensated_sigmoid(e, s, s_max)
    out.sum().backward()
    sig = torch.sigmoid(s * e.detach())
    assert torch.equal(out, sig)  # the value is plain sigmoid(s e), bit for bit
    plain = s * sig * (1 - sig)
    num = torch.cosh(torch.clamp(s * e.detach(), -50, 50)) + 1
    den = torch.cosh(e.detach()) + 1
    torch.testing.assert_close(e.grad, plain * s_max / s * num / den)
    big = torch.tensor([10.0, -10.0], requires_grad=True)
    compensated_sigmoid(big, 400.0, 400.0).sum().backward()
    assert torch.isfinite(big.grad).all()  # cosh(s e) would overflow: its argument is clamped at 50
    e.grad = None
    compensated_sigmoid(e, 0.0, s_max).sum().backward()  # s = 0: the 1 / s cancels, the gradient stays finite
    torch.testing.assert_close(e.grad, 0.25 * s_max * 2 / (torch.cosh(e.detach()) + 1))


def test_regularizer_against_hand_computation():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
    x = torch.randn(2, 3)
    for form in ("network", "layer"):
        hat = hatify.hatify(model, 2, example_inputs=(x,), config=hatify.HATConfig(c=0.5, regularizer=form))
        with torch.no_grad():
            hat.cumulative.copy_(torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool))
        hat.train()
        hat.begin_task(1)
        hat(x, task_id=1, mask_scale=3.0)
        a = torch.sigmoid(3.0 * hat.masks.embedding(1).detach())
        free = torch.tensor([0, 1, 1, 0, 1, 0.0])
        if form == "network":
            expected = 0.5 * (a * free).sum() / free.sum()
        else:
            expected = 0.5 * ((a[:4] * free[:4]).sum() / free[:4].sum() + (a[4:] * free[4:]).sum() / free[4:].sum()) / 2
        torch.testing.assert_close(hat.regularization().detach(), expected)


class AlexNetLike(nn.Module):
    """The official HAT AlexNet-like network (Serra et al. 2018), shrunk: 3 convs, 2 Linear, per-task heads."""

    def __init__(self, classes=10) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 4), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 12, 2)
        self.drop1, self.drop2 = nn.Dropout(0.2), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(12 * 2 * 2, 32), nn.Linear(32, 32)
        self.last = nn.Linear(32, classes)

    def forward(self, x):
        h = self.drop1(F.max_pool2d(F.relu(self.c1(x)), 2))
        h = self.drop1(F.max_pool2d(F.relu(self.c2(h)), 2))
        h = self.drop2(F.max_pool2d(F.relu(self.c3(h)), 2))
        h = self.drop2(F.relu(self.fc1(h.view(h.size(0), -1))))
        h = self.drop2(F.relu(self.fc2(h)))
        return self.last(h)


def test_alexnet_fc1_conditioning_is_conv3_mask_repeated_channel_major():
    x = torch.randn(2, 3, 32, 32)
    hat = hatify.hatify(AlexNetLike(), num_tasks=2, example_inputs=(x,))
    c3, fc1 = hat.plan.layer("c3"), hat.plan.layer("fc1")
    assert hat.plan.layer("last").role == "head"
    expected = (c3.offset + torch.arange(12)).repeat_interleave(4)  # H*W = 2*2 positions per channel
    assert torch.equal(fc1.input_index, expected[None])
    assert fc1.input_map == "repeat_interleave(4)"
    # And the conditioning it produces: after task 0, fc1's frozen weight entries are exactly
    # (fc1 unit used) x (conv3 unit used, repeated over the 4 positions).
    opt = torch.optim.SGD(hat.parameters(), lr=0.1)
    train_tasks(hat, opt, x, 10, [0], steps=2)
    cum = hat.cumulative
    want = cum[fc1.offset:fc1.offset + 32][:, None] & cum[c3.offset:c3.offset + 12].repeat_interleave(4)[None, :]
    assert torch.equal(hat.net.fc1.parametrizations.weight[0].protect, want)


def test_training_in_eval_mode_with_frozen_batch_statistics():
    """A forward with a mask scale and gradients is a training forward in eval mode too (fine-tuning with frozen
    batch statistics): regularization() works, the running statistics stay put, and task 0 stays bit-identical."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    opt = torch.optim.SGD(hat.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    stats = {k: v.clone() for k, v in hat.state_dict().items() if "running" in k}
    hat.eval()
    hat.begin_task(0)
    with pytest.raises(hatify.HatifyError, match="mask_scale and gradients"):
        hat.regularization()
    with torch.no_grad():  # no gradients: not a training forward
        hat(x, task_id=0, mask_scale=10.0)
    with pytest.raises(hatify.HatifyError, match="mask_scale and gradients"):
        hat.regularization()
    for b in range(3):
        loss = F.cross_entropy(hat(x, task_id=0, mask_scale=hat.mask_scale(b, 3)), y)
        reg = hat.regularization()
        assert reg.requires_grad and float(reg.detach()) > 0
        opt.zero_grad()
        (loss + reg).backward()
        assert hat.masks.embedding(0).grad.abs().sum() > 0
        opt.step()
    hat.end_task()
    assert all(torch.equal(v, hat.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        before = hat(x, task_id=0)
    hat.begin_task(1)
    for b in range(3):
        loss = F.cross_entropy(hat(x, task_id=1, mask_scale=hat.mask_scale(b, 3)), y) + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hat.end_task()
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), before)
        assert not torch.equal(hat(x, task_id=1), before)


def test_write_back_follows_a_weight_given_new_storage():
    """Protect keeps the weight's integer views between reads; a weight given new storage through `.data` (another
    dtype's round trip, another layout) after a read is still written back bit for bit at the next read."""
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    after, hat = train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, [0])
    hat.train()
    hat.begin_task(1)
    hat(x, task_id=1, mask_scale=1.0)  # every Protect keeps its views of the current storage
    for raw, protect in _protected_parameters(hat):  # NaN over the frozen entries, in a new transposed storage
        junk = torch.empty(raw.shape[::-1]).permute(*reversed(range(raw.ndim)))
        raw.data = junk.copy_(raw.detach().masked_fill(protect.protect.expand(raw.shape), float("nan")))
    hat(x, task_id=1, mask_scale=1.0)
    hat.end_task()
    _assert_old_tasks_identical(after, hat, x)


@pytest.mark.parametrize("model_name", ["conv", "tokens", "timm_resnet18"])
def test_gates_taking_the_banks_pieces_give_the_same_gradients(model_name):
    """A training forward splits the soft masks into the layers' spans once, and each gate of one layer's units
    takes its piece: the mask-embedding and weight gradients are bitwise those of slicing the whole vector."""
    if model_name == "timm_resnet18":
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model, x, classes = timm.create_model("resnet18", num_classes=4), torch.randn(2, 3, 32, 32), 4
    else:
        model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    _, hat = train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, [0])
    hat.train()
    hat.begin_task(1)
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(5))
    bank, grads = hat.masks, []
    assert bank.spans and len(bank.spans) == len(hat.plan.masked_layers)
    masks, gates = bank(1, 2.0), [g for g in hat.modules() if isinstance(g, Gate) and g.span is not None]
    assert gates and all(g.piece(masks) is masks._hat_pieces[g.span] for g in gates)
    for spans in (bank.spans, ()):
        bank.spans = spans
        hat.zero_grad()
        out = hat(x, task_id=1, mask_scale=2.0)
        (F.cross_entropy(out, y) + hat.regularization()).backward()
        grads.append([p.grad.clone() for p in hat.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(*grads))
