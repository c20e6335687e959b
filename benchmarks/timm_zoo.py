"""timm zoo: every timm architecture family, its smallest variant, three checks.

For each family (a module of `timm.models` that registers models) the smallest variant (parameters
counted on the meta device, `test_*` debug models excluded while a real one exists) is created at the
smallest input it accepts from a short ladder, converted with `hatify.hatify`, then:

1. convert   `hatify.hatify(model, num_tasks=2, example_inputs=(x,))` succeeds;
2. validate  `hatify.validate(...)` passes (open masks equal the original, probes sound, gradients);
3. protect   tasks 0 and 1 train a few steps with ONE AdamW(weight_decay=0.01) optimizer and task 0's
             eval outputs stay bit-identical (`torch.equal`).

Each family runs in its own subprocess with a timeout, so one family never takes the run down. Results:
benchmarks/results/timm_zoo.json and .md; also the conversion time of resnet50 at 224 (median of 3).

    python benchmarks/timm_zoo.py                         # the whole zoo
    python benchmarks/timm_zoo.py --families resnet,vgg   # some families
    python benchmarks/timm_zoo.py --limit 10 --jobs 2
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (56, 64, 96, 112, 128, 160, 192, 224)  # 56 and 112: patch 14
NUM_CLASSES = 4
BIG_PARAMS = 100_000_000  # families this big run alone (training one takes up to ~20 GB)
TRAIN_STEPS = 3

# Stable reason codes of the failures (the table shows the code and a one-line why).
REASONS = {
    "create_error": "no variant of the family could be created",
    "no_input_size": "no input size from the ladder runs through the original model",
    "convert_error": "hatify.hatify raised",
    "open_mismatch": "open masks do not reproduce the original outputs",
    "probe_violation": "a unit the plan predicts zero is not zero at run time",
    "missing_gradient": "an original parameter gets no gradient through the converted model",
    "validate_error": "hatify.validate raised",
    "train_error": "the training loop raised",
    "forgot_task0": "task 0's eval outputs changed after training task 1",
    "timeout": "the family ran past its time limit",
    "crashed": "the worker process died (out of memory or a native crash)",
}


# ------------------------------------------------------------------------------------------ families

def families() -> dict[str, list[str]]:
    """Family (the timm.models module that registers it) -> its model names."""
    import timm
    return {module: timm.list_models(module=module) for module in timm.list_modules()
            if timm.list_models(module=module)}


def _count_on_meta(name: str) -> int | None:
    import timm
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=NUM_CLASSES)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def param_counts(names: list[str], cache_path: Path) -> dict[str, int | None]:
    """Parameter count of each model, made on the meta device (no memory); cached per timm version."""
    import timm
    cache: dict = {}
    if cache_path.exists():
        cache = json.loads(cache_path.read_text())
    if cache.get("timm") != timm.__version__:
        cache = {"timm": timm.__version__, "counts": {}}
    missing = [n for n in names if n not in cache["counts"]]
    for name in missing:
        cache["counts"][name] = _count_on_meta(name)
    if missing:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=0, sort_keys=True))
    return {n: cache["counts"][n] for n in names}


def smallest_variant(names: list[str], counts: dict[str, int | None]) -> list[str]:
    """The family's models, smallest first (real models before `test_*` debug models, unknown counts last)."""
    return sorted(names, key=lambda n: (n.startswith("test_"), counts.get(n) is None, counts.get(n) or 0, n))


# ------------------------------------------------------------------------------------------ checks

