"""What `torch.compile` gives on the overhead benchmark's models: compiled against eager, for HAT and plain.

    .venv/bin/python benchmarks/compile.py [--threads 1] [--quick] [--only mlp,resnet18] [--out DIR]

Each case builds the plain model and its HAT conversion exactly as overhead.py does (`overhead.prepare`: task 0
trained and ended, task 1 begun, protection active), twice: one copy runs eager, the other under
`torch.compile` (inductor, CPU; the model is compiled, the optimizer is not). The four variants (HAT eager,
HAT compiled, plain eager, plain compiled) run interleaved in one process with `overhead.measure` (process CPU
time, median over the rounds; wall time is in the JSON too), with the same number of torch threads.
Training: task 1, loss + `hat.regularization()`, SGD with momentum (`overhead.training_steps`). Inference:
eval mode, no grad, binary masks, task 0. Speed-up = eager / compiled.
Also recorded: the one-off compile time (wall seconds of the first compiled training step and of the first
compiled inference call, on a fresh, empty inductor cache), and Dynamo's unique graphs after warming up every
task id once, after switching task ids and mask scales, and after the timed rounds (they must not grow).
Checked inside the run: compiled inference for task 0 matches eager (atol/rtol 1e-4), and task 0's compiled
output is bit-identical before and after the timed task-1 training steps (a failed check ends that case and
makes the exit status 1; new graphs after the warm-up are reported, not fatal). A case that fails to compile (an
error, or longer than --compile-limit seconds) is recorded with its reason; the other cases go on.
Writes benchmarks/results/compile.json and compile.md (compile_quick.* with --quick; --only adds a suffix).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CASES, NUM_TASKS, RESULTS, Case, environment, measure, prepare, training_steps  # noqa: E402

DEFAULT_CASES = ("mlp", "cnn", "resnet18", "vit_tiny")
WARMUP_SCALES = (None, 1.0, 2.0)             # first visit of every task id: binary masks and two soft scales
SWITCH_SCALES = (None, 0.5, 3.0, 400.0)
SWITCH_ORDER = tuple((3 * k + NUM_TASKS - 1) % NUM_TASKS for k in range(NUM_TASKS + 1))  # jumps across ids
TOLERANCE = 1e-4


class CompileTimeout(Exception):
    pass


class CheckFailed(Exception):
    pass


@dataclass
class Side:
    """One copy of a case's plain model and HAT model (overhead.prepare), run eager or under torch.compile,
    with its own training steps and optimizers (overhead.training_steps)."""
    plain: nn.Module
    hat: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    compiled: bool
    plain_fwd: Callable = field(init=False)   # the module, or torch.compile(module)
    hat_fwd: Callable = field(init=False)
    plain_step: Callable[[], object] = field(init=False)
    hat_step: Callable[[], object] = field(init=False)

    def __post_init__(self) -> None:
        self.plain_fwd = torch.compile(self.plain) if self.compiled else self.plain
        self.hat_fwd = torch.compile(self.hat) if self.compiled else self.hat
        self.plain_step, self.hat_step = training_steps(self.plain_fwd, self.hat_fwd, self.x, self.y)

    def train(self) -> None:
        self.plain.train()
        self.hat.train()

    def eval(self) -> None:
        self.plain.eval()
        self.hat.eval()

    @torch.no_grad()
    def plain_infer(self) -> torch.Tensor:
        return self.plain_fwd(self.x)

    @torch.no_grad()
    def hat_infer(self, task_id: int = 0, mask_scale: float | None = None) -> torch.Tensor:
        return self.hat_fwd(self.x, task_id=task_id, mask_scale=mask_scale)


def build(case: Case, compiled: bool) -> Side:
    return Side(*prepare(case), compiled=compiled)


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after `seconds` of wall time."""
    def expire(signum, frame):
        raise CompileTimeout(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def first_call(fn: Callable[[], object], limit: int, what: str) -> tuple[float, object]:
    """Wall seconds of one call (the compile, for a compiled function that has not run yet) and its result."""
    with time_limit(limit, what):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


class RecompileLimitHits(logging.Handler):
    """Dynamo's warning that a function hit config.recompile_limit: from then on that function runs eager, so
    a "compiled" time would be partly eager."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.hits.append(" ".join(line.strip() for line in message.splitlines()[:2]))

    @classmethod
    @contextlib.contextmanager
    def watching(cls) -> Iterator["RecompileLimitHits"]:
        handler, logger = cls(), logging.getLogger("torch._dynamo.convert_frame")
        logger.addHandler(handler)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)


def warm_inductor() -> float:
    """Compile a throwaway function so the first model compile does not pay inductor's start-up (imports,
    compile workers, the C++ toolchain probe); returns its wall seconds."""
    start = time.perf_counter()
    torch.compile(lambda t: torch.relu(t) * 2 + 1)(torch.randn(8))
    return time.perf_counter() - start


def short(error: BaseException) -> str:
    """The error in one line (Dynamo appends hints about verbose logging on later lines)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = f"{type(error).__name__}: {first}"
    return text if len(text) <= 600 else text[:600] + " ..."


