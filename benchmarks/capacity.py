"""Capacity over a long task sequence: what HAT leaves free for later tasks, with in-place ops and without.

    .venv/bin/python benchmarks/capacity.py [--tasks 10] [--epochs 12] [--seeds 0,1,2] [--networks mlp,cnn]

Permuted digits (scikit-learn's 1,797 8x8 digits, shipped in its wheel): task 0 unpermuted, task t a fixed random
permutation of the 64 pixels, all 10 classes, 70/30 split. Two networks, each in two spellings that compute the
same function: `inplace` (ReLU(inplace=True), Dropout(inplace=True), a residual `add_`, `F.relu(..., inplace=True)`,
as torchvision and timm write them) and `out-of-place`. Mask flow must give both the same plan, so every figure must
match; before issue 20 the in-place spelling lost its input maps, froze more weights and learned less.
- `mlp`: 64 -> 128 (GELU, dropout) -> 128 (ReLU) -> 10;
- `cnn`: a torchvision-style residual CNN (conv-BN-ReLU, a basic block with BatchNorm and a residual add), 8x8.
Per run: accuracy matrix (binary masks, eval mode; BatchNorm statistics re-estimated by `end_task(data=...)`), ACC,
the mean accuracy of the last 3 tasks, and after each task the share of mask units and of masked-layer weights
still free (a weight is frozen when its output unit and its input unit are used, `model.weight_protection`).
Writes benchmarks/results/capacity.json, capacity.md and capacity.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hatify  # noqa: E402
from hatify.metrics import summarize  # noqa: E402
from hatify.model import weight_protection  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class MLP(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)
        self.act, self.drop = nn.ReLU(inplace=inplace), nn.Dropout(0.1, inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.gelu(self.fc1(x.flatten(1))))  # GELU keeps its input for backward: dropout may write
        return self.head(self.act(self.fc2(h)))


class ResidualCNN(nn.Module):
    """conv-BN-ReLU stem, one basic block (conv-BN-ReLU-conv-BN, residual add, ReLU), pool, linear head."""

    def __init__(self, inplace: bool, width: int = 32) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.act, self.pool = nn.ReLU(inplace=inplace), nn.MaxPool2d(2)
        self.fc, self.head = nn.Linear(width * 16, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.stem(x.view(-1, 1, 8, 8))))
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(h)))))
        out = out.add_(h) if self.inplace else out + h
        out = self.pool(F.relu(out, inplace=self.inplace))
        return self.head(self.act(self.fc(out.flatten(1))))


NETWORKS = {"mlp": MLP, "cnn": ResidualCNN}


def permuted_digits(tasks: int, seed: int) -> list[tuple]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    cut = int(0.7 * len(y))
    out = []
    for t in range(tasks):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=gen)
        out.append(((x[:cut, perm], y[:cut]), (x[cut:, perm], y[cut:])))
    return out


def free_shares(hat: hatify.HATModel) -> tuple[float, float]:
    """(share of mask units no finished task uses, share of masked-layer weights still trainable)."""
    cum = hat.cumulative.bool()
    cum_ext = torch.cat([cum, cum.new_ones(1)])
    frozen = total = 0
    for layer in hat.plan.masked_layers:
        weight = _weight(hat, layer.weight)
        out = cum[layer.offset: layer.offset + layer.units]
        inp = cum_ext[layer.input_index].any(0) if layer.input_index is not None else None
        frozen += int(weight_protection(layer, out, inp, tuple(weight.shape)).expand(weight.shape).sum())
        total += weight.numel()
    return 1 - float(cum.float().mean()), 1 - frozen / total


def _weight(hat: hatify.HATModel, qualname: str) -> torch.Tensor:
    owner, _, attr = qualname.rpartition(".")
    return getattr(hat.net.get_submodule(owner), attr)


def run(network: str, inplace: bool, tasks: int, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    data = permuted_digits(tasks, seed)
    hat = hatify.hatify(NETWORKS[network](inplace), tasks, (data[0][0][0][:2],))
    opt = torch.optim.SGD(hat.parameters(), lr=0.05, momentum=0.9)
    matrix, free = [], []
    start = time.perf_counter()
    for t, ((xtr, ytr), _) in enumerate(data):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        hat.train()
        hat.begin_task(t)
        for _ in range(epochs):
            order = torch.randperm(len(ytr), generator=gen)
            batches = list(zip(xtr[order].split(64), ytr[order].split(64)))
            for b, (xb, yb) in enumerate(batches):
                loss = F.cross_entropy(hat(xb, task_id=t, mask_scale=hat.mask_scale(b, len(batches))), yb)
                opt.zero_grad()
                (loss + hat.regularization()).backward()
                opt.step()
        hat.end_task(data=list(zip(xtr.split(256), ytr.split(256))))
        hat.eval()
        with torch.no_grad():
            matrix.append([float((hat(xte, task_id=j).argmax(1) == yte).float().mean()) if j <= t else 0.0
                           for j, (_, (xte, yte)) in enumerate(data)])
        free.append(free_shares(hat))
    metrics = summarize(matrix)
    return {"network": network, "variant": "inplace" if inplace else "out-of-place", "seed": seed,
            "known_input_maps": hat.report.summary["known_input_maps"],
            "layers_with_inputs": hat.report.summary["layers_with_inputs"],
            "acc": metrics["acc"], "bwt": metrics["bwt"], "last3": statistics.mean(matrix[-1][-3:]),
            "free_units": [u for u, _ in free], "free_weights": [w for _, w in free], "matrix": matrix,
            "seconds": round(time.perf_counter() - start, 1)}


def render(rows: list[dict]) -> str:
    lines = ["| network | variant | seeds | known input maps | ACC | last 3 tasks | BWT | free units after each task "
             "| free weights after each task |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['network']} | {row['variant']} | {row['seeds']} | {row['known']} | {row['acc']:.4f} | "
                     f"{row['last3']:.4f} | {row['bwt']:.4f} | {' '.join(f'{v:.2f}' for v in row['free_units'])} | "
                     f"{' '.join(f'{v:.2f}' for v in row['free_weights'])} |")
    return "\n".join(lines)


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for network in NETWORKS:
        for variant in ("inplace", "out-of-place"):
            group = [r for r in runs if r["network"] == network and r["variant"] == variant]
            if not group:
                continue
            mean = lambda key: statistics.mean(r[key] for r in group)
            curve = lambda key: [statistics.mean(v) for v in zip(*(r[key] for r in group))]
            rows.append({"network": network, "variant": variant, "seeds": len(group),
                         "known": f"{group[0]['known_input_maps']}/{group[0]['layers_with_inputs']}",
                         "acc": mean("acc"), "last3": mean("last3"), "bwt": mean("bwt"),
                         "free_units": curve("free_units"), "free_weights": curve("free_weights")})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("free_units", "free_weights"), ("mask units free", "weights free")):
        for row in rows:
            style = "-" if row["variant"] == "inplace" else "--"
            ax.plot(range(1, len(row[key]) + 1), row[key], style, marker="o", markersize=3,
                    label=f"{row['network']} {row['variant']}")
        ax.set_title(title)
        ax.set_xlabel("tasks finished")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for network in args.networks.split(","):
            for inplace in (True, False):
                runs.append(run(network, inplace, args.tasks, args.epochs, seed))
                r = runs[-1]
                print(f"{network} {r['variant']} seed {seed}: ACC {r['acc']:.4f} last3 {r['last3']:.4f} free units "
                      f"{r['free_units'][-1]:.3f} free weights {r['free_weights'][-1]:.3f} ({r['seconds']} s)",
                      flush=True)
    rows = aggregate(runs)
    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"tasks": args.tasks, "epochs": args.epochs, "seeds": args.seeds, "optimizer": "SGD(lr=0.05, momentum=0.9)",
            "torch": torch.__version__, "hatify": hatify.__version__}
    (RESULTS / "capacity.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    (RESULTS / "capacity.md").write_text(f"# Capacity over {args.tasks} permuted-digits tasks\n\n"
                                         f"`python benchmarks/capacity.py --tasks {args.tasks} --epochs {args.epochs} "
                                         f"--seeds {args.seeds}`; {meta['optimizer']}, batch 64, binary masks in "
                                         "eval mode.\n\n" + table + "\n")
    plot(rows, RESULTS / "capacity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