def ladder(default: int) -> list[int]:
    """Input sizes to try, smallest first: the fixed ladder plus k/8 of the model's default size (so patch
    sizes like 14 and windows like 7 find a fit), never above the default."""
    derived = {default * k // 8 for k in range(2, 9) if default * k % 8 == 0}
    return sorted(s for s in set(SIZES) | derived | {default} if s <= default)


def make_model(name: str, sizes=None, **extra: Any) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """Create `name` (with `extra` keyword arguments) at the smallest input size its forward accepts, from
    `sizes` (default: `ladder`); the eval model, an example input of batch 2, and the keyword arguments used.
    A model with an `img_size` argument is built for each size; otherwise one model tries every size."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    default = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    last_error: BaseException | None = None
    plain, sized = None, True

    def create(**kwargs: Any) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, num_classes=NUM_CLASSES, **extra, **kwargs).eval()

    def runs(model: torch.nn.Module, size: int) -> torch.Tensor | None:
        nonlocal last_error
        x = torch.randn(2, default[0], size, size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as exc:  # this size does not fit the model
            last_error = exc
            return None

    for size in (ladder(default[-1]) if sizes is None else [*sorted(sizes), default[-1]]):
        if sized:
            try:
                model = create(img_size=size)
            except Exception as exc:
                last_error, sized = exc, not (isinstance(exc, TypeError) and "img_size" in str(exc))
            else:
                x = runs(model, size)
                if x is not None:
                    return model, x, {**extra, "img_size": size}
                del model
        if plain is None:
            plain = create()
        x = runs(plain, size)
        if x is not None:
            return plain, x, dict(extra)
        gc.collect()
    raise _Fail("no_input_size", f"{type(last_error).__name__}: {_first_line(last_error)}")


class _Fail(Exception):
    def __init__(self, code: str, why: str) -> None:
        super().__init__(f"{code}: {why}")
        self.code, self.why = code, why


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines() if exc is not None else []
    return (text[0] if text else "")[:200]


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    from torch.utils import _pytree as pytree
    terms = []
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad and leaf.numel():
            if leaf.ndim == 2 and leaf.shape == (y.shape[0], NUM_CLASSES):
                terms.append(torch.nn.functional.cross_entropy(leaf.float(), y))
            else:
                terms.append(leaf.float().square().mean())
    return sum(terms)


def _equal(a: Any, b: Any) -> bool:
    from torch.utils import _pytree as pytree
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
                                      for u, v in zip(la, lb))


def _call(hat, x: Any, **task: Any) -> Any:
    """`hat` called on `x`: one input, a tuple of inputs, or a dict of keyword inputs."""
    if isinstance(x, dict):
        return hat(**x, **task)
    return hat(*x, **task) if isinstance(x, tuple) else hat(x, **task)


def _noised(x: Any, gen: torch.Generator) -> Any:
    """A new batch like `x`: every floating tensor (a tensor, a tuple or dict of them, a list of images) plus a
    little noise; integer inputs (ids, masks) stay."""
    from torch.utils import _pytree as pytree
    return pytree.tree_map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen)
                           if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def train_and_check(hat, x: Any, steps: int = TRAIN_STEPS, train_mode: bool = True) -> bool:
    """Tasks 0 and 1, `steps` batches each, one AdamW(weight_decay=0.01) for both; True when task 0's eval
    outputs after task 1 are bit-identical to those right after task 0. `x` is the input, a tuple of the
    inputs, or a dict of keyword inputs (`hat(**x, task_id=t)`); `train_mode=False` trains with the model's
    layers in eval mode, on its eval outputs (detectors need targets in train mode)."""
    gen = torch.Generator().manual_seed(1)
    values = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, tuple) else [x]
    first = next(v for v in values if isinstance(v, (torch.Tensor, list)))
    batch = len(first) if isinstance(first, list) else first.shape[0]
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-3, weight_decay=0.01)
    after_task0 = None
    for t in range(2):
        hat.train()
        if not train_mode:  # the model's layers in eval mode; HAT's mask bank trains (regulariser)
            hat.net.eval()
            hat.masks.train()
        hat.begin_task(t)
        for b in range(steps):
            y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
            loss = _loss(_call(hat, _noised(x, gen), task_id=t, mask_scale=hat.mask_scale(b, steps)), y) + \
                hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        if t == 0:
            hat.eval()
            with torch.no_grad():
                after_task0 = _call(hat, x, task_id=0)
    hat.eval()
    with torch.no_grad():
        return _equal(_call(hat, x, task_id=0), after_task0)


def check_model(name: str, sizes=None, **extra: Any) -> dict:
    """Create, convert, validate and train one model; a result row (status "pass" or "fail" + reason)."""
    row: dict = {"model": name, "status": "fail", "reason": "", "why": ""}
    try:
        try:
            model, x, kwargs = make_model(name, sizes, **extra)
        except _Fail:
            raise
        except Exception as exc:
            raise _Fail("create_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        row.update(input=list(x.shape), kwargs=kwargs)
        check_converted(model, (x,), row)
    except _Fail as fail:
        row["reason"], row["why"] = fail.code, fail.why
    return row


def check_converted(model: torch.nn.Module, inputs: tuple, row: dict, train_mode: bool = True) -> dict:
    """The three checks on a created model: convert, validate, task 0 kept. Fills `row` (status "pass");
    raises `_Fail` with the reason code otherwise."""
    import hatify
    from hatify.validate import ValidationResult

    row["params"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        hat = hatify.hatify(model, num_tasks=2, example_inputs=inputs)
    except Exception as exc:
        raise _Fail("convert_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
    row["convert_s"] = round(time.perf_counter() - start, 3)
    row.update(_summary(hat))
    try:
        result: ValidationResult = hatify.validate(model, hat, inputs)
    except Exception as exc:
        raise _Fail("validate_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
    row["max_abs_diff"] = result.largest_difference
    row["validate"] = result.passed
    if not result.passed:
        code = "open_mismatch" if any(m.startswith("output") for m in result.messages) else \
            "probe_violation" if result.probe_violations else "missing_gradient"
        raise _Fail(code, "; ".join(result.messages)[:200])
    try:
        kept = train_and_check(hat, inputs if len(inputs) > 1 or isinstance(inputs[0], list) else inputs[0],
                               train_mode=train_mode)
    except Exception as exc:
        raise _Fail("train_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if not kept:
        raise _Fail("forgot_task0", REASONS["forgot_task0"])
    row["status"] = "pass"
    return row


def _summary(hat) -> dict:
    s = hat.report.summary
    plan = hat.plan
    fallback = sum(m.params for m in plan.modules if m.reason.startswith("opaque")) + \
        sum(math.prod(p.shape) for p in plan.params if p.policy != "head")
    return {"nodes": s["nodes"], "hat_layers": s["hat_layers"], "hat_share": round(s["hat_parameter_share"], 4),
            "fallback_params": fallback, "fallback_share": round(fallback / max(1, s["original_parameters"]), 4),
            "opaque": dict(plan.opaque), "unknown_ops": s["unknown_ops"]}


# ------------------------------------------------------------------------------------------ driver

def _worker(family: str, names: list[str], out_path: str) -> None:
    """Subprocess entry: check the first model of `names` that can be created; write the row as JSON."""
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    torch.manual_seed(0)
    row = None
    for name in names[:3]:  # a variant that cannot be created at all: fall back to the next smallest
        row = check_model(name)
        if row["reason"] != "create_error":
            break
    row["family"] = family
    Path(out_path).write_text(json.dumps(row))


def run_family(family: str, names: list[str], timeout: float, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out_path = tmp.name
    env = {**os.environ, "ZOO_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", family, "--names", ",".join(names),
                               "--out", out_path], capture_output=True, text=True, timeout=timeout, env=env)
        text = Path(out_path).read_text() if Path(out_path).stat().st_size else ""
        if text:
            row = json.loads(text)
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            row = {"family": family, "model": names[0], "status": "fail", "reason": "crashed",
                   "why": f"exit {proc.returncode}: {tail[-1][:200] if tail else ''}"}
    except subprocess.TimeoutExpired:
        row = {"family": family, "model": names[0], "status": "fail", "reason": "timeout",
               "why": f"no result within {timeout:.0f} s"}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


class Slots:
    """Worker slots: a family takes one, a big one (memory) takes them all; waiting big ones go first."""

    def __init__(self, count: int) -> None:
        self.count, self.free, self.big_waiting = count, count, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, big: bool):
        need = self.count if big else 1
        with self.cond:
            self.big_waiting += big
            self.cond.wait_for(lambda: self.free >= need and (big or not self.big_waiting))
            self.big_waiting -= big
            self.free -= need
        try:
            yield
        finally:
            with self.cond:
                self.free += need
                self.cond.notify_all()


def time_resnet50(repeats: int = 3) -> dict:
    """Conversion time of timm resnet50 at 224, median of `repeats` (after one warm-up conversion), without the
    default validation (`median_s`) and the validation's own time (`validation_median_s`)."""
    import timm

    import hatify
    model = timm.create_model("resnet50").eval()
    x = torch.randn(2, 3, 224, 224)
    hatify.hatify(model, num_tasks=2, example_inputs=(x,), validate=False)
    times, checks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,), validate=False)
        times.append(time.perf_counter() - start)
        checks.append(hatify.hatify(model, num_tasks=2, example_inputs=(x,)).report.validation["seconds"])
    return {"model": "resnet50", "input": [2, 3, 224, 224], "median_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times], "validation_median_s": round(statistics.median(checks), 3),
            "threads": torch.get_num_threads()}