def timed_out(error: BaseException | None) -> bool:
    """Whether CompileTimeout is in the chain (Dynamo and inductor wrap what a compile raises)."""
    while error is not None:
        if isinstance(error, CompileTimeout) or "CompileTimeout" in str(error).split("\n", 1)[0]:
            return True
        error = error.__cause__ or error.__context__
    return False


# ---------------------------------------------------------------------------------------------- one case
def compile_phase(comp: Side, limit: int, result: dict) -> torch.Tensor:
    """First compiled calls (timed), the correctness check against eager, and the warm-up over every task id.
    Returns task 0's compiled inference output (binary masks) before any timed training."""
    compile_s = result["compile_s"]
    result["stage"] = "compile: training step"
    comp.train()
    compile_s["hat train"], _ = first_call(comp.hat_step, limit, "HAT training-step compile")
    compile_s["plain train"], _ = first_call(comp.plain_step, limit, "plain training-step compile")
    result["stage"] = "compile: inference"
    comp.eval()
    compile_s["hat inference"], before = first_call(comp.hat_infer, limit, "HAT inference compile")
    compile_s["plain inference"], _ = first_call(comp.plain_infer, limit, "plain inference compile")
    result["stage"] = "check: compiled inference against eager"
    check_close(comp, result, "before training")
    result["stage"] = "warm-up: second training step"
    comp.train()
    compile_s["hat train, second step (new mask scale)"], _ = first_call(comp.hat_step, limit,
                                                                          "second HAT training step")
    result["stage"] = "warm-up: every task id"
    with time_limit(limit, "warm-up over every task id"):
        start = time.perf_counter()
        comp.eval()
        for t in range(NUM_TASKS):
            for s in WARMUP_SCALES:
                comp.hat_infer(t, s)
        compile_s["hat inference warm-up, all task ids"] = time.perf_counter() - start
    result["unique_graphs"]["after warm-up"] = unique_graphs()
    result["stage"] = "switching task ids and mask scales"
    with time_limit(limit, "switching task ids and mask scales"):
        for t in SWITCH_ORDER:
            for s in SWITCH_SCALES:
                comp.hat_infer(t, s)
    result["unique_graphs"]["after switching"] = unique_graphs()
    return before


def check_close(comp: Side, result: dict, when: str) -> None:
    """Compiled task-0 inference against the same model run eager."""
    with torch.no_grad():
        compiled = comp.hat_infer(0)
        reference = comp.hat(comp.x, task_id=0)
    diff = (compiled - reference).abs().max().item()
    result["checks"][f"max |compiled - eager|, task 0, {when}"] = diff
    try:
        torch.testing.assert_close(compiled, reference, atol=TOLERANCE, rtol=TOLERANCE)
    except AssertionError as error:
        raise CheckFailed(f"compiled task-0 inference differs from eager ({when}): {error}") from None


