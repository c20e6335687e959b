"""FSDP2 (`torch.distributed.fsdp.fully_shard`): what the task lifecycle needs on a sharded model.

`fully_shard` turns every parameter into a DTensor that holds one shard per rank, and swaps in an unsharded plain
parameter (all-gathered) for each forward and backward. `Protect` sees that unsharded parameter, so the forward
write-back and the gradient masking work as in eager mode. What this module adds:
- `end_task()` reads full values (`full_tensor()`) to compute the frozen values; the `frozen`/`protect` buffers
  stay plain, replicated tensors (every rank computes the same ones from the same gathered values);
- every optimizer step writes the frozen bits back into each rank's own shard too, so the values FSDP gathers
  again for the backward (and a `state_dict()`) are the protected ones, not the ones the step moved;
- a finished task's own tensors cannot leave FSDP's management (it would put them back on the module at the
  next all-gather): they stay sharded parameters with `requires_grad=False` and no gradient, which no optimizer
  moves, instead of becoming buffers;
- FSDP refills an unsharded parameter's storage at each all-gather without bumping its version, so Protect's
  eval-mode shortcut (skip the write-back while nothing was written) cannot see the refill: every forward of an
  FSDP-managed model forgets the last write-back;
- the old `FullyShardedDataParallel` wrapper (FSDP1) flattens parameters: it is refused with a `HatifyError`.
"""
from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import HatifyError
from .layers import _BITS, _CLAMPED, Protect


def _loaded(module: str, name: str):
    """`module.name` if that module was imported, else None. A DTensor or an FSDP2 module exists only once the
    user imported torch.distributed's modules, so hatify never pays for importing them (0.5 s) itself."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None)

# Sharded raw parameters of protected weights, by id; the parameter carries `_hat_protect` (a weakref to its
# Protect) and `_hat_shard_selectors` (the local pieces of Protect's selectors).
_SHARDED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def is_dtensor(tensor) -> bool:
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: every rank must call it)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def refuse_fsdp1(module: nn.Module, what: str) -> None:
    """The FullyShardedDataParallel wrapper replaces parameters by views of a flat shard: nothing can read them."""
    if any(getattr(p, "_fsdp_flattened", False) for p in module.parameters()):
        raise HatifyError(f"{what} cannot run on a model wrapped by FullyShardedDataParallel (FSDP1): it flattens "
                          "the parameters into shards hatify cannot read. Shard with "
                          "torch.distributed.fsdp.fully_shard(hat) (FSDP2) or wrap with DistributedDataParallel")


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 module in its sharded state (its parameters are DTensors again). A root module may keep
    its unsharded parameters registered after a forward without gradients."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return
    for m in module.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def refuse_sharded(module: nn.Module, what: str) -> None:
    refuse_fsdp1(module, what)
    reshard(module)
    if is_sharded(module):
        raise HatifyError(f"{what} is not supported on a model sharded with fully_shard (FSDP2). Save it (every rank "
                          "calls hatify.save(hat, path); rank 0 writes the file), hatify.load(path) an unsharded "
                          f"copy, call {what} there, then fully_shard the copy again and make a new optimizer")


def local_piece(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `value` (a full tensor, the same on every rank), laid out as the DTensor `like`.
    No communication: every rank cuts its own piece."""
    from torch.distributed.tensor import distribute_tensor

    value = value.expand(like.shape).contiguous()
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def adopt(hat: nn.Module) -> None:
    """Register every sharded raw weight that a Protect guards, and write the frozen bits into its shard."""
    if _loaded("torch.distributed.tensor", "DTensor") is None:
        return
    for module in hat.modules():
        chains = getattr(module, "parametrizations", None)
        if chains is None:
            continue
        for chain in chains.values():
            raw, protect = chain.original, chain[0]
            if not (is_dtensor(raw) and isinstance(protect, Protect)):
                continue
            raw._hat_protect = weakref.ref(protect)
            _SHARDED[id(raw)] = raw
            restore_shard(raw)


@torch.no_grad()
def restore_shard(raw: torch.Tensor) -> None:
    """Write the frozen values into this rank's shard of a protected weight (one integer pass, as `Protect`)."""
    protect = raw._hat_protect()
    if protect is None or not protect.active:
        return
    local = raw.to_local()
    frozen, mask = protect._buffers["frozen"], protect._buffers["protect"]
    key = (raw.dtype, frozen._version, mask._version, id(frozen), id(mask), tuple(local.shape))
    cached = getattr(raw, "_hat_shard_selectors", None)
    if cached is None or cached[0] != key:
        bits = _BITS.get(raw.element_size())
        dense = protect.dense_frozen(raw.dtype)  # frozen values where protected, 0 elsewhere
        if bits is None or raw.is_complex():
            pieces = (None, local_piece(mask, raw), local_piece(dense, raw))
        else:
            pieces = (bits, local_piece((~mask).to(bits), raw), local_piece(dense.view(bits), raw))
        cached = raw._hat_shard_selectors = (key, *pieces)
    _, bits, first, second = cached
    if bits is None:
        local.copy_(torch.where(first, second, local))
    else:
        data = local.view(bits)
        torch.addcmul(second, data, first, out=data)


def _restore_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step moves only parameters with a gradient (and restoring one it did not move changes nothing)."""
    if not _SHARDED:
        return
    for p in list(_SHARDED.values()):
        if p.grad is not None:
            restore_shard(p)


register_optimizer_step_post_hook(_restore_after_step)


def forget_write_backs(hat: nn.Module) -> None:
    """Make every Protect write the frozen bits back at the next read."""
    protects = hat.__dict__.get("_hat_protects")
    if protects is None:
        protects = hat.__dict__["_hat_protects"] = [m for m in hat.modules() if isinstance(m, Protect)]
    for protect in protects:
        protect.forget_write_back()


def keep_sharded_parameters(root: nn.Module) -> None:
    """`freeze_parameter` turned a finished task's parameters into buffers; FSDP would register its sharded
    parameter again at the next all-gather. Sharded ones go back as parameters that no optimizer moves:
    `requires_grad=False` and no gradient (optimizers skip a parameter without a gradient)."""
    for module in root.modules():
        orphans = module.__dict__.get("_hat_orphans")
        if not orphans:
            continue
        for name, param in list(orphans.items()):
            if not (is_dtensor(param) and name in module._buffers):
                continue
            del module._buffers[name]
            del orphans[name]
            param.requires_grad_(False)
            param.grad = None
            _CLAMPED.pop(id(param), None)
            module._parameters[name] = param
            if hasattr(module, "_init_flat_weights"):
                module._init_flat_weights()
