"""Avalanche's class-incremental strategies on the streams of class_incremental.py, for comparison.

    PYTHONPATH=. .venv/bin/python benchmarks/class_incremental_avalanche.py [--seeds 3]

Same split digits tasks and seeds, same networks, epochs, batch size and SGD (momentum 0.9) as the HAT runs,
but one head over all 10 classes and no task labels (class-incremental). Hyper-parameters are the defaults of
baselines.py (HYPER, chosen there for task-incremental streams) and Avalanche's defaults: NOT tuned for these
streams, so the replay-free rows are a floor rather than each method's best. Buffered methods keep 200 samples
(20 per class), as the HAT runs with keep=20.
Writes benchmarks/results/class_incremental_avalanche.json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines_tuning import HYPER  # noqa: E402
from continual import BENCHMARKS, NUM_TASKS, RESULTS, build_network, load_tasks  # noqa: E402

BENCH = "split_digits"
NETWORKS = ("mlp", "cnn")
MEMORY = 200
METHODS = ("naive", "ewc", "lwf", "replay", "der", "er_ace", "cumulative")


def run_one(network: str, method: str, seed: int) -> dict:
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import DER, ER_ACE, EWC, Cumulative, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    torch.set_num_threads(1)
    bench = BENCHMARKS[BENCH]
    tasks = load_tasks(BENCH, seed)
    k = bench.classes
    train = [(t[0], t[1] + i * k) for i, t in enumerate(tasks)]   # global labels: one head over all classes
    test = [(t[2], t[3] + i * k) for i, t in enumerate(tasks)]
    stream = tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * NUM_TASKS,
                               complete_test_set_only=False)
    torch.manual_seed(seed)
    model = build_network(network, bench, NUM_TASKS * k)
    common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=bench.lr, momentum=0.9),
                  criterion=nn.CrossEntropyLoss(), train_mb_size=bench.batch, train_epochs=bench.epochs,
                  eval_mb_size=512, evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    strategy = {
        "naive": lambda: Naive(**common),
        "ewc": lambda: EWC(**common, ewc_lambda=HYPER["ewc_lambda"], mode="separate"),
        "lwf": lambda: LwF(**common, alpha=HYPER["lwf_alpha"], temperature=2.0),
        "replay": lambda: Replay(**common, mem_size=MEMORY),
        "der": lambda: DER(**common, mem_size=MEMORY),
        "er_ace": lambda: ER_ACE(**common, mem_size=MEMORY),
        "cumulative": lambda: Cumulative(**common),
    }[method]()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for experience in stream.train_stream:
            strategy.train(experience)
    model.eval()
    x, y = torch.cat([t[0] for t in test]), torch.cat([t[1] for t in test])
    with torch.no_grad():
        cil = float((model(x).argmax(1) == y).float().mean())
    return {"network": network, "method": method, "seed": seed, "cil": cil, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    runs = []
    for network in NETWORKS:
        for method in METHODS:
            for seed in range(args.seeds):
                runs.append(run_one(network, method, seed))
                print(f"{network} {method} seed {seed}: CIL {runs[-1]['cil']:.3f} ({runs[-1]['seconds']:.1f} s)",
                      flush=True)
    lines = ["| method | buffer | " + " | ".join(NETWORKS) + " |", "|---|---|" + "---|" * len(NETWORKS)]
    for method in METHODS:
        cells = []
        for network in NETWORKS:
            values = [r["cil"] for r in runs if (r["network"], r["method"]) == (network, method)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        buffer = {"replay": "200", "der": "200", "er_ace": "200", "cumulative": "all"}.get(method, "-")
        lines.append(f"| {method} | {buffer} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    command = "PYTHONPATH=. python benchmarks/class_incremental_avalanche.py " + " ".join(argv or sys.argv[1:])
    (RESULTS / "class_incremental_avalanche.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    (RESULTS / "class_incremental_avalanche.md").write_text(
        "# Avalanche class-incremental strategies, split digits (CIL accuracy)\n\n" f"`{command}`\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