def timed_phase(eager: Side, comp: Side, rounds: int, before: torch.Tensor, result: dict) -> None:
    result["stage"] = "timed training"
    eager.train()
    comp.train()
    result["train"] = measure({"hat eager": eager.hat_step, "hat compiled": comp.hat_step,
                               "plain eager": eager.plain_step, "plain compiled": comp.plain_step}, rounds)
    result["unique_graphs"]["after timed training"] = unique_graphs()
    result["stage"] = "check: task 0 after training task 1"
    eager.eval()
    comp.eval()
    after = comp.hat_infer(0)
    result["checks"]["task 0 compiled output bit-identical after task-1 training"] = torch.equal(before, after)
    if not torch.equal(before, after):
        raise CheckFailed("task 0's compiled output changed while training task 1 (protection broken under compile); "
                          f"max |diff| {(before - after).abs().max().item():.3g}")
    check_close(comp, result, "after training")
    result["stage"] = "timed inference"
    result["inference"] = measure({"hat eager": eager.hat_infer, "hat compiled": comp.hat_infer,
                                   "plain eager": eager.plain_infer, "plain compiled": comp.plain_infer}, rounds)
    result["unique_graphs"]["after timed inference"] = unique_graphs()


def figures(result: dict) -> None:
    """Speed-ups (eager / compiled) and HAT / plain ratios from the medians."""
    for phase in ("train", "inference"):
        ms = {k: v["cpu_ms"] for k, v in result[phase].items()}
        result[f"{phase}_speedup"] = {"hat": ms["hat eager"] / ms["hat compiled"],
                                      "plain": ms["plain eager"] / ms["plain compiled"]}
        result[f"{phase}_hat_over_plain"] = {"eager": ms["hat eager"] / ms["plain eager"],
                                             "compiled": ms["hat compiled"] / ms["plain compiled"]}


def run_case(case: Case, quick: bool, limit: int) -> dict:
    rounds = max(3, case.rounds // 4) if quick else case.rounds
    result: dict = {"input_shape": list(case.input_shape), "rounds": rounds, "status": "ok", "stage": "build",
                    "compile_s": {}, "unique_graphs": {}, "checks": {}}
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), RecompileLimitHits.watching() as limit_hits:
        try:
            result["inductor_warmup_s"] = warm_inductor()
            torch._dynamo.reset()
            counters.clear()
            eager, comp = build(case, compiled=False), build(case, compiled=True)
            before = compile_phase(comp, limit, result)
            timed_phase(eager, comp, rounds, before, result)
            figures(result)
            graphs = result["unique_graphs"]
            result["checks"]["no new graphs after warm-up"] = max(graphs.values()) == graphs["after warm-up"]
        except CheckFailed as error:
            result["status"] = "check failed"
            result["failure"] = {"stage": result["stage"], "reason": short(error)}
        except Exception as error:  # noqa: BLE001 - a failed compile is a result, not a crash
            result["status"] = "timeout" if timed_out(error) else "failed"
            result["failure"] = {"stage": result["stage"], "reason": short(error),
                                 "traceback_tail": traceback.format_exc().splitlines()[-12:]}
        finally:
            result["graph_breaks"] = graph_breaks()
            result["unique_graphs_total"] = unique_graphs()
            result["recompile_limit_hits"] = limit_hits.hits
            torch._dynamo.reset()
    del result["stage"]
    return result


# ---------------------------------------------------------------------------------------------- output
def compile_environment(threads: int) -> dict:
    import torch._inductor.config as inductor

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return "?"

    changed = run("git", "status", "--porcelain", "--", "../hatify")
    return {**environment(threads),
            "hatify_tree": "uncommitted changes in hatify/: " + ", ".join(
                line[3:] for line in changed.splitlines()) if changed else "clean",
            "gcc": run("gcc", "--version").splitlines()[0] if run("gcc", "--version") else "?",
            "backend": "inductor (CPU, C++/OpenMP)", "inductor_compile_threads": inductor.compile_threads,
            "recompile_limit": torch._dynamo.config.recompile_limit,
            "compile_cache": "fresh empty inductor cache per case (torch._inductor.utils.fresh_cache)"}


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def timing_rows(results: dict, phase: str) -> list[list[str]]:
    rows = []
    for name, r in results["cases"].items():
        shape = "x".join(map(str, r["input_shape"]))
        if phase not in r or f"{phase}_speedup" not in r:
            rows.append([name, shape, r["status"]] + ["-"] * 7)
            continue
        ms = {k: v["cpu_ms"] for k, v in r[phase].items()}
        up, ratio = r[f"{phase}_speedup"], r[f"{phase}_hat_over_plain"]
        rows.append([name, shape, fmt(ms["hat eager"]), fmt(ms["hat compiled"]), f"{up['hat']:.2f}x",
                     fmt(ms["plain eager"]), fmt(ms["plain compiled"]), f"{up['plain']:.2f}x",
                     f"{ratio['eager']:.3f}", f"{ratio['compiled']:.3f}"])
    return rows


