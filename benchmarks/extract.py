"""Issue 6 benchmark: a trained split-task timm resnet18 (small input) as the original model, the HAT model for
one task, `extract(t)` and `extract(t, prune=True)`: parameters, FLOPs and inference time, side by side.

    .venv/bin/python benchmarks/extract.py [--tasks 5] [--epochs 4] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from torch.utils.flop_counter import FlopCounterMode

import hatify

RESULTS = Path(__file__).parent / "results"


def split_digits_images(tasks: int, seed: int = 0):
    """scikit-learn digits as 3x32x32 images (nearest upsampling), 2 classes per task, 70/30 split."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    out = []
    for t in range(tasks):
        idx = ((y == 2 * t) | (y == 2 * t + 1)).nonzero().squeeze(1)
        cut = int(0.7 * len(idx))
        out.append(((x[idx[:cut]], y[idx[:cut]] - 2 * t), (x[idx[cut:]], y[idx[cut:]] - 2 * t)))
    return out


def train(hat, tasks, epochs: int) -> list[float]:
    opt = torch.optim.AdamW(hat.parameters(), lr=2e-3, weight_decay=0.01)
    accs = []
    for t, ((xtr, ytr), (xte, yte)) in enumerate(tasks):
        hat.train()
        hat.begin_task(t)
        batches = list(zip(xtr.split(32), ytr.split(32)))
        for _ in range(epochs):
            for b, (xb, yb) in enumerate(batches):
                loss = F.cross_entropy(hat(xb, task_id=t, mask_scale=hat.mask_scale(b, len(batches))), yb)
                loss = loss + hat.regularization()
                opt.zero_grad()
                loss.backward()
                opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad():
            accs.append(float((hat(xte, task_id=t).argmax(1) == yte).float().mean()))
    return accs


def flops(fn, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(x)
    return counter.get_total_flops()


def timed(fns: dict, x, repeats: int) -> dict[str, float]:
    """Median process CPU seconds per call (one thread), the candidates interleaved so that machine noise hits
    all alike; CPU time, not wall time, because the 2-core machines here are shared."""
    samples = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.process_time()
                fn(x)
                samples[name].append(time.process_time() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tasks = split_digits_images(args.tasks)
    model = timm.create_model("resnet18", num_classes=2).eval()
    hat = hatify.hatify(model, num_tasks=args.tasks, example_inputs=(torch.zeros(2, 3, 32, 32),))
    accs = train(hat, tasks, args.epochs)
    hat.eval()
    x = tasks[0][1][0][: args.batch]
    rows = []
    for t in range(args.tasks):
        plain, pruned = hat.extract(t), hat.extract(t, prune=True)
        with torch.no_grad():
            diff = float((pruned(x) - hat(x, task_id=t)).abs().max())
        cap = hat.capacity()
        used = sum(v["used"][t] for v in cap.values()) / sum(v["units"] for v in cap.values())
        fns = {"original": model, "hat": lambda v, t=t: hat(v, task_id=t), "extract": plain, "pruned": pruned}
        times = timed(fns, x, args.repeats)
        rows.append({
            "task": t, "accuracy": accs[t], "units_used": used, "pruned_max_abs_diff": diff,
            "params": {"original": sum(p.numel() for p in model.parameters()),
                       "hat": sum(p.numel() for p in hat.parameters()) + sum(b.numel() for b in hat.buffers()),
                       "extract": sum(p.numel() for p in plain.parameters()),
                       "pruned": sum(p.numel() for p in pruned.parameters())},
            "gflops": {k: flops(f, x) / 1e9 for k, f in fns.items()},
            "ms": {k: v * 1e3 for k, v in times.items()},
        })
    table = Table(title=f"resnet18 on Split Digits 32x32, batch {args.batch}, CPU ms, {torch.get_num_threads()} thread")
    for col in ("task", "acc", "units used", "params orig/extract/pruned (M)", "GFLOPs orig/pruned",
                "ms orig", "ms hat", "ms extract", "ms pruned", "pruned/orig time"):
        table.add_column(col)
    for r in rows:
        p, g, ms = r["params"], r["gflops"], r["ms"]
        table.add_row(str(r["task"]), f"{r['accuracy']:.3f}", f"{r['units_used']:.2f}",
                      f"{p['original'] / 1e6:.2f}/{p['extract'] / 1e6:.2f}/{p['pruned'] / 1e6:.2f}",
                      f"{g['original']:.3f}/{g['pruned']:.3f}", f"{ms['original']:.1f}", f"{ms['hat']:.1f}",
                      f"{ms['extract']:.1f}", f"{ms['pruned']:.1f}", f"{ms['pruned'] / ms['original']:.2f}")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "extract.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = ["| task | acc | units used | params orig | params pruned | GFLOPs orig | GFLOPs pruned | ms orig | "
             "ms hat | ms extract | ms pruned |", "|" + "---|" * 11]
    for r in rows:
        p, g, ms = r["params"], r["gflops"], r["ms"]
        lines.append(f"| {r['task']} | {r['accuracy']:.3f} | {r['units_used']:.2f} | {p['original']} | {p['pruned']} | "
                     f"{g['original']:.3f} | {g['pruned']:.3f} | {ms['original']:.1f} | {ms['hat']:.1f} | "
                     f"{ms['extract']:.1f} | {ms['pruned']:.1f} |")
    (RESULTS / "extract.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