COLUMNS = ("family", "model", "input", "status", "reason", "nodes", "hat_layers", "hat_share", "fallback_params",
           "convert_s", "why")


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if key == "input":
        return "x".join(str(v) for v in value[2:])
    if key == "hat_share":
        return f"{100 * value:.1f}%"
    if key == "fallback_params":
        return f"{value:,}"
    return str(value)


def render_table(rows: list[dict]):
    from rich.table import Table
    table = Table(title="hatify x timm: one row per family")
    for col in COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col not in ("why",))
    for row in rows:
        cells = [_cell(row, c) for c in COLUMNS]
        cells[3] = "[green]pass[/]" if row["status"] == "pass" else "[red]fail[/]"
        table.add_row(*cells)
    return table


def share_line(rows: list[dict], key: str = "hat_share", name: str = "model") -> str:
    """The median and the lowest share of parameters under HAT over the zoo's models (each at its lowest setting)."""
    lowest: dict[str, float] = {}
    for r in rows:
        if r.get(key) is not None:
            lowest[r[name]] = min(lowest.get(r[name], 1.0), r[key])
    if not lowest:
        return ""
    low = min(lowest, key=lowest.get)
    return (f"Share of parameters under HAT over {len(lowest)} models: median "
            f"{statistics.median(lowest.values()):.1%}, lowest {lowest[low]:.1%} ({low}).")


