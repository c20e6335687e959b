"""HAT (hatify, through its Avalanche strategy) against Avalanche's continual-learning strategies.

    .venv/bin/python benchmarks/baselines.py [--seeds 3] [--jobs 2] [--epoch-scale 1.0] [--only split_digits,mlp]
                                             [--methods hat,naive,...] [--sweep] [--reuse RUNS.json]
                                             [--from-runs A.json,B.json]

Every method trains through Avalanche (`SupervisedTemplate` strategies) on the same task-incremental streams,
networks, data order, epochs, batch size and optimizer (SGD, momentum 0.9, one for all tasks; the streams,
networks and learning rates of `continual.py`): Split Digits, Split MNIST-5k and Permuted MNIST-1D, each with
the MLP and the small CNN. Baselines are multi-head like HAT: the network has 5 x classes outputs and task t
reads its own slice. Hyper-parameters (baselines_tuning.py): every method that stores no data gets the same
budget, its main hyper-parameter chosen per stream and network by `--sweep` among 4 values (GRIDS), each trained
once (seed 0) on 80% of each task's training set and scored by ACC on the other 20%; the test sets are never
used for the choice. The table runs read the choices from results/baselines_sweep.json; the others use HYPER.
`--reuse RUNS.json` takes the runs a saved file already has with the same settings; `--from-runs A.json,B.json`
renders the merge (B's runs replace A's for the same stream, network and method).
Figures per run: the accuracy matrix, ACC, BWT, training seconds (strategy.train only, not evaluation) and the
peak resident memory the run added to its process (each run in a fresh process forked from a server that has
imported the libraries; VmHWM reset at the start, minus the RSS then).
Writes benchmarks/results/baselines.json, baselines.md, baselines_acc_vs_tasks.png, baselines_matrices.png
(a suffix with --only or --methods).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines_tuning import (CHOICES_FILE, GRIDS, HYPER, choose, fix_si, hyper_text, job_key,  # noqa: E402
                              merge_runs, reusable, si_snapshot_is_a_view, sweep_section, validation_split)
from continual import BENCHMARKS, NUM_TASKS, RESULTS, build_network, load_tasks  # noqa: E402

NETWORKS = ("mlp", "cnn")
CACHE_ENV = "HATIFY_BASELINES_CACHE"
# imported once by the fork server; every run then forks a fresh process from it (its peak memory is its own)
PRELOAD = ["__main__", "avalanche.training", "avalanche.benchmarks", "avalanche.models.packnet",
           "hatify.integrations.avalanche", "matplotlib"]
# name -> (what stores data, settings shown in the table)
METHODS = {
    "hat": (False, "hatify HATConfig() defaults (s_max 400), c {hat_c}"),
    "naive": (False, "fine-tuning"),
    "ewc": (False, "EWC, separate mode, lambda {ewc_lambda}"),
    "si": (False, "SI, lambda {si_lambda} (two fixes to Avalanche's SI: see Known breakage)"),
    "lwf": (False, "LwF, alpha {lwf_alpha}, temperature 2"),
    "packnet": (False, "PackNet, prune {packnet_prune} per task, last quarter of the epochs after pruning"),
    "agem": (True, "A-GEM, 32 samples per task, reference batch 64"),
    "gem": (True, "GEM, 32 samples per task, memory strength 0.5"),
    "replay": (True, "Replay, 100 samples in all"),
    "cumulative": (True, "Cumulative: all data so far (joint upper bound)"),
}


# ---------------------------------------------------------------------------------------------- models
def _sliced_model(net: nn.Module, classes: int) -> nn.Module:
    from avalanche.models import MultiTaskModule

    class SlicedHeads(MultiTaskModule):
        """One network, one output slice per task (the multi-head baseline of continual.py)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.net(x)[:, task_label * classes:(task_label + 1) * classes]

    return SlicedHeads()


def _packnet_model(net: nn.Module, classes: int) -> nn.Module:
    from avalanche.models.packnet import PackNetModel

    class SlicedPackNet(PackNetModel):
        def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
            t = int(task_id[0])
            return super().forward(x, task_id)[:, t * classes:(t + 1) * classes]

    # PackNet refuses normalisation layers: its CNN has the same convolutions without BatchNorm.
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return SlicedPackNet(net)


