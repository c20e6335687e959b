"""Per-task copies share storage until their task begins (`hatify.pending`): the converted model holds one head,
an optimizer built before `begin_task(t)` trains task t's copy, every copy starts from the converted model's
values, and nothing writes the shared storage through one copy: not a stray gradient, an optimizer step, a state
dict load, `.to()` or a deep copy."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import hatify
from hatify.layers import TaskIndexed


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 256)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


def _convert(num_tasks: int = 4):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    return model, hatify.hatify(model, num_tasks=num_tasks, example_inputs=(x[:2],)), x


def _heads(hat) -> TaskIndexed:
    return hat.net.head


def _held_bytes(module: nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def _train(hat, t: int, x: torch.Tensor, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    hat.train()
    hat.begin_task(t)
    for b in range(steps):
        loss = hat(x, task_id=t, mask_scale=hat.mask_scale(b, steps)).square().mean() + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hat.end_task()


def _pristine(model: Net, hat, tasks) -> bool:
    """Copies of `tasks` hold exactly the original head's values."""
    heads = _heads(hat).copies
    return all(torch.equal(heads[t].weight, model.head.weight) and torch.equal(heads[t].bias, model.head.bias)
               for t in tasks)


def test_the_converted_model_holds_one_head_and_a_task_gets_its_own_when_it_begins():
    model, hat, x = _convert()
    head = sum(p.numel() * p.element_size() for p in model.head.parameters())
    assert _held_bytes(hat) < _held_bytes(model) + head  # eagerly: three more heads
    assert _heads(hat).pending == {0, 1, 2, 3}
    hat.begin_task(0)
    assert _heads(hat).pending == {1, 2, 3}
    assert _heads(hat).copies[0].weight.data_ptr() != _heads(hat).copies[1].weight.data_ptr()
    assert _held_bytes(hat) < _held_bytes(model) + 2 * head


def test_an_optimizer_built_at_conversion_trains_each_task_and_the_others_start_from_the_original():
    model, hat, x = _convert()
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    _train(hat, 0, x, opt)
    assert not _pristine(model, hat, [0]) and _pristine(model, hat, [1, 2, 3])
    hat.eval()
    with torch.no_grad():
        first = hat(x, task_id=0)
    _train(hat, 1, x, opt)
    assert not _pristine(model, hat, [1]) and _pristine(model, hat, [2, 3])
    _train(hat, 3, x, opt)  # the last pending copy keeps the shared storage, the other pending one its values
    assert not _pristine(model, hat, [3]) and _pristine(model, hat, [2])
    hat.eval()
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), first)


