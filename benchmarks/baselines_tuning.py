"""Hyper-parameters of benchmarks/baselines.py: defaults, the sweep grids and choice, reruns, Avalanche SI fixes.

The sweep gives every method that stores no data the same budget: its main hyper-parameter, 4 values, one seed,
trained on 80% of each task's training set and scored by ACC on the other 20% (`validation_split`); the test sets
are never used for the choice. `python benchmarks/baselines.py --sweep` runs it and writes CHOICES_FILE.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# the defaults: a stream without a sweep choice uses them
HYPER = {"ewc_lambda": 10000.0, "si_lambda": 100.0, "lwf_alpha": 1.0, "packnet_prune": 0.5, "hat_c": 0.75}
# The same budget for each swept method: its main hyper-parameter, 4 values, one seed, a validation split of the
# training data. EWC's and SI's penalty weights have no natural scale: a decade apart (EWC's from 1: at 1e4 it
# diverges with this SGD); LwF's alpha, PackNet's pruned share per task and HAT's c around their defaults (1, 0.5
# and 0.75). Every method that stores no data and has a hyper-parameter is swept (Naive has none).
GRIDS = {"ewc": ("ewc_lambda", (1.0, 10.0, 100.0, 1000.0)), "si": ("si_lambda", (10.0, 100.0, 1000.0, 10000.0)),
         "lwf": ("lwf_alpha", (0.3, 1.0, 3.0, 10.0)), "packnet": ("packnet_prune", (0.2, 0.4, 0.6, 0.8)),
         "hat": ("hat_c", (0.1, 0.25, 0.75, 2.5))}
VALIDATION_SHARE = 0.2
CHOICES_FILE = "baselines_sweep.json"


def si_snapshot_is_a_view() -> bool:
    """Avalanche 0.6's SI snapshots weights as `param.detach().cpu().flatten()`: on CPU a view of the live weights."""
    from avalanche.training.plugins import SynapticIntelligencePlugin
    from avalanche.training.utils import ParamData

    layer = nn.Linear(2, 2)
    target = {name: ParamData(name, p.flatten().shape) for name, p in layer.named_parameters()}
    SynapticIntelligencePlugin.extract_weights(layer, target, set())
    return target["weight"].data.data_ptr() == layer.weight.data_ptr()


def fix_si() -> None:
    """Two fixes to Avalanche 0.6's SI (see breakage()). 1: its snapshots made copies (as shipped, on CPU the
    start-of-task and before/after-step weights follow the parameters: path integral and penalty exactly 0, SI
    trains like Naive). 2: importances clamped at 0 from below as well (it clamps them at 0.001 from above only;
    with SGD momentum some path integrals come out positive, a negative importance makes the penalty unbounded
    below and training diverges to NaN within 3-5 tasks)."""
    from avalanche.training.plugins import SynapticIntelligencePlugin as SI

    if getattr(SI, "_hatify_fixed", False):
        return
    update_importances = SI.update_ewc_data

    @torch.no_grad()
    def extract_weights(model: nn.Module, target: dict, excluded_parameters: set) -> None:
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().flatten().clone().cpu()

    @torch.no_grad()
    def update_ewc_data(net: nn.Module, ewc_data: tuple, *args, **kwargs) -> None:
        update_importances(net, ewc_data, *args, **kwargs)
        for importance in ewc_data[1].values():
            importance.data = importance.data.clamp(min=0.0)

    # SI calls both by class name: a subclass would not do
    SI.extract_weights, SI.update_ewc_data = staticmethod(extract_weights), staticmethod(update_ewc_data)
    SI._hatify_fixed = True


def validation_split(tasks: list) -> list:
    """Each task's training set cut in two (shuffled, fixed): train on the first part, score on the held-out one."""
    out = []
    for x, y, _, _ in tasks:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        cut = len(y) - int(VALIDATION_SHARE * len(y))
        out.append((x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]))
    return out


def choose(sweep_runs: list[dict]) -> tuple[dict, list[str]]:
    """The best grid value per stream, network and method by validation ACC; the sweep's Markdown table."""
    table: dict[tuple, dict[float, dict]] = {}
    for run in sweep_runs:
        key = (run["benchmark"], run["network"], run["method"])
        table.setdefault(key, {})[next(iter(run["hyper"].values()))] = run
    choices, lines = {}, []
    for (bench, network, method), by_value in sorted(table.items()):
        name = GRIDS[method][0]
        scored = {v: (r["acc"] if "acc" in r and not r.get("nonfinite_weights") else -1.0) for v, r in by_value.items()}
        best = max(sorted(scored), key=lambda v: scored[v])  # ties: the smallest value
        choices[f"{bench}/{network}/{method}"] = {name: best}
        cells = [("diverged" if r.get("nonfinite_weights") else f"{r['acc']:.4f} / {r['bwt']:+.4f}")
                 if "acc" in r else "failed" for _, r in sorted(by_value.items())]
        lines.append(f"| {bench} | {network} | {method} | " + " | ".join(cells) + f" | {best:g} |")
    return choices, lines