def make_strategy(method: str, bench_name: str, network: str, seed: int, epochs: int, x_example: torch.Tensor,
                  hyper: dict | None = None):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import AGEM, EWC, GEM, LwF, Cumulative, Naive, PackNet, Replay, SynapticIntelligence
    from avalanche.training.plugins import EvaluationPlugin

    import hatify
    from hatify.integrations.avalanche import HAT

    bench = BENCHMARKS[bench_name]
    k = bench.classes
    hyper = {**HYPER, **(hyper or {})}
    if method == "si":
        fix_si()
    torch.manual_seed(seed)
    if method == "hat":
        model = hatify.hatify(build_network(network, bench, k), NUM_TASKS, example_inputs=(x_example,),
                              config=hatify.HATConfig(seed=seed, c=hyper["hat_c"]))
    elif method == "packnet":
        model = _packnet_model(build_network(network, bench, NUM_TASKS * k), k)
    else:
        model = _sliced_model(build_network(network, bench, NUM_TASKS * k), k)
    optimizer = torch.optim.SGD(model.parameters(), lr=bench.lr, momentum=0.9)
    common = dict(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=bench.batch,
                  train_epochs=epochs, eval_mb_size=512,
                  evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    build = {
        "hat": lambda: HAT(**common),
        "naive": lambda: Naive(**common),
        "ewc": lambda: EWC(**common, ewc_lambda=hyper["ewc_lambda"], mode="separate"),
        "si": lambda: SynapticIntelligence(**common, si_lambda=hyper["si_lambda"]),
        "lwf": lambda: LwF(**common, alpha=hyper["lwf_alpha"], temperature=2.0),
        "packnet": lambda: PackNet(**common, post_prune_epochs=max(1, epochs // 4),
                                   prune_proportion=hyper["packnet_prune"]),
        "agem": lambda: AGEM(**common, patterns_per_exp=32, sample_size=64),
        "gem": lambda: GEM(**common, patterns_per_exp=32, memory_strength=0.5),
        "replay": lambda: Replay(**common, mem_size=100),
        "cumulative": lambda: Cumulative(**common),
    }
    return build[method]()


# ---------------------------------------------------------------------------------------------- one run
def _tasks(bench_name: str, seed: int) -> list:
    """The stream's tensors: from the cache main() writes (one fresh process per run must not rebuild them)."""
    cache = os.environ.get(CACHE_ENV)
    if cache and (Path(cache) / f"{bench_name}_{seed}.pt").exists():
        return torch.load(Path(cache) / f"{bench_name}_{seed}.pt", weights_only=True)
    return load_tasks(bench_name, seed)


def _stream(bench_name: str, seed: int, validation: bool = False):
    from avalanche.benchmarks import tensors_benchmark

    tasks = validation_split(_tasks(bench_name, seed)) if validation else _tasks(bench_name, seed)
    return tensors_benchmark(train_tensors=[(t[0], t[1]) for t in tasks], test_tensors=[(t[2], t[3]) for t in tasks],
                             task_labels=list(range(NUM_TASKS)), complete_test_set_only=False)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(bench_name: str, network: str, method: str, seed: int, epochs: int, hyper: dict | None = None,
            validation: bool = False) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from hatify.metrics import summarize

    bm = _stream(bench_name, seed, validation)
    x_example = _tasks(bench_name, seed)[0][0][:2]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        resettable = True
    except OSError:
        resettable = False
    base = _rss_kib("VmRSS")
    strategy = make_strategy(method, bench_name, network, seed, epochs, x_example, hyper)
    torch.manual_seed(seed + 1)  # the same data order for every method
    # A-GEM samples its memory with `random`, which Python reseeds from the OS in every forked child
    random.seed(seed + 1)
    numpy.random.seed(seed + 1)
    matrix, seconds = [], 0.0
    for experience in bm.train_stream:
        start = time.perf_counter()
        strategy.train(experience)
        seconds += time.perf_counter() - start
        metrics = strategy.eval(bm.test_stream)
        matrix.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"]
                       for j in range(NUM_TASKS)])
    summary = summarize(matrix)
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in strategy.model.parameters())  # diverged training
    return {"benchmark": bench_name, "network": network, "method": method, "seed": seed, "epochs": epochs,
            "hyper": hyper or {}, "validation": validation, "nonfinite_weights": nonfinite,
            "acc_matrix": matrix, "acc": summary["acc"], "bwt": summary["bwt"], "seconds": seconds,
            "peak_mib": (_rss_kib("VmHWM") - base) / 1024 if resettable else None}