def test_a_stray_gradient_or_optimizer_step_writes_only_its_own_copy():
    model, hat, x = _convert()
    opt = torch.optim.SGD(hat.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    hat.train()
    hat(x, task_id=2, mask_scale=1.0).square().mean().backward()  # before begin_task(2)
    opt.step()
    assert not _pristine(model, hat, [2]) and _pristine(model, hat, [0, 1, 3])
    opt.zero_grad(set_to_none=True)
    for p in _heads(hat).copies[1].parameters():  # a gradient set without a backward
        p.grad = torch.ones_like(p)
    opt.step()
    assert not _pristine(model, hat, [1]) and _pristine(model, hat, [0, 3])
    hat(x, task_id=3, mask_scale=1.0).square().mean().backward()
    with torch.no_grad():  # a manual update from a backward's gradient
        for p in _heads(hat).copies[3].parameters():
            p -= 0.1 * p.grad
    assert not _pristine(model, hat, [3]) and _pristine(model, hat, [0])


def test_state_dicts_save_and_load_keep_each_copy(tmp_path):
    model, hat, x = _convert()
    state = hat.state_dict()
    assert len({state[f"net.head.copies.{t}.weight"].data_ptr() for t in range(4)}) == 4
    _train(hat, 0, x, torch.optim.AdamW(hat.parameters(), lr=1e-2))
    hat.eval()
    with torch.no_grad():
        want = hat(x, task_id=0)
    raw = {k: v.contiguous() for k, v in hat.state_dict().items()}
    save_file(raw, str(tmp_path / "raw.safetensors"))  # safetensors refuses shared storage
    path = tmp_path / "model.hat"
    hatify.save(hat, path)
    loaded = hatify.load(path, model=Net())
    with torch.no_grad():
        assert torch.equal(loaded(x, task_id=0), want)
    assert _pristine(model, loaded, [1, 2, 3]) and _heads(loaded).pending == {1, 2, 3}
    assert len({_heads(loaded).copies[t].weight.data_ptr() for t in (1, 2, 3)}) == 1  # still one storage
    # A state whose pending copies differ (a task saved while it trained): each copy loads its own values.
    other = {k: v.clone() for k, v in loaded.state_dict().items()}
    other["net.head.copies.2.weight"] += 1
    _, fresh, _ = _convert()
    fresh.load_state_dict(other)
    assert torch.equal(_heads(fresh).copies[2].weight, model.head.weight + 1)
    assert _pristine(model, fresh, [1, 3]) and torch.equal(_heads(fresh).copies[0].weight,
                                                           _heads(loaded).copies[0].weight)
    partial = {k: v for k, v in other.items() if k != "net.head.copies.3.weight"}  # strict=False: 3 keeps its own
    _, fresh, _ = _convert()
    fresh.load_state_dict(partial, strict=False)
    assert torch.equal(_heads(fresh).copies[3].weight, model.head.weight)


@pytest.mark.parametrize("how", ["deepcopy", "to"])
def test_copies_and_conversions_keep_the_values_and_share_nothing_they_should_not(how):
    model, hat, x = _convert()
    other = copy.deepcopy(hat) if how == "deepcopy" else hat.to(torch.float64)
    if how == "to":
        pointers = {_heads(other).copies[t].weight.data_ptr() for t in range(4)}
        assert len(pointers) == 1 and _heads(other).copies[2].weight.dtype == torch.float64
        x = x.double()
        assert all(torch.equal(_heads(other).copies[t].weight, model.head.weight.double()) for t in range(4))
    _train(other, 0, x, torch.optim.AdamW(other.parameters(), lr=1e-2))
    assert all(torch.equal(_heads(other).copies[t].weight, model.head.weight.to(x.dtype)) for t in (1, 2, 3))
    if how == "deepcopy":
        assert _pristine(model, hat, [0, 1, 2, 3])


class TiedHeads(nn.Module):
    """Two heads that share one weight (read per task as parameters): no pending copy may share storage with
    anything outside its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.a = nn.Linear(32, 8)
        self.b = nn.Linear(32, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = F.relu(self.body(x))
        return self.a(h), self.b(h)


@pytest.mark.parametrize("model", [Net, TiedHeads])
def test_pending_copies_share_storage_with_nothing_outside_their_module(model):
    torch.manual_seed(0)
    original = model()
    hat = hatify.hatify(original, num_tasks=3, example_inputs=(torch.randn(2, 16),))
    modules = [m for m in hat.modules() if getattr(m, "pending", None)]
    assert modules
    for module in modules:
        inside = {id(p) for t in module.pending for _, _, p in module.task_parameters(t)}
        pending = {p.untyped_storage().data_ptr() for t in module.pending for _, _, p in module.task_parameters(t)}
        outside = {p.untyped_storage().data_ptr() for _, p in hat.named_parameters(remove_duplicate=False)
                   if id(p) not in inside}
        assert not pending & outside
    assert not any(p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                   for p in hat.parameters() for q in original.parameters())


def test_a_hand_write_into_a_waiting_copy_is_refused_at_the_next_begin_task():
    """A write by hand into a copy whose task has not begun reached the other waiting copies (one storage): the next
    materialisation says so instead of starting a task from values nobody set for it."""
    model, hat, x = _convert()
    with torch.no_grad():
        _heads(hat).copies[2].weight.mul_(2.0)
    with pytest.raises(hatify.HatifyError, match=r"task 2's copy .*written in place before begin_task\(2\)"):
        hat.begin_task(0)


def test_steps_loads_and_moves_are_no_hand_writes():
    model, hat, x = _convert()
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    _train(hat, 0, x, opt)
    hat.load_state_dict(hat.state_dict())
    hat.to(torch.float64).to(torch.float32)
    _train(hat, 1, x, opt)
    assert _pristine(model, hat, [2, 3])
    _train(hat, 2, x, opt)  # task 1's steps after the move did not count as writes into the waiting copies
    assert _pristine(model, hat, [3])


def test_a_loaded_model_trains_on_without_false_alarms(tmp_path):
    model, hat, x = _convert()
    opt = torch.optim.SGD(hat.parameters(), lr=0.1, momentum=0.9)
    _train(hat, 0, x, opt)
    hatify.save(hat, tmp_path / "m.hat")
    loaded = hatify.load(tmp_path / "m.hat", model=Net())
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    _train(loaded, 1, x, opt)
    _train(loaded, 2, x, opt)
    assert _pristine(model, loaded, [3])


def test_a_module_that_renormalises_itself_writes_only_its_own_copy():
    """`Embedding(max_norm=...)` renormalises the rows it reads in place, in every forward: the copy that runs gets
    storage of its own first, so the other tasks' copies keep their rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, max_norm=0.5), nn.Flatten(), nn.Linear(24, 4))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # every row above max_norm
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(torch.tensor([[0, 1, 2], [3, 4, 5]]),))
    copies = [m for m in hat.modules() if isinstance(m, TaskIndexed)][0].copies
    waiting = copies[1].weight.detach().clone()
    hat.eval()
    with torch.no_grad():
        hat(torch.tensor([[10, 11, 12], [13, 14, 15]]), task_id=0)  # rows 10-15 renormalised in task 0's copy
    assert not torch.equal(copies[0].weight, waiting)
    assert torch.equal(copies[1].weight, waiting) and torch.equal(copies[2].weight, waiting)
    hat.begin_task(1)  # no hand write was seen