TIMING_COLUMNS = ("model", "input", "HAT eager", "HAT compiled", "HAT speed-up", "plain eager", "plain compiled",
                  "plain speed-up", "HAT/plain eager", "HAT/plain compiled")
COMPILE_COLUMNS = ("model", "status", "HAT train s", "HAT 2nd step s", "HAT infer s", "HAT infer, all task ids s",
                   "plain train s", "plain infer s", "unique graphs: warm-up / switched / timed", "stable",
                   "graph breaks", "limit hits", "max abs diff vs eager", "task 0 bit-identical")


def yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def compile_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results["cases"].items():
        c, g, checks = r["compile_s"], r["unique_graphs"], r["checks"]
        graphs = " / ".join(str(g[k]) for k in ("after warm-up", "after switching", "after timed inference")
                            if k in g) or f"- (total {r['unique_graphs_total']})"
        diffs = [v for k, v in checks.items() if k.startswith("max")]
        rows.append([name, r["status"], fmt(c.get("hat train"), ".1f"),
                     fmt(c.get("hat train, second step (new mask scale)"), ".1f"), fmt(c.get("hat inference"), ".1f"),
                     fmt(c.get("hat inference warm-up, all task ids"), ".1f"), fmt(c.get("plain train"), ".1f"),
                     fmt(c.get("plain inference"), ".1f"), graphs, yes_no(checks.get("no new graphs after warm-up")),
                     str(sum(r["graph_breaks"].values())), str(len(r["recompile_limit_hits"])),
                     fmt(max(diffs) if diffs else None, ".2e"),
                     yes_no(checks.get("task 0 compiled output bit-identical after task-1 training"))])
    return rows