def _run_job(job: tuple) -> dict:
    try:
        return run_one(*job)
    except Exception as error:  # a strategy broken on this torch: recorded, shown in the table
        return {"benchmark": job[0], "network": job[1], "method": job[2], "seed": job[3], "epochs": job[4],
                "hyper": job[5] if len(job) > 5 else {},
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}


# ---------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["benchmark"], run["network"], run["method"]), []).append(run)
    rows = []
    for (bench, network, method), group in groups.items():
        ok = [r for r in group if "error" not in r]
        row = {"benchmark": bench, "network": network, "method": method, "seeds": [r["seed"] for r in ok],
               "hyper": group[0].get("hyper", {}), "errors": sorted({r["error"] for r in group if "error" in r})}
        diverged = sum(r.get("nonfinite_weights", 0) > 0 for r in ok)
        if diverged:
            row["errors"].append(f"{diverged} of {len(ok)} runs ended with non-finite weights (diverged)")
        if ok:
            matrix = [[statistics.mean(r["acc_matrix"][i][j] for r in ok) for j in range(NUM_TASKS)]
                      for i in range(NUM_TASKS)]
            peaks = [r["peak_mib"] for r in ok if r["peak_mib"] is not None]
            row.update(acc=_mean_std([r["acc"] for r in ok]), bwt=_mean_std([r["bwt"] for r in ok]),
                       bwt_exactly_zero=all(r["bwt"] == 0.0 for r in ok), acc_matrix_mean=matrix,
                       seconds=statistics.median(r["seconds"] for r in ok),
                       peak_mib=statistics.median(peaks) if peaks else None)
        rows.append(row)
    order = {name: i for i, name in enumerate(METHODS)}
    bench_order = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(rows, key=lambda r: (bench_order[r["benchmark"]], r["network"], order[r["method"]]))


def _standing(rows: list[dict]) -> list[str]:
    """Per stream and network: HAT's ACC against the best method that stores no data, and the best overall."""
    lines = []
    for bench in BENCHMARKS:
        for network in NETWORKS:
            here = {r["method"]: r for r in rows if r["benchmark"] == bench and r["network"] == network and "acc" in r}
            if "hat" not in here:
                continue
            hat = here["hat"]["acc"][0]
            no_data = max((r["acc"][0], m) for m, r in here.items() if m != "hat" and not METHODS[m][0])
            best = max((r["acc"][0], m) for m, r in here.items() if m != "hat")
            rank = 1 + sum(r["acc"][0] > hat for m, r in here.items() if m != "hat")
            lines.append(f"| {bench} | {network} | {hat:.4f} | {no_data[1]} {no_data[0]:.4f} | "
                         f"{'yes' if hat >= no_data[0] else 'no'} | {best[1]} {best[0]:.4f} | {rank} of {len(here)} |")
    return lines


