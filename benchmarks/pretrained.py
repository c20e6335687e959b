"""Pretrained backbones: training memory and step time of full HAT, a frozen backbone with HAT on the last block, and
LoRA adapters with HAT, each against the same plain model trained the same way (same parameters frozen).

    .venv/bin/python benchmarks/pretrained.py [--rounds 8] [--threads 1] [--models vit_tiny_patch16_224,...]

Training memory = parameters + buffers + gradients + AdamW state (two tensors per trainable parameter), counted
after task 0 ended and a few task-1 steps (protection active), plus Protect's run-time selectors. Step time: one
AdamW step on task 1 (loss + `hat.regularization()`), plain and HAT interleaved in one process, medians of process
CPU time. "frozen copies of frozen tensors" counts bytes hatify holds for a tensor that cannot change (a Protect
buffer or a per-task copy of a parameter with requires_grad=False): it must be 0. "beyond protection" is the memory
HAT adds apart from protecting the trainable weights of its layers (their frozen copies, protect masks and run-time
selectors: the adapters' or last block's own overhead, proportional to them): mask bank, gate index maps, per-task
heads, the embeddings' gradients and AdamW state.
Writes benchmarks/results/pretrained.json and pretrained.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hatify  # noqa: E402
from hatify.layers import Protect  # noqa: E402
from hatify.rewrite import KEPT  # noqa: E402
from overhead import PROTECTION, environment, measure, memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TASKS = 5
SHAPE = (16, 3, 64, 64)
VIT_KWARGS = {"num_classes": 10, "img_size": 64}
MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224")


def full(name: str) -> tuple[nn.Module, hatify.HATConfig]:
    return timm.create_model(name, **VIT_KWARGS), hatify.HATConfig()


def frozen_backbone(name: str) -> tuple[nn.Module, hatify.HATConfig]:
    """Everything but the last block, the final norm and the head frozen (requires_grad=False)."""
    model = timm.create_model(name, **VIT_KWARGS)
    last = len(model.blocks) - 1
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith((f"blocks.{last}.", "norm.", "head.")))
    return model, hatify.HATConfig()


def lora(name: str) -> tuple[nn.Module, hatify.HATConfig]:
    """PEFT LoRA (r=8) on every qkv and fc1 of a frozen backbone; the head trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "fc1"])
    model = get_peft_model(timm.create_model(name, **VIT_KWARGS), config).get_base_model()
    model.head.requires_grad_(True)
    return model, hatify.HATConfig()


