"""forget_task, extract and mixed-task batches on trained models."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import hatify
from test_training import OPTIMIZERS, _assert_old_tasks_identical, _data, train_tasks


@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_forget_task_keeps_others_and_frees_units(model_name):
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adamw"](hat.parameters())
    after, hat = train_tasks(hat, opt, x, classes, range(3))
    free_before = sum(v["free"] for v in hat.capacity().values())
    hat.forget_task(1)
    assert hat.trained_tasks == [0, 2]
    assert sum(v["free"] for v in hat.capacity().values()) > free_before
    del after[1]
    _assert_old_tasks_identical(after, hat, x)
    more, hat = train_tasks(hat, opt, x, classes, [1])  # the same optimizer retrains task 1
    _assert_old_tasks_identical({**after, **more}, hat, x)
    with pytest.raises(hatify.HatifyError):
        hat.forget_task(5)


@pytest.mark.parametrize("model_name", ["conv", "tokens"])
def test_extract_equals_hat_and_runs_without_hatify(model_name, tmp_path):
    model, x, classes = _data(model_name)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adam"](hat.parameters())
    _, hat = train_tasks(hat, opt, x, classes, range(2))
    hat.eval()
    for t in range(2):
        plain = hat.extract(t)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), hat(x, task_id=t), atol=1e-5, rtol=1e-5)
    path = tmp_path / "task1.pt"
    torch.save({"model": hat.extract(1), "x": x, "y": hat(x, task_id=1).detach()}, path)
    code = (f"import sys, torch; d = torch.load({str(path)!r}, weights_only=False); "
            "torch.testing.assert_close(d['model'](d['x']), d['y'], atol=1e-5, rtol=1e-5); "
            "assert not any(m.startswith('hatify') for m in sys.modules), 'hatify was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_mixed_task_batch_equals_one_task_at_a_time():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    _, hat = train_tasks(hat, OPTIMIZERS["sgd"](hat.parameters()), x, classes, range(3))
    ids = torch.arange(x.shape[0]) % 3
    hat.eval()
    with torch.no_grad():
        mixed = hat(x, task_id=ids)
        for t in range(3):
            assert torch.equal(mixed[ids == t], hat(x[ids == t], task_id=t))


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
def test_extract_pruned_removes_unused_units_and_matches(arch):
    from test_training import AlexNetLike

    if arch == "alexnet":
        model, x = AlexNetLike(classes=4), torch.randn(8, 3, 32, 32)
    else:
        import timm
        model, x = timm.create_model("resnet18", num_classes=4), torch.randn(8, 3, 32, 32)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    _, hat = train_tasks(hat, OPTIMIZERS["adam"](hat.parameters()), x, 4, range(2), steps=4)
    hat.eval()
    for t in range(2):
        pruned, plain = hat.extract(t, prune=True), hat.extract(t)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), hat(x, task_id=t), atol=1e-5, rtol=1e-5)
        summary = pruned.prune_summary
        masked = [layer for layer in hat.plan.masked_layers]
        used = {layer.name: int((hat.masks.embedding(t)[layer.offset:layer.offset + layer.units] > 0).sum())
                for layer in masked}
        assert all(summary[name]["kept"] >= used[name] for name in used)
        assert any(summary[name]["pruned"] and summary[name]["kept"] < summary[name]["units"] for name in used)
        if arch == "alexnet":  # a plain chain: every masked layer shrinks to exactly the units task t uses
            assert all(summary[name]["kept"] == max(1, used[name]) for name in used)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in plain.parameters())


def test_capacity_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from hatify.capacity import capacity_table, plot_capacity

    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x[:2],))
    _, hat = train_tasks(hat, OPTIMIZERS["adam"](hat.parameters()), x, classes, range(2))
    cap = hat.capacity()
    for name, row in cap.items():
        layer = hat.plan.layer(name)
        used_any = (hat.masks.embedding(0)[layer.offset:layer.offset + layer.units] > 0) | \
                   (hat.masks.embedding(1)[layer.offset:layer.offset + layer.units] > 0)
        assert row["free"] == layer.units - int(used_any.sum())
    console = Console(record=True, width=120)
    console.print(capacity_table(cap))
    assert "task 1" in console.export_text()
    png = plot_capacity(cap, tmp_path / "capacity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_begin_task_while_a_task_is_open_is_refused_and_drops_nothing():
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adamw"](hat.parameters())
    after, hat = train_tasks(hat, opt, x, classes, [0])
    hat.train()
    hat.begin_task(1)
    hat.begin_task(1)  # the open task again: nothing to drop
    with pytest.raises(hatify.HatifyError, match=r"task 1 is still open; call hat.end_task\(\)"):
        hat.begin_task(2)
    assert hat.current_task == 1 and hat.trained_tasks == [0]
    hat(x, task_id=1, mask_scale=hat.mask_scale(0, 1)).sum().backward()
    hat.end_task()
    assert hat.trained_tasks == [0, 1]
    _assert_old_tasks_identical(after, hat, x)


def test_task_ids_as_lists_and_numpy_integers_and_checked_mask_scales():
    np = pytest.importorskip("numpy")
    model, x, classes = _data("conv")
    hat = hatify.hatify(model, num_tasks=3, example_inputs=(x[:2],)).eval()
    ids = [i % 3 for i in range(x.shape[0])]
    with torch.no_grad():
        expected = hat(x, task_id=torch.tensor(ids))
        assert torch.equal(hat(x, task_id=ids), expected)
        assert torch.equal(hat(x, task_id=np.array(ids)), expected)
        assert torch.equal(hat(x, task_id=np.int64(2)), hat(x, task_id=2))
    with pytest.raises(hatify.HatifyError, match="must hold integers"):
        hat(x, task_id=[0.5] * x.shape[0])
    with pytest.raises(hatify.HatifyError, match="expected one task id"):
        hat.begin_task([0, 1])
    hat.train()
    hat.begin_task(np.int64(0))
    assert hat.current_task == 0 and type(hat.current_task) is int
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(hatify.HatifyError, match="finite number > 0"):
            hat(x, task_id=0, mask_scale=bad)
    assert hat.mask_scale(2, 3) == hat.plan.config.s_max
    for b, count in ((3, 3), (5, 3), (-1, 3), (0, 0)):
        with pytest.raises(hatify.HatifyError, match="batch index must be in"):
            hat.mask_scale(b, count)


class _PermutedLinearIntoBatchNorm(nn.Module):
    """A Linear on the last axis (behind a permute) feeding a BatchNorm2d that normalises axis 1, then F.glu."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm2d(8), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.glu(self.fc2(self.bn(self.fc(x.permute(0, 2, 3, 1)))), dim=-1)