def write_results(rows: list[dict], timing: dict | None, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    passed = sum(r["status"] == "pass" for r in rows)
    payload = {**meta, "passed": passed, "total": len(rows), "resnet50_conversion": timing,
               "reasons": REASONS, "families": rows}
    (RESULTS / "timm_zoo.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# hatify x timm zoo", "",
             f"timm {meta['timm']}, torch {meta['torch']}; {passed} / {len(rows)} families pass all three checks "
             f"(convert, validate, task 0 bit-identical after task 1 with one AdamW(weight_decay=0.01)). "
             f"{share_line(rows)}", ""]
    if timing:
        lines += [f"resnet50 at 224: conversion {timing['median_s']:.3f} s, plus {timing['validation_median_s']:.3f} s "
                  f"for the default validation (medians of {len(timing['times_s'])}, {timing['threads']} threads).", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c).replace("|", "/") for c in COLUMNS) + " |")
    lines += ["", "## Reason codes", ""] + [f"- `{code}`: {why}" for code, why in REASONS.items()]
    (RESULTS / "timm_zoo.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N families")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per family")
    parser.add_argument("--jobs", type=int, default=1, help="families run side by side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per family (default: cores / jobs)")
    parser.add_argument("--no-timing", action="store_true", help="skip the resnet50 conversion timing")
    parser.add_argument("--merge", action="store_true", help="update the rows of an existing timm_zoo.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.names.split(","), args.out)
        return 0

    import timm
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=max(160, Console().width))
    all_families = families()
    chosen = sorted(all_families)
    if args.families:
        wanted = args.families.split(",")
        unknown = [f for f in wanted if f not in all_families]
        if unknown:
            console.print(f"[red]unknown families: {', '.join(unknown)}[/]")
            return 2
        chosen = wanted
    if args.limit:
        chosen = chosen[: args.limit]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    with console.status("counting parameters on the meta device (cached)"):
        counts = param_counts([n for f in chosen for n in all_families[f]], RESULTS / "timm_param_counts.json")
    rows: dict[str, dict] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("timm zoo", total=len(chosen))
        slots = Slots(args.jobs)

        def run(family: str) -> dict:
            names = smallest_variant(all_families[family], counts)
            big = (counts.get(names[0]) or 0) > BIG_PARAMS
            with slots.take(big):
                return run_family(family, names, args.timeout, args.threads or (os.cpu_count() or 1) if big else threads)

        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run, f): f for f in chosen}
            for future in as_completed(futures):
                family = futures[future]
                row = future.result()
                rows[family] = row
                mark = "[green]pass[/]" if row["status"] == "pass" else f"[red]{row['reason']}[/]"
                progress.console.print(f"{family:28s} {row['model']:40s} {mark} {row['seconds']:.0f} s")
                progress.advance(bar)
    ordered = [rows[f] for f in chosen]
    if args.merge and (RESULTS / "timm_zoo.json").exists():
        old = {r["family"]: r for r in json.loads((RESULTS / "timm_zoo.json").read_text())["families"]}
        old.update(rows)
        ordered = [old[f] for f in sorted(old)]
    timing = None
    if not args.no_timing:
        torch.set_num_threads(os.cpu_count() or 1)
        with console.status("timing resnet50 conversion"):
            timing = time_resnet50()
    elif args.merge and (RESULTS / "timm_zoo.json").exists():
        timing = json.loads((RESULTS / "timm_zoo.json").read_text()).get("resnet50_conversion")
    console.print(render_table(ordered))
    passed = sum(r["status"] == "pass" for r in ordered)
    console.print(f"[bold]{passed} / {len(ordered)}[/] families pass all three checks")
    if timing:
        console.print(f"resnet50 at 224: conversion {timing['median_s']:.3f} s, validation "
                      f"{timing['validation_median_s']:.3f} s (medians of 3)")
    write_results(ordered, timing, {"timm": timm.__version__, "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