def render(rows: list[dict], meta: dict) -> str:
    md = ["# HAT (hatify) against Avalanche's strategies", "", f"Command: `{meta['command']}`  ",
          f"Settings: {json.dumps(meta['settings'])}", "",
          "Every method trains through Avalanche on the same streams, networks, data order, epochs, batch size and "
          "optimizer (SGD, momentum 0.9, one for all tasks); baselines are multi-head (one output slice per task), "
          "HAT has one head per task. ACC = mean final test accuracy over the 5 tasks; BWT = mean (final - just "
          "trained) over tasks 0-3; train s = median seconds in `strategy.train` per run (evaluation excluded); "
          "peak MiB = median peak resident memory a run added to its process. Stores data: the method keeps "
          "training samples (a buffer, or all of them). Hyper-parameters: every method that stores no data "
          "(HAT included) gets the same tuning budget, its main hyper-parameter chosen per stream and network "
          "among 4 values by ACC on a validation split of the training data (the sweep section below); the others "
          "keep one common setting. A run whose weights end non-finite is marked diverged.", "",
          "| benchmark | network | method | stores data | ACC | BWT | train s | peak MiB | notes |",
          "|---|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        stores = "yes" if METHODS[row["method"]][0] else "no"
        notes = list(row["errors"])
        if row["method"] == "packnet" and row["network"] == "cnn":
            notes.append("CNN without BatchNorm (PackNet refuses norm layers)")
        if "acc" not in row:
            md.append(f"| {row['benchmark']} | {row['network']} | {row['method']} | {stores} | failed | | | | "
                      f"{'; '.join(notes)} |")
            continue
        acc, bwt = row["acc"], row["bwt"]
        exact = " (exact 0)" if row["bwt_exactly_zero"] else ""
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        md.append(f"| {row['benchmark']} | {row['network']} | {row['method']} | {stores} | "
                  f"{acc[0]:.4f} ± {acc[1]:.4f} | {bwt[0]:+.4f} ± {bwt[1]:.4f}{exact} | {row['seconds']:.1f} | "
                  f"{peak} | {'; '.join(notes)} |")
    md += ["", "## Where HAT stands", "",
           "| benchmark | network | HAT ACC | best method storing no data | HAT at or above it | best other method | "
           "HAT's rank |", "|---|---|---:|---|---|---|---|"] + _standing(rows)
    md += ["", "## Method settings", ""] + [f"- `{m}`: {text.format(**hyper_text(rows, m))}"
                                            for m, (_, text) in METHODS.items()]
    md += sweep_section(meta.get("sweep"))
    md += ["", "## Known breakage on this torch", ""] + [f"- {line}" for line in meta["breakage"]]
    md += ["", "Plots: " + ", ".join(f"`{p}`" for p in meta["plots"])]
    return "\n".join(md) + "\n"


def plot(rows: list[dict], out: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(b, n) for b in BENCHMARKS for n in NETWORKS
                if any(r["benchmark"] == b and r["network"] == n and "acc" in r for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m and "acc" in r for r in rows)]
    if not settings:
        return []
    by_key = {(r["benchmark"], r["network"], r["method"]): r for r in rows if "acc" in r}
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False)
    for ax, (bench, network) in zip(axes[0], settings):
        for method in methods:
            row = by_key.get((bench, network, method))
            if row is None:
                continue
            m = row["acc_matrix_mean"]
            ax.plot(range(1, NUM_TASKS + 1), [statistics.mean(m[i][:i + 1]) for i in range(NUM_TASKS)],
                    marker="o", lw=2.5 if method == "hat" else 1, label=method)
        ax.set_title(f"{bench} / {network}", fontsize=9)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(range(1, NUM_TASKS + 1))
    axes[0][0].set_ylabel("mean accuracy on the tasks so far")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    names = [f"baselines{suffix}_acc_vs_tasks.png", f"baselines{suffix}_matrices.png"]
    fig.savefig(out / names[0], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(len(settings), len(methods), figsize=(1.7 * len(methods), 1.8 * len(settings)),
                             squeeze=False)
    for i, (bench, network) in enumerate(settings):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            row = by_key.get((bench, network, method))
            if row is not None:
                ax.imshow(row["acc_matrix_mean"], vmin=0, vmax=1, cmap="viridis")
            if i == 0:
                ax.set_title(method, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{bench}\n{network}", fontsize=7)
    fig.suptitle("accuracy matrices R[i][j] (row: after task i, column: task j; mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / names[1], dpi=110)
    plt.close(fig)
    return names


def breakage() -> list[str]:
    """Try the known breakage so the table says what this torch does (PackNet + AdamW; BiC's `verbose`; SI)."""
    from avalanche.training import BiC, PackNet

    lines = []
    if si_snapshot_is_a_view():
        lines.append("SI (Avalanche 0.6 `SynapticIntelligencePlugin.extract_weights`) stores its weight snapshots as "
                     "`param.detach().cpu().flatten()`, which on a CPU model is a view of the live parameter, not "
                     "a copy: the start-of-task anchor and the before/after-step weights all move with the "
                     "weights, so the path integral (new - old) and the penalty (w - anchor) are exactly 0 and SI "
                     "trains bit for bit like Naive (our first table: identical ACC and BWT in every row). On GPU "
                     "`.cpu()` copies. The same symptom was reported as ContinualAI/avalanche#734 (closed in "
                     "2021); 0.6.0 still has it on CPU. Here the snapshots are made copies (`fix_si`)")
    lines.append("SI's importances are clamped at 0.001 from above only (`update_ewc_data`, `clip_to`): with SGD "
                 "momentum some path integrals come out positive, so some importances turn negative (down to -22 "
                 "after 3 tasks of split digits), the penalty is then unbounded below (-1e14) and the weights "
                 "become NaN within 3-5 tasks at any lambda from 10 to 1000 (split digits MLP, validation split) "
                 "once the first fix is in. Here the "
                 "importances are clamped at 0 from below as well (`fix_si`)")
    net = _packnet_model(build_network("mlp", BENCHMARKS["split_digits"], 10), 2)
    try:
        strategy = PackNet(model=net, optimizer=torch.optim.AdamW(net.parameters()), post_prune_epochs=1,
                           prune_proportion=0.5, train_epochs=2, train_mb_size=32)
        strategy.train(_stream("split_digits", 0).train_stream[0])
        lines.append("PackNet with AdamW: ran")
    except Exception as error:
        lines.append(f"PackNet with AdamW fails: `{type(error).__name__}: {str(error).splitlines()[0][:160]}`; "
                     f"every method here uses SGD with momentum, with which PackNet works")
    try:  # BiC is class-incremental: one head over all 10 classes, no task labels
        from avalanche.benchmarks import tensors_benchmark

        tasks = _tasks("split_digits", 0)[:2]
        stream = tensors_benchmark(train_tensors=[(t[0], t[1] + 2 * i) for i, t in enumerate(tasks)],
                                   test_tensors=[(t[2], t[3] + 2 * i) for i, t in enumerate(tasks)],
                                   task_labels=[0, 0], complete_test_set_only=False)
        model = build_network("mlp", BENCHMARKS["split_digits"], 10)
        strategy = BiC(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                       criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, mem_size=100)
        for experience in stream.train_stream:
            strategy.train(experience)
        lines.append("BiC: ran two class-incremental experiences (a class-incremental method: not in the table)")
    except Exception as error:
        lines.append(f"BiC fails in its second experience: `{type(error).__name__}: "
                     f"{str(error).splitlines()[0][:160]}` (a class-incremental method anyway: not in the table)")
    return lines


def _per_benchmark(text: str, default: dict[str, int]) -> dict[str, int]:
    """`3` (every stream) or `split_digits=3,split_mnist=2` (the others keep their default)."""
    if text.isdigit():
        return {b: int(text) for b in default}
    values = dict(default)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in BENCHMARKS or not value.isdigit():
            raise SystemExit(f"bad value {item!r}: expected N or NAME=N with NAME one of {', '.join(BENCHMARKS)}")
        values[name] = int(value)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="3", help="N, or NAME=N per stream (split_mnist=2,...)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every stream's epochs")
    parser.add_argument("--epochs", default="", help="NAME=N per stream, after --epoch-scale")
    parser.add_argument("--only", default="", help="comma-separated benchmark and network names to keep")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    parser.add_argument("--from-runs", default="", help="render the table from saved JSONs' runs (comma-separated; "
                        "a later file's runs replace an earlier one's for the same stream, network and method)")
    parser.add_argument("--sweep", action="store_true", help=f"sweep {', '.join(GRIDS)}'s hyper-parameter on a "
                        f"validation split (seed 0) and write {CHOICES_FILE}; the table runs read its choices")
    parser.add_argument("--reuse", default="", help="a saved runs JSON: a job it already ran with the same "
                        "settings is taken from it, not trained again (never SI's runs saved before its fixes)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    kept = lambda name, kind: not (only & kind) or name in only  # noqa: E731
    epochs = _per_benchmark(args.epochs, {b: max(1, round(spec.epochs * args.epoch_scale))
                                          for b, spec in BENCHMARKS.items()})
    seeds = _per_benchmark(args.seeds, {b: 3 for b in BENCHMARKS})
    out = Path(args.out)
    choices_path = out / CHOICES_FILE
    sweep = json.loads(choices_path.read_text()) if choices_path.exists() else None
    if args.sweep:
        jobs = [(b, n, m, 0, epochs[b], {GRIDS[m][0]: v}, True) for b in BENCHMARKS if kept(b, set(BENCHMARKS))
                for n in NETWORKS if kept(n, set(NETWORKS)) for m in methods if m in GRIDS for v in GRIDS[m][1]]
    else:
        chosen = sweep["choices"] if sweep else {}
        jobs = [(b, n, m, seed, epochs[b], chosen.get(f"{b}/{n}/{m}", {}), False)
                for b in BENCHMARKS if kept(b, set(BENCHMARKS)) for n in NETWORKS if kept(n, set(NETWORKS))
                for seed in range(seeds[b]) for m in methods]
    reused = reusable(Path(args.reuse), jobs) if args.reuse else []
    done = {job_key(r) for r in reused}
    jobs = [j for j in jobs if job_key(j) not in done]
    # seed by seed (a run cut short still covers every setting), the slowest first within a seed
    jobs.sort(key=lambda j: (j[3], j[2] not in ("cumulative", "gem"), j[0] != "permuted_mnist1d", j[1] != "cnn"))
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("_" + "_".join(sorted(only)) if only else "") + ("_" + "_".join(methods) if args.methods else "")
    settings = {"seeds": {b: seeds[b] for b in BENCHMARKS if kept(b, set(BENCHMARKS))}, "epochs": epochs,
                "optimizer": "SGD momentum 0.9, one for all tasks", "batch": {b: s.batch for b, s in BENCHMARKS.items()},
                "lr": {b: s.lr for b, s in BENCHMARKS.items()}, "torch": torch.__version__}
    command = "python benchmarks/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cache = Path(tempfile.mkdtemp(prefix="hatify_baselines_"))
    os.environ[CACHE_ENV] = str(cache)
    start = time.perf_counter()
    if args.from_runs:
        runs, settings, command = merge_runs([Path(f) for f in args.from_runs.split(",")])
    else:
        runs = list(reused)
        if args.reuse:
            print(f"{len(reused)} runs reused from {args.reuse}, {len(jobs)} to train", flush=True)
        for bench, seed in sorted({(j[0], j[3]) for j in jobs}):
            torch.save(load_tasks(bench, seed), cache / f"{bench}_{seed}.pt")
        context = get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        partial = out / (f"baselines_sweep{suffix}_runs.json" if args.sweep else f"baselines{suffix}_runs.json")
        with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            for run in pool.map(_run_job, jobs):
                runs.append(run)
                status = run.get("error") or f"ACC {run['acc']:.4f} BWT {run['bwt']:+.4f} {run['seconds']:.1f} s"
                print(f"[{len(runs) - len(reused)}/{len(jobs)}] {run['benchmark']} {run['network']} "
                      f"{run['method']} seed {run['seed']} {run.get('hyper') or ''}: {status}", flush=True)
                settings["total_seconds"] = round(time.perf_counter() - start, 1)
                partial.write_text(json.dumps({"command": command, "settings": settings, "runs": runs}))
    if args.sweep:
        shutil.rmtree(cache)
        if sweep:  # an earlier sweep's other methods and settings stay
            swept = {(r["benchmark"], r["network"], r["method"]) for r in runs}
            runs = [r for r in sweep["runs"] if (r["benchmark"], r["network"], r["method"]) not in swept] + runs
            command = sweep["command"] + " ; then " + command
        choices, lines = choose(runs)
        sweep = {"command": command, "settings": settings, "grids": GRIDS, "choices": choices, "runs": runs}
        choices_path.write_text(json.dumps(sweep, indent=1))
        print("\n".join(sweep_section(sweep)))
        return 0
    rows = aggregate(runs)
    meta = {"command": command, "settings": settings, "breakage": breakage(), "plots": plot(rows, out, suffix),
            "sweep": sweep}
    shutil.rmtree(cache)
    text = render(rows, meta)
    print(text)
    (out / f"baselines{suffix}.md").write_text(text)
    (out / f"baselines{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