def break_summary(reason: str) -> str:
    """A graph-break reason in one line: its title and Dynamo's debug context."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Developer debug context")), "")
    context = re.sub(r" at 0x[0-9a-f]+", "", context)   # object addresses: the same break on another object
    return f"{lines[0] if lines else '?'}" + (f" [`{context[:160]}`]" if context else "")


def render(results: dict, console: Console) -> str:
    env = results["env"]
    md = ["# torch.compile on the overhead benchmark's models", "",
          f"Command: `{results['command']}`  ", f"Environment: {json.dumps(env)}", "",
          "CPU milliseconds per call (median of interleaved rounds: HAT eager, HAT compiled, plain eager, plain "
          "compiled in one process); speed-up = eager / compiled. Training: task 1 with protection active "
          "(task 0 ended), loss + regulariser, SGD momentum; only the model is compiled. Inference: eval, no grad, "
          "binary masks, task 0. Models and inputs as in overhead.md."]
    titles = {"train": "training step", "inference": "inference"}
    for phase, title in titles.items():
        table = Table(title=f"torch.compile, {title} (CPU ms per call, median; {env['threads']} thread(s))")
        for col in TIMING_COLUMNS:
            table.add_column(col, justify="left" if col in ("model", "input") else "right")
        rows = timing_rows(results, phase)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        md += ["", f"## {title.capitalize()}", "", "| " + " | ".join(TIMING_COLUMNS) + " |",
               "|---|---|" + "---:|" * (len(TIMING_COLUMNS) - 2)]
        md += ["| " + " | ".join(row) + " |" for row in rows]
    table = Table(title="one-off compile (wall s, fresh cache) and recompiles")
    for col in COMPILE_COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "status") else "right")
    rows = compile_rows(results)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    md += ["", "## Compile time, recompiles and checks", "",
           "Compile times are the wall seconds of the first compiled call (training step: forward + backward "
           "compile + one SGD step; inference: task 0, binary masks), each case on a fresh, empty inductor cache "
           "after a throwaway compile that pays inductor's start-up. Warm-up: a second training step at another "
           "mask scale (HAT 2nd step), then inference for every task id with mask scales "
           + ", ".join(map(str, WARMUP_SCALES)) + " (HAT infer, all task ids). Switched: inference over task ids "
           + ", ".join(map(str, SWITCH_ORDER)) + " with mask scales " + ", ".join(map(str, SWITCH_SCALES))
           + "; timed: after the timed rounds (the training steps cycle 50 mask scales). Unique graphs are Dynamo's "
           "`counters['stats']['unique_graphs']` (plain and HAT together); stable = no new graph after the warm-up. "
           "Graph breaks: Dynamo's `counters['graph_break']` while tracing. Limit hits: functions that hit "
           f"`recompile_limit` ({results['env']['recompile_limit']}) and so run eager from then on.", "",
           "| " + " | ".join(COMPILE_COLUMNS) + " |", "|---|---|" + "---:|" * (len(COMPILE_COLUMNS) - 2)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "## Graph breaks", "",
           "Dynamo's graph-break reasons while tracing (first line and debug context; count), and recompile-limit "
           "hits:", ""]
    for name, r in results["cases"].items():
        summaries: dict[str, int] = {}
        for reason, n in r["graph_breaks"].items():
            summaries[break_summary(reason)] = summaries.get(break_summary(reason), 0) + n
        md.append(f"- **{name}**: " + ("none" if not summaries else "; ".join(
            f"{summary} ({n})" for summary, n in summaries.items())))
        md += [f"  - limit hit: `{hit}`" for hit in r["recompile_limit_hits"]]
    failures = {name: r["failure"] for name, r in results["cases"].items() if "failure" in r}
    if failures:
        md += ["", "## Failures", ""]
        for name, f in failures.items():
            line = f"{name}: {f['stage']}: {f['reason']}"
            console.print(f"[red]{line}[/]")
            md.append(f"- **{name}** ({f['stage']}): `{f['reason']}`")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every variant (default 1, as overhead.py); the compiled kernels "
                             "are generated for this many threads")
    parser.add_argument("--quick", action="store_true", help="a quarter of the rounds (writes compile_quick.*)")
    parser.add_argument("--only", default="", help="comma-separated case names from overhead.py (default: "
                                                   + ",".join(DEFAULT_CASES) + ")")
    parser.add_argument("--compile-limit", type=int, default=300,
                        help="seconds a compile (first call, warm-up) may take before the case is recorded as failed")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Per-task modules are picked by a Python int, so each task id is one more compiled entry (README).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * NUM_TASKS + 2)
    console = Console(width=200)
    only = set(filter(None, args.only.split(",")))
    names = {c.name for c in CASES}
    if only - names:
        parser.error(f"unknown cases: {', '.join(sorted(only - names))} (choose from {', '.join(sorted(names))})")
    results = {"command": "python benchmarks/compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": compile_environment(args.threads), "cases": {}}
    for case in CASES:
        if case.name not in (only or DEFAULT_CASES):
            continue
        console.print(f"[bold]{case.name}[/] {case.input_shape} ...")
        start = time.perf_counter()
        results["cases"][case.name] = r = run_case(case, args.quick, args.compile_limit)
        r["case_wall_s"] = time.perf_counter() - start
        console.print(f"  {r['status']} in {r['case_wall_s']:.0f} s"
                      + (f": {r['failure']['stage']}: {r['failure']['reason']}" if "failure" in r else ""))
    markdown = render(results, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads != 1 else "") + (
        "_" + "_".join(sorted(only)) if only else "")
    (out / f"compile{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"compile{suffix}.md").write_text(markdown)
    console.print(f"wrote {out / f'compile{suffix}.json'} and .md")
    return 1 if any(r["status"] == "check failed" for r in results["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