def sweep_section(sweep: dict | None) -> list[str]:
    """The sweep's figures and choices as a Markdown section (nothing without a sweep)."""
    if not sweep:
        return []
    grids = "; ".join(f"{m} {name} in {', '.join(f'{v:g}' for v in values)}" for m, (name, values) in GRIDS.items())
    head = "| benchmark | network | method | " + " | ".join(f"value {i + 1}" for i in range(4)) + " | chosen |"
    return ["", "## Hyper-parameter sweep (validation split, seed 0)", "",
            f"Command: `{sweep['command']}`. Grids: {grids} (the cells in this order). Each cell: validation ACC / "
            f"BWT of one run trained on {1 - VALIDATION_SHARE:.0%} of each task's training set and scored on the "
            f"other {VALIDATION_SHARE:.0%}; the value with the best ACC is used for every seed of the table above.",
            "", head, "|---|---|---|" + "---:|" * 4 + "---:|"] + choose(sweep["runs"])[1] + _sweep_notes(sweep)


def _sweep_notes(sweep: dict) -> list[str]:
    """The diverged cells and the choices at an end of their grid (a wider grid might do better there)."""
    diverged = [f"{r['method']} {next(iter(r['hyper'].values())):g} on {r['benchmark']}/{r['network']}"
                for r in sweep["runs"] if r.get("nonfinite_weights")]
    edges = []
    for key, chosen in sorted(sweep["choices"].items()):
        setting, method = key.rsplit("/", 1)
        if next(iter(chosen.values())) in (GRIDS[method][1][0], GRIDS[method][1][-1]):
            edges.append(f"{method} on {setting}")
    return ["", f"Diverged (non-finite weights at the end; SGD lr 0.05, momentum 0.9): "
            f"{'; '.join(diverged) or 'none'}. "
            f"Chosen at an end of its grid: {'; '.join(edges) or 'none'}."]


def hyper_text(rows: list[dict], method: str) -> dict[str, str]:
    """Each setting's value as the table used it: one value, or the value per stream and network."""
    out = {}
    for name, default in HYPER.items():
        used = {f"{r['benchmark']}/{r['network']}": r.get("hyper", {}).get(name, default)
                for r in rows if r["method"] == method}
        if len(set(used.values())) <= 1:
            out[name] = f"{next(iter(used.values()), default):g}"
        else:
            out[name] = "per stream by the sweep below (" + ", ".join(f"{k} {v:g}" for k, v in used.items()) + ")"
    return out


def job_key(item: tuple | dict) -> tuple:
    """Stream, network, method, seed, epochs and every hyper-parameter, of a job tuple or a saved run."""
    if isinstance(item, dict):
        item = (item["benchmark"], item["network"], item["method"], item["seed"], item["epochs"], item["hyper"])
    return (*item[:5], tuple(sorted({**HYPER, **item[5]}.items())))


def reusable(path: Path, jobs: list[tuple]) -> list[dict]:
    """The saved runs that match a job exactly. Runs saved without `hyper` used HYPER; SI's runs saved before
    `fix_si` (no `hyper` key) trained with the broken plugin and are never reused."""
    wanted = {job_key(j) for j in jobs}
    runs = [{**r, "hyper": r.get("hyper", {})} for r in json.loads(path.read_text())["runs"]
            if "error" not in r and not (r["method"] == "si" and "hyper" not in r)]
    return [r for r in runs if job_key(r) in wanted]


def merge_runs(paths: list[Path]) -> tuple[list[dict], dict, str]:
    """The runs of several saved JSONs; a later file's runs replace the earlier ones of the same setting."""
    runs: list[dict] = []
    commands, settings = [], None
    for path in paths:
        saved = json.loads(path.read_text())
        saved_meta = saved.get("meta", saved)
        new = saved["runs"]
        replaced = {(r["benchmark"], r["network"], r["method"]) for r in new}
        runs = [r for r in runs if (r["benchmark"], r["network"], r["method"]) not in replaced] + new
        commands.append(saved_meta["command"])
        settings = settings or dict(saved_meta["settings"])
    settings["note"] = (f"{len(runs)} runs from {', '.join(p.name for p in paths)} (a later file's runs replace an "
                        "earlier one's for the same stream, network and method)")
    return runs, settings, " ; then ".join(commands)
