"""Class-incremental use of HAT models: predict the task, then the class within it.

    PYTHONPATH=. .venv/bin/python benchmarks/class_incremental.py [--seeds 3] [--benchmarks split_digits,split_mnist]

Each run trains a hatify network on 5 tasks of 2 classes with the loop of benchmarks/continual.py (same data
split, optimizer, epochs), records the statistics at `end_task(data=train batches, keep=20)`, and scores
the test samples of all tasks together, without task labels, with every score in `hatify.taskinf.SCORES`:
- TIL: accuracy with the true task id (what HAT guarantees; unchanged by the statistics);
- TP: task-prediction accuracy; CIL: class-incremental accuracy (task and class both right, over 10 classes).
Scores marked "buffer" use the 20 kept training samples per class; the others are replay-free.
Timing (process CPU time, median of 7, interleaved): `infer_task` over the test set, the per-sample path's one
pass over the batch repeated once per task (`hatify.per_sample.run`), and one forward per task.
Writes benchmarks/results/class_incremental.json, .md and _cil.png.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hatify  # noqa: E402
from continual import BENCHMARKS, NUM_TASKS, build_network, load_tasks  # noqa: E402
from hatify import per_sample  # noqa: E402
from hatify.taskinf import DEFAULT_METHOD, SCORES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEEP = 20
NETWORKS = ("mlp", "cnn")


def train(bench_name: str, network: str, seed: int) -> tuple[hatify.HATModel, list]:
    """The 5 tasks in order, as benchmarks/continual.py trains `hat`; statistics and 20 samples per class kept."""
    bench = BENCHMARKS[bench_name]
    tasks = load_tasks(bench_name, seed)
    torch.manual_seed(seed)
    hat = hatify.hatify(build_network(network, bench, bench.classes), NUM_TASKS,
                        example_inputs=(tasks[0][0][:2],), config=hatify.HATConfig(seed=seed))
    opt = torch.optim.SGD(hat.parameters(), lr=bench.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    for t, (xtr, ytr, _, _) in enumerate(tasks):
        hat.train()
        hat.begin_task(t)
        num_batches = math.ceil(len(ytr) / bench.batch)
        for _ in range(bench.epochs):
            order = torch.randperm(len(ytr), generator=gen)
            for b in range(num_batches):
                idx = order[b * bench.batch:(b + 1) * bench.batch]
                scale = hat.mask_scale(b, num_batches)
                loss = F.cross_entropy(hat(xtr[idx], task_id=t, mask_scale=scale), ytr[idx]) + hat.regularization()
                opt.zero_grad()
                loss.backward()
                opt.step()
        hat.end_task(data=[(xtr[i:i + 256], ytr[i:i + 256]) for i in range(0, len(ytr), 256)], keep=KEEP)
    hat.eval()
    return hat, tasks


def run_one(bench_name: str, network: str, seed: int) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    hat, tasks = train(bench_name, network, seed)
    x = torch.cat([task[2] for task in tasks])
    y = torch.cat([task[3] for task in tasks])
    owner = torch.cat([torch.full_like(task[3], t) for t, task in enumerate(tasks)])
    with torch.no_grad():
        til = sum(int((hat(task[2], task_id=t).argmax(1) == task[3]).sum()) for t, task in enumerate(tasks)) / len(y)
    scores = {}
    for name in SCORES:
        pred = hat.infer_task(x, method=name)
        right_task = pred.task == owner
        scores[name] = {"tp": float(right_task.float().mean()), "cil": float((right_task & (pred.classes == y))
                                                                              .float().mean())}
    one_call, one_pass, per_task = [], [], []
    repeated, ids = x.repeat(NUM_TASKS, *[1] * (x.ndim - 1)), torch.arange(NUM_TASKS).repeat_interleave(len(x))
    with torch.no_grad():
        for _ in range(7):   # interleaved
            t0 = time.process_time()
            hat.infer_task(x, method="max_logit")
            one_call.append(time.process_time() - t0)
            t0 = time.process_time()
            per_sample.run(hat.net, (repeated,), {}, ids)
            one_pass.append(time.process_time() - t0)
            t0 = time.process_time()
            for t in range(NUM_TASKS):
                hat(x, task_id=t)
            per_task.append(time.process_time() - t0)
    return {"benchmark": bench_name, "network": network, "seed": seed, "til": til, "scores": scores,
            "infer_seconds": statistics.median(one_call), "per_task_forwards_seconds": statistics.median(per_task),
            "per_sample_pass_seconds": statistics.median(one_pass),
            "test_samples": len(y), "seconds": time.perf_counter() - start}


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for bench, network in sorted({(r["benchmark"], r["network"]) for r in runs}):
        group = [r for r in runs if (r["benchmark"], r["network"]) == (bench, network)]
        mean_std = lambda v: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        row = {"benchmark": bench, "network": network, "seeds": len(group),
               "til": mean_std([r["til"] for r in group]),
               "infer_seconds": statistics.median(r["infer_seconds"] for r in group),
               "per_sample_pass_seconds": statistics.median(r["per_sample_pass_seconds"] for r in group),
               "per_task_forwards_seconds": statistics.median(r["per_task_forwards_seconds"] for r in group)}
        for name in SCORES:
            row[name] = {k: mean_std([r["scores"][name][k] for r in group]) for k in ("tp", "cil")}
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    names = list(SCORES)
    lines = ["| benchmark | network | seeds | TIL | " + " | ".join(
        f"{n}{' (buffer)' if SCORES[n].needs_buffer else ''}{' *default*' if n == DEFAULT_METHOD else ''}"
        for n in names) + " |", "|" + "---|" * (4 + len(names))]
    cell = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"
    for row in rows:
        lines.append(f"| {row['benchmark']} | {row['network']} | {row['seeds']} | {cell(row['til'])} | "
                     + " | ".join(f"CIL {cell(row[n]['cil'])}<br>TP {row[n]['tp'][0]:.3f}" for n in names) + " |")
    lines += ["", "CPU seconds, medians (all test samples, 5 tasks):", "",
              "| benchmark | network | infer_task (max_logit) | per-sample path, one pass | 5 forwards |",
              "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['benchmark']} | {row['network']} | {row['infer_seconds']:.4f} | "
                     f"{row['per_sample_pass_seconds']:.4f} | {row['per_task_forwards_seconds']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SCORES)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [row[n]["cil"][0] for n in names], width, yerr=[row[n]["cil"][1] for n in names],
               label=f"{row['benchmark']} {row['network']} (TIL {row['til'][0]:.2f})")
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=1, label="goal 0.80 (replay-free)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))],
                  [n + ("\n(buffer 20/class)" if SCORES[n].needs_buffer else "") for n in names], fontsize=8)
    ax.set_ylabel("class-incremental accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("HAT, task chosen by each score (5 tasks x 2 classes, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--benchmarks", default="split_digits")
    args = parser.parse_args(argv)
    runs = []
    for bench in args.benchmarks.split(","):
        for network in NETWORKS:
            for seed in range(args.seeds):
                runs.append(run_one(bench, network, seed))
                print(f"{bench} {network} seed {seed}: TIL {runs[-1]['til']:.3f} " + " ".join(
                    f"{n} {v['cil']:.3f}" for n, v in runs[-1]["scores"].items()), flush=True)
    rows = aggregate(runs)
    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.benchmarks == "split_digits" else "_" + args.benchmarks.replace(",", "_")
    meta = {"command": "python benchmarks/class_incremental.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "threads": 1, "keep": KEEP, "default_method": DEFAULT_METHOD}
    (RESULTS / f"class_incremental{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs},
                                                                        indent=1))
    (RESULTS / f"class_incremental{suffix}.md").write_text(
        "# Class-incremental accuracy of HAT with task inference\n\n" + f"`{meta['command']}`\n\n" + table + "\n")
    plot(rows, RESULTS / f"class_incremental{suffix}_cil.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
