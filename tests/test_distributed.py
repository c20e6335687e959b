"""DistributedDataParallel: two real gloo processes on 127.0.0.1 train tasks one after another."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import hatify


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def _worker(rank: int, world: int, port: int, result_dir: str, broadcast_buffers: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    torch.set_num_threads(1)
    hat = hatify.hatify(_model(), num_tasks=3, example_inputs=(torch.zeros(2, 3, 6, 6),))
    # Per-task heads and norms: other tasks' copies get no gradient.
    ddp = DDP(hat, find_unused_parameters=True, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own shard of data
    probe = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    after, protected = {}, []
    for t in range(3):
        ddp.train()
        hat.begin_task(t)
        for b in range(5):
            x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = F.cross_entropy(ddp(x, task_id=t, mask_scale=hat.mask_scale(b, 5)), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            for raw, mask in protected:  # the all-reduced gradient keeps HAT's conditioning
                assert torch.equal(raw.grad[mask], torch.zeros_like(raw.grad[mask])), f"rank {rank}"
            opt.step()
        hat.end_task()
        protected = [(owner.parametrizations[a].original, owner.parametrizations[a][0].protect.expand_as(
            owner.parametrizations[a].original)) for owner in hat.modules() if hasattr(owner, "parametrizations")
            for a in owner.parametrizations]
        assert all(bool(mask.any()) for _, mask in protected)
        hat.eval()
        with torch.no_grad():
            after[t] = hat(probe, task_id=t)
            for u in range(t):
                assert torch.equal(hat(probe, task_id=u), after[u]), f"rank {rank}: task {u} changed"
    state = {k: v.clone() for k, v in hat.state_dict().items()}
    torch.save(state, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_two_gloo_processes_keep_old_tasks_and_agree(tmp_path, broadcast_buffers):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), broadcast_buffers), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"replicas disagree on {key}"


def _fsdp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """fully_shard (FSDP2) on every submodule with parameters and on the root: tasks one after another."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    torch.set_num_threads(1)
    hat = hatify.hatify(_model(), num_tasks=3, example_inputs=(torch.zeros(2, 3, 6, 6),))
    for child in hat.net.children():  # nested units reshard after each forward and gather again for backward
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(hat)
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own shard of data
    probe = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    chains = [m.parametrizations[a] for m in hat.modules() if hasattr(m, "parametrizations") for a in m.parametrizations]
    after = {}
    for t in range(3):
        hat.train()
        hat.begin_task(t)
        for b in range(4):
            x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = F.cross_entropy(hat(x, task_id=t, mask_scale=hat.mask_scale(b, 4)), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            for chain in chains:  # the reduce-scattered gradient shard keeps HAT's conditioning
                raw, protect = chain.original, chain[0]
                if protect.protect.any():
                    grad, mask = raw.grad.full_tensor(), protect.protect.expand_as(raw)
                    assert torch.equal(grad[mask], torch.zeros_like(grad[mask])), f"rank {rank}"
            if b == 0:  # the optimizer holds the sharded embedding: it is the one clamped after the step
                with torch.no_grad():
                    hat.masks.embedding(t).to_local().add_(50.0)
            opt.step()
            assert float(hat.masks.embedding(t).full_tensor().abs().max()) <= hat.masks.clamp
            for chain in chains:  # the step moved protected entries of the shards; they hold the frozen values again
                raw, protect = chain.original, chain[0]
                if protect.protect.any():
                    full = raw.full_tensor()
                    frozen = protect.dense_frozen(full.dtype)
                    assert torch.equal(full, torch.where(protect.protect, frozen, full)), f"rank {rank}"
        hat.end_task()
        assert all(bool(chain[0].protect.any()) for chain in chains)
        hat.eval()
        with torch.no_grad():
            after[t] = hat(probe, task_id=t)
            for u in range(t + 1):
                for _ in range(2):  # the second forward gathers again into the same storage
                    assert torch.equal(hat(probe, task_id=u), after[u]), f"rank {rank}: task {u} changed after {t}"
    assert not any(p.requires_grad for p in hat.masks.parameters())  # finished embeddings: sharded, frozen
    with torch.no_grad():  # shards written outside a step (a loaded file's raw values): gathered anew each time
        for chain in chains:
            chain.original.to_local().add_(1.0)
        for u in range(3):
            for _ in range(2):
                assert torch.equal(hat(probe, task_id=u), after[u]), f"rank {rank}: task {u} changed by raw writes"
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in hat.state_dict().items()}
    torch.save({"state": state, "after": after}, os.path.join(result_dir, f"rank{rank}.pt"))
    with pytest.raises(hatify.HatifyError, match="fully_shard"):
        hat.forget_task(0)
    path = os.path.join(result_dir, "fsdp.hat")
    hatify.save(hat, path)  # collective: every rank gathers, rank 0 writes
    copy = hatify.load(path, model=_model())
    with torch.no_grad():
        for u in range(3):
            assert torch.equal(copy(probe, task_id=u), after[u]), f"rank {rank}: saved copy differs on task {u}"
    old = FullyShardedDataParallel(hatify.hatify(_model(), num_tasks=3, example_inputs=(torch.zeros(2, 3, 6, 6),)),
                                   use_orig_params=True, device_id=torch.device("cpu"))
    with pytest.raises(hatify.HatifyError, match="FSDP1"):
        old.module.begin_task(0)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_fully_shard_two_gloo_processes_keep_old_tasks(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), f"replicas disagree on {key}"
    for u in range(3):
        assert torch.equal(a["after"][u], b["after"][u]), f"ranks compute task {u} differently"