CASES: dict[str, Callable[[str], tuple[nn.Module, hatify.HATConfig]]] = {
    "full HAT": full, "frozen backbone + HAT on the last block": frozen_backbone, "LoRA + HAT": lora}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(gradients, optimizer state) bytes."""
    grads = nbytes(p.grad for p in model.parameters())
    state = nbytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim)
    return grads, state


def frozen_copies(plain: nn.Module, hat) -> int:
    """Bytes hatify holds for tensors that cannot change: Protect buffers of frozen parameters, and per-task copies
    of parameters frozen at conversion (a BatchNorm's affine copied along with its running statistics counts)."""
    total = sum(nbytes([chain[0].frozen, chain[0].protect]) for module in hat.modules()
                for chain in getattr(module, "parametrizations", {}).values()
                if isinstance(chain[0], Protect) and not chain.original.requires_grad)
    copied = [m.name for m in hat.plan.modules if m.policy not in KEPT] + [
        p.name for p in hat.plan.params if p.policy not in KEPT]
    for name in hat.plan.frozen:
        if any(name == c or name.startswith(c + ".") for c in copied):
            total += nbytes([plain.get_parameter(name)]) * hat.num_tasks
    return total


def run_case(model_name: str, build: Callable, rounds: int) -> dict:
    torch.manual_seed(0)
    model, config = build(model_name)
    x, y = torch.randn(SHAPE), torch.randint(0, 10, (SHAPE[0],))
    hat = hatify.hatify(model, NUM_TASKS, (x[:2],), config=config)
    plain = model.train()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    hat_opt = torch.optim.AdamW(hat.parameters(), lr=1e-3, weight_decay=0.01)
    batch = {"b": 0}

    def plain_step() -> None:
        loss = F.cross_entropy(plain(x), y)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    def hat_step(task: int = 1) -> None:
        b = batch["b"] = (batch["b"] + 1) % 50
        loss = F.cross_entropy(hat(x, task_id=task, mask_scale=hat.mask_scale(b, 50)), y) + hat.regularization()
        hat_opt.zero_grad()
        loss.backward()
        hat_opt.step()

    hat.train()
    hat.begin_task(0)
    for _ in range(2):
        hat_step(0)
    hat.end_task()
    hat.train()
    hat.begin_task(1)
    times = measure({"plain": plain_step, "hat": hat_step}, rounds)
    mem = memory(plain, hat)
    mb = 1 / 2**20
    plain_grads, plain_state = training_bytes(plain, plain_opt)
    hat_grads, hat_state = training_bytes(hat, hat_opt)
    plain_params = nbytes(list(plain.parameters()) + list(plain.buffers()))
    plain_train = plain_params + plain_grads + plain_state
    hat_train = mem["hat_mb"] / mb + mem["runtime_cache_mb"] / mb + hat_grads + hat_state
    trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    return {
        "parameters": sum(p.numel() for p in plain.parameters()), "trainable": trainable,
        "plain_train_mb": plain_train * mb, "hat_train_mb": hat_train * mb,
        "added_mb": (hat_train - plain_train) * mb,
        "added_share_of_plain_params": (hat_train - plain_train) / plain_params,
        "ratio": hat_train / plain_train,
        "beyond_protection_share": (hat_train - plain_train - (mem["by_kind_mb"][PROTECTION] + mem["runtime_cache_mb"])
                                    / mb) / plain_params,
        "frozen_copies_of_frozen_tensors_mb": frozen_copies(plain, hat) * mb,
        "by_kind_mb": mem["by_kind_mb"], "runtime_cache_mb": mem["runtime_cache_mb"],
        "grads_mb": {"plain": plain_grads * mb, "hat": hat_grads * mb},
        "adamw_state_mb": {"plain": plain_state * mb, "hat": hat_state * mb},
        "step_cpu_ms": {"plain": times["plain"]["cpu_ms"], "hat": times["hat"]["cpu_ms"]},
        "step_ratio": times["hat"]["cpu_ms"] / times["plain"]["cpu_ms"],
        "masked_layers": len(hat.plan.masked_layers), "frozen_kept": len(hat.report.summary["frozen"]),
    }


def render(results: dict) -> str:
    md = ["# Pretrained backbones: full HAT vs frozen backbone vs LoRA", "",
          f"`{results['command']}`; timm ViTs at {SHAPE[2]}x{SHAPE[3]}, batch {SHAPE[0]}, "
          f"{NUM_TASKS} tasks, AdamW, task 1 after task 0 ended; one torch thread.", "",
          "| case | params | trainable | plain train MB | HAT train MB | added MB | added / plain params | "
          "beyond protection / plain params | ratio | frozen copies of frozen tensors MB | step ms plain | "
          "step ms HAT | step ratio |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["cases"].items():
        md.append(f"| {name} | {r['parameters']:,} | {r['trainable']:,} | {r['plain_train_mb']:.2f} | "
                  f"{r['hat_train_mb']:.2f} | {r['added_mb']:.2f} | {100 * r['added_share_of_plain_params']:.1f}% | "
                  f"{100 * r['beyond_protection_share']:.1f}% | {r['ratio']:.2f} | "
                  f"{r['frozen_copies_of_frozen_tensors_mb']:.2f} | {r['step_cpu_ms']['plain']:.1f} | "
                  f"{r['step_cpu_ms']['hat']:.1f} | {r['step_ratio']:.2f} |")
    kinds = list(next(iter(results["cases"].values()))["by_kind_mb"])
    md += ["", "## HAT model parameters and buffers by kind, and Protect's run-time selectors (MB)", "",
           "| case | " + " | ".join(kinds) + " | selectors |", "|---|" + "---:|" * (len(kinds) + 1)]
    for name, r in results["cases"].items():
        md.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["by_kind_mb"].values())
                  + f" | {r['runtime_cache_mb']:.2f} |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed training steps per variant")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm ViT names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"command": "python benchmarks/pretrained.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": environment(args.threads), "cases": {}}
    for model_name in args.models.split(","):
        for name, build in CASES.items():
            print(f"{model_name}: {name} ...", flush=True)
            results["cases"][f"{model_name.split('_patch')[0]}: {name}"] = run_case(model_name, build, args.rounds)
    markdown = render(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrained.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "pretrained.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