def test_extract_pruned_leaves_a_norm_on_another_axis_whole():
    x = torch.randn(4, 4, 8, 6)
    hat = hatify.hatify(_PermutedLinearIntoBatchNorm(), num_tasks=2, example_inputs=(x[:2],))
    opt = OPTIMIZERS["adam"](hat.parameters())
    gen = torch.Generator().manual_seed(0)
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(4):
            loss = (hat(x, task_id=t, mask_scale=hat.mask_scale(b, 4)) - torch.randn(4, 8, 6, 2, generator=gen))
            (loss.square().mean() + hat.regularization()).backward()
            opt.step()
            opt.zero_grad()
        hat.end_task()
    hat.eval()
    for t in range(2):
        pruned = hat.extract(t, prune=True)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), hat(x, task_id=t), atol=1e-5, rtol=1e-5)
        assert pruned.bn.num_features == 8 and not pruned.prune_summary["fc"]["pruned"]


def test_load_into_an_architecture_that_converts_differently_says_what_to_do(tmp_path):
    """A file whose tensors or mask units do not fit the rebuilt model (another architecture, or one an earlier
    hatify converted differently) is refused with both ways out: the original architecture, or a new conversion."""
    x = torch.randn(4, 6)
    saved = hatify.hatify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 2, (x,))
    hatify.save(saved, tmp_path / "m.hat")
    wider = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))     # other mask units
    with pytest.raises(hatify.HatifyError, match="mask units.*original architecture.*convert the original weights"):
        hatify.load(tmp_path / "m.hat", model=wider)
    with pytest.raises(hatify.HatifyError, match="do not fit.*convert the original weights again"):
        hatify.load(tmp_path / "m.hat", model=nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)))
