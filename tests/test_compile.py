"""torch.compile and float16 with a GradScaler keep the guarantee."""
import torch
import torch.nn.functional as F
from torch import nn

import hatify


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_compiled_training_matches_eager_and_keeps_old_tasks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    eager = hatify.hatify(_mlp(), num_tasks=2, example_inputs=(x[:2],))
    compiled_hat = hatify.hatify(_mlp(), num_tasks=2, example_inputs=(x[:2],))
    compiled = torch.compile(compiled_hat)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_hat)]
    after = {}
    for t in range(2):
        for hat, fwd, opt in ((eager, eager, opts[0]), (compiled_hat, compiled, opts[1])):
            hat.train()
            hat.begin_task(t)
            for b in range(4):
                loss = F.cross_entropy(fwd(x, task_id=t, mask_scale=hat.mask_scale(b, 4)), y) + hat.regularization()
                opt.zero_grad()
                loss.backward()
                opt.step()
            hat.end_task()
            hat.eval()
        with torch.no_grad():
            after[t] = compiled(x, task_id=t)
            torch.testing.assert_close(after[t], eager(x, task_id=t), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(compiled(x, task_id=0), after[0])
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per task and mode, no breaks


def test_float16_autocast_with_grad_scaler_keeps_old_tasks():
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    hat = hatify.hatify(_mlp(), num_tasks=3, example_inputs=(x[:2],))
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu")
    after = {}
    for t in range(3):
        hat.train()
        hat.begin_task(t)
        for b in range(5):
            with torch.autocast("cpu", dtype=torch.float16):
                out = hat(x, task_id=t, mask_scale=hat.mask_scale(b, 5))
                loss = F.cross_entropy(out.float(), y) + hat.regularization()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        hat.end_task()
        hat.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            after[t] = hat(x, task_id=t)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        for t, expected in after.items():
            assert torch.equal(hat(x, task_id=t), expected)


def test_switching_task_and_scale_does_not_recompile_once_each_task_was_seen():
    """Each task id compiles once (per-task modules are picked by a Python int); after that, switching task
    ids and mask scales reuses the compiled graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(8, 12)
    hat = hatify.hatify(_mlp(), num_tasks=3, example_inputs=(x[:2],)).eval()
    compiled = torch.compile(hat)
    with torch.no_grad():
        for t in range(3):  # warm-up: first visit of every task id, binary and two soft scales
            for s in (None, 1.0, 2.0):
                compiled(x, task_id=t, mask_scale=s)
        warm = counters["stats"]["unique_graphs"]
        for t in (2, 0, 1, 0, 2):
            for s in (None, 0.5, 3.0, 400.0):
                compiled(x, task_id=t, mask_scale=s)
    assert counters["stats"]["unique_graphs"] == warm


def test_mask_path_and_compensation_stay_float32_under_bfloat16_autocast():
    """The soft masks, the regulariser and the compensated embedding gradient are computed in float32 under
    autocast: the same bits as without autocast."""
    x = torch.randn(8, 12)
    hat = hatify.hatify(_mlp(), num_tasks=2, example_inputs=(x[:2],))
    hat.train()
    hat.begin_task(0)
    grads = []
    for enabled in (False, True):
        hat.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            hat(x, task_id=0, mask_scale=37.0)
            reg = hat.regularization()
        assert hat.masks.last.dtype == torch.float32 and reg.dtype == torch.float32
        reg.backward()
        grads.append(hat.masks.embedding(0).grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_per_task_parameters_compile_once_per_task_without_graph_breaks():
    from torch._dynamo.utils import counters

    class Loose(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 12))
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x + self.pos)

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(8, 12)
    hat = hatify.hatify(Loose(), num_tasks=3, example_inputs=(x[:2],)).eval()
    compiled = torch.compile(hat)
    with torch.no_grad():
        for t in (0, 1, 2, 0, 2, 1):
            compiled(x, task_id=t)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3
