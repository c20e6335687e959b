"""The cost of HAT against the plain model: training step, inference, conversion time and memory.

    .venv/bin/python benchmarks/overhead.py [--threads 1] [--quick] [--only mlp,resnet18]
    .venv/bin/python benchmarks/overhead.py --only none --pipelines llama --no-quick-start

Plain and HAT run side by side in one process, interleaved (the order rotates every round), with the same
number of torch threads; every figure is a median over the rounds. Times are process CPU time, which
other work on the machine barely moves (wall time is in the JSON too); ratios are HAT / plain.
Training is measured on task 1, after task 0 ended (protection active), loss + `hat.regularization()`,
SGD with momentum for both. Inference: eval mode, no grad, binary masks, task 0.
For models whose step is short, training is also timed back to back (blocks of consecutive steps, plain and HAT
blocks interleaved), as a training loop runs it: caches then hold the model's own tensors.
Ablations (HAT without protection, without gates, without the regulariser) say where the overhead goes;
a torch.profiler table per op for the MLP and resnet18 says which ops. Full training memory (parameters,
buffers, gradients, AdamW state) per case. The pipeline rows (`--pipelines`: timm resnet50 at 2x3x224x224 by
default; torchvision Mask R-CNN, two 320x320 images; a 134M Llama, keyword batch 2x64; each can run alone):
conversion against `symbolic_trace` + `ShapeProp` where plain fx traces the model, the default validation against
one plain forward + backward, `hatify()` end to end, and the peak resident memory each adds beside a plain forward
+ backward's; and the CLI quick start in fresh processes beyond `import torch`. Mask R-CNN takes minutes.
Writes benchmarks/results/overhead.json and overhead.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hatify  # noqa: E402
from hatify.layers import FoldedGate, Gate, MaskBank, Protect, TaskIndexed, TaskParameter  # noqa: E402
from nets import SmallCNN, mlp, resnet18  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TASKS = 5
TARGETS = {"mlp": 1.30, "resnet18": 1.10}   # training-step ratio targets of issue 7 (mlp: at batch 64)
INFERENCE_TARGET = 1.05
BLOCK_MS = 40        # back-to-back training blocks last about this long (plain model)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    rounds: int          # timed rounds (quick mode: a quarter, at least 3)
    profile_steps: int   # steps under torch.profiler (0: no profile)


CASES = [
    Case("mlp", lambda: mlp(784, 10), (64, 784), 10, 300, 40),
    Case("mlp_b256", lambda: mlp(784, 10), (256, 784), 10, 150, 0),
    Case("cnn", lambda: SmallCNN(1, 28, 10), (64, 1, 28, 28), 10, 100, 0),
    Case("resnet18", lambda: resnet18(3, 10), (16, 3, 64, 64), 10, 30, 3),
    Case("resnet18_b32_128", lambda: resnet18(3, 10), (32, 3, 128, 128), 10, 8, 0),
    Case("vit_tiny", lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), (8, 3, 224, 224), 10, 10, 0),
]


# ---------------------------------------------------------------------------------------------- timing
def measure(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Median CPU and wall seconds of each variant, interleaved; the order rotates every round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                c0, w0 = time.process_time(), time.perf_counter()
                variants[name]()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    finally:
        gc.enable()
    return {n: {"cpu_ms": 1e3 * statistics.median(cpu[n]), "wall_ms": 1e3 * statistics.median(wall[n])}
            for n in names}


# ---------------------------------------------------------------------------------------------- ablations
@contextlib.contextmanager
def without_protection(hat) -> Iterator[None]:
    layers = [m for m in hat.modules() if isinstance(m, Protect)]
    active = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield
    finally:
        for m, a in zip(layers, active):
            m.active = a


@contextlib.contextmanager
def without_gates() -> Iterator[None]:
    forward, folded = Gate.forward, FoldedGate.forward
    Gate.forward = lambda self, x, masks: x
    FoldedGate.forward = lambda self, x, masks, **kwargs: self.target(x, **kwargs)
    try:
        yield
    finally:
        Gate.forward, FoldedGate.forward = forward, folded


def ablated(step: Callable[[], object], *contexts: Callable[[], contextlib.AbstractContextManager]):
    def run():
        with contextlib.ExitStack() as stack:
            for ctx in contexts:
                stack.enter_context(ctx())
            return step()
    return run


def steps_back_to_back(plain_step, hat_step, plain_ms: float, rounds: int) -> dict | None:
    """Training steps in blocks of consecutive steps (as a training loop runs them: the model's tensors stay in
    cache), plain and HAT blocks interleaved; per-step medians. Only for steps shorter than a block."""
    steps = round(BLOCK_MS / plain_ms)
    if steps < 2:
        return None

    def block(step):
        return lambda: [step() for _ in range(steps)]

    timed = measure({"plain": block(plain_step), "hat": block(hat_step)}, max(10, 2 * rounds // steps))
    plain, hat = timed["plain"]["cpu_ms"] / steps, timed["hat"]["cpu_ms"] / steps
    return {"steps_per_block": steps, "plain_ms": plain, "hat_ms": hat, "ratio": hat / plain}


# ---------------------------------------------------------------------------------------------- one case
def prepare(case: Case) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    """The plain model and its HAT conversion with task 0 trained and ended, task 1 begun."""
    torch.manual_seed(0)
    plain = case.build()
    x = torch.randn(case.input_shape)
    y = torch.randint(0, case.classes, (case.input_shape[0],))
    hat = hatify.hatify(copy.deepcopy(plain), num_tasks=NUM_TASKS, example_inputs=(x[:2],))
    opt = torch.optim.SGD(hat.parameters(), lr=0.01, momentum=0.9)
    hat.train()
    hat.begin_task(0)
    for b in range(3):
        loss = F.cross_entropy(hat(x, task_id=0, mask_scale=hat.mask_scale(b, 3)), y) + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hat.end_task()
    hat.train()
    hat.begin_task(1)
    return plain, hat, x, y


def training_steps(plain: nn.Module, hat, x: torch.Tensor, y: torch.Tensor, regularize: bool = True):
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    hat_opt = torch.optim.SGD(hat.parameters(), lr=0.01, momentum=0.9)
    batch = {"b": 0}

    def plain_step():
        loss = F.cross_entropy(plain(x), y)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    def hat_step(reg: bool = regularize):
        b = batch["b"] = (batch["b"] + 1) % 50
        loss = F.cross_entropy(hat(x, task_id=1, mask_scale=hat.mask_scale(b, 50)), y)
        if reg:
            loss = loss + hat.regularization()
        hat_opt.zero_grad()
        loss.backward()
        hat_opt.step()

    return plain_step, hat_step


PROTECTION = "protection (frozen values + protect mask)"  # the memory part `pretrained.py` reads too


def memory(plain: nn.Module, hat) -> dict:
    """Bytes of parameters and buffers, plain against HAT (task 0 ended), by what they are for."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    plain_bytes = sum(nbytes(t) for t in list(plain.parameters()) + list(plain.buffers()))
    parts = {PROTECTION: 0, "per-task copies (norms, heads, loose params)": 0,
             "mask bank": 0, "gate index maps": 0, "shared weights": 0, "model state (trained, cumulative)": 0}
    seen: set[int] = set()

    def owner_kind(qualname: str) -> str:
        module: nn.Module = hat
        kinds = []
        for part in qualname.split(".")[:-1]:
            module = getattr(module, part)
            kinds.append(type(module))
        if Protect in kinds:
            return PROTECTION
        if MaskBank in kinds:
            return "mask bank"
        if any(issubclass(kind, Gate) for kind in kinds):
            return "gate index maps"
        if TaskIndexed in kinds or TaskParameter in kinds:
            return "per-task copies (norms, heads, loose params)"
        if qualname.count(".") == 0:
            return "model state (trained, cumulative)"
        return "shared weights"

    for name, tensor in list(hat.named_parameters()) + list(hat.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        parts[owner_kind(name)] += nbytes(tensor)
    # Derived at run time, not saved: the block indices of each protected weight (the blocks of frozen values are
    # views of the frozen buffer itself, not counted twice).
    cache = 0
    for m in hat.modules():
        if isinstance(m, Protect):
            frozen = m.frozen.untyped_storage().data_ptr()
            cache += sum(nbytes(t) for t in m.cached_tensors() if t.untyped_storage().data_ptr() != frozen)
    hat_bytes = sum(parts.values())
    mb = 1 / 2**20
    return {"plain_mb": plain_bytes * mb, "hat_mb": hat_bytes * mb, "added_mb": (hat_bytes - plain_bytes) * mb,
            "ratio": hat_bytes / plain_bytes, "runtime_cache_mb": cache * mb,
            "by_kind_mb": {k: v * mb for k, v in parts.items()}}


def protection_alone(hat, rounds: int) -> dict:
    """CPU ms of every `Protect` of the model on its own: forward, and forward + backward (gradient of ones)."""
    layers = [(p[0], p.original) for p in hat.modules()
              if isinstance(p, parametrize.ParametrizationList) and isinstance(p[0], Protect)]

    def forward():  # with grad enabled: the training path (eval under no grad skips an unneeded write-back)
        for protect, raw in layers:
            protect(raw)

    def forward_backward():
        for protect, raw in layers:
            out = protect(raw)
            out.backward(torch.ones_like(out))
        hat.zero_grad(set_to_none=True)

    timed = measure({"forward": forward, "forward + backward": forward_backward}, rounds)
    return {k: v["cpu_ms"] for k, v in timed.items()}


def profile_ops(plain_step, hat_step, steps: int) -> list[dict]:
    """Self CPU time per op and step under torch.profiler, plain against HAT, sorted by the difference."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    for label, step in (("plain", plain_step), ("hat", hat_step)):
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        for event in prof.key_averages():
            row = per_op.setdefault(event.key, {"plain_us": 0.0, "hat_us": 0.0, "hat_calls": 0})
            row[f"{label}_us"] = event.self_cpu_time_total / steps
            if label == "hat":
                row["hat_calls"] = event.count / steps
    rows = [{"op": op, **v, "extra_us": v["hat_us"] - v["plain_us"]} for op, v in per_op.items()]
    return sorted(rows, key=lambda r: -r["extra_us"])[:18]


def run_case(case: Case, quick: bool) -> dict:
    rounds = max(3, case.rounds // 4) if quick else case.rounds
    plain, hat, x, y = prepare(case)
    plain_step, hat_step = training_steps(plain, hat, x, y)
    no_reg = lambda: hat_step(False)  # noqa: E731
    train = measure({
        "plain": plain_step,
        "hat": hat_step,
        "hat - regulariser": no_reg,
        "hat - regulariser - protection": ablated(no_reg, lambda: without_protection(hat)),
        "hat - regulariser - protection - gates": ablated(no_reg, lambda: without_protection(hat), without_gates),
    }, rounds)
    back_to_back = steps_back_to_back(plain_step, hat_step, train["plain"]["cpu_ms"], rounds)
    hat.eval()
    plain.eval()

    @torch.no_grad()
    def plain_infer():
        return plain(x)

    @torch.no_grad()
    def hat_infer():
        return hat(x, task_id=0)

    infer = measure({"plain": plain_infer, "hat": hat_infer,
                     "hat - protection": ablated(hat_infer, lambda: without_protection(hat))}, rounds)
    result = {"input_shape": list(case.input_shape), "rounds": rounds, "train": train, "inference": infer,
              "train_ratio": train["hat"]["cpu_ms"] / train["plain"]["cpu_ms"],
              "train_ratio_wall": train["hat"]["wall_ms"] / train["plain"]["wall_ms"],
              "inference_ratio": infer["hat"]["cpu_ms"] / infer["plain"]["cpu_ms"],
              "inference_ratio_wall": infer["hat"]["wall_ms"] / infer["plain"]["wall_ms"],
              "train_target": TARGETS.get(case.name), "inference_target": INFERENCE_TARGET,
              "conversion_s": hat.report.summary["conversion_seconds"], "memory": memory(plain, hat),
              "train_back_to_back": back_to_back}
    t = {k: v["cpu_ms"] for k, v in train.items()}
    result["train_breakdown_ms"] = {
        "regulariser": t["hat"] - t["hat - regulariser"],
        "protection (write-back of frozen bits, gradient mask)": t["hat - regulariser"] - t["hat - regulariser - protection"],
        "gates (slice/gather + multiply, fwd + bwd, mask-bank backward)":
            t["hat - regulariser - protection"] - t["hat - regulariser - protection - gates"],
        "rest (mask bank fwd, task-indexed dispatch, fx graph, parametrization call, optimizer on extra params)":
            t["hat - regulariser - protection - gates"] - t["plain"],
    }
    result["protection_isolated_ms"] = protection_alone(hat, rounds)
    if case.profile_steps:
        hat.train()
        plain.train()
        result["profile"] = profile_ops(plain_step, hat_step, max(2, case.profile_steps // (4 if quick else 1)))
    result["training_memory"] = training_memory(plain, hat, x, y)
    return result


def training_memory(plain: nn.Module, hat, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Bytes of everything training keeps (parameters, buffers, gradients, AdamW state, the run-time block indices
    of protected weights), plain against HAT on task 1 after task 0 ended, after two AdamW steps each."""
    def nbytes(tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    def state(model, opt) -> list:
        derived = [t for m in model.modules() if isinstance(m, Protect) for t in m.cached_tensors()]
        return [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
                *(v for s in opt.state.values() for v in s.values()), *derived]

    totals = {}
    for label, model, call in (("plain", plain, lambda: plain(x)),
                               ("hat", hat, lambda: hat(x, task_id=1, mask_scale=hat.mask_scale(0, 1)))):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        for _ in range(2):
            loss = F.cross_entropy(call(), y) + (hat.regularization() if model is hat else 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        totals[label] = nbytes(state(model, opt))
    return {"plain_mb": totals["plain"] / 2**20, "hat_mb": totals["hat"] / 2**20,
            "ratio": totals["hat"] / totals["plain"]}


def _seconds(fn: Callable[[], object]) -> float:
    """Process CPU seconds of `fn` (its child processes' included), as the rest of this file measures."""
    def now() -> float:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    start = now()
    fn()
    return now() - start


def _llama() -> tuple[nn.Module, dict]:
    """A 134M-parameter Llama (0.50 GB of fp32 weights) from its config, keyword batch 2x64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, use_cache=False)
    ids = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _maskrcnn() -> tuple[nn.Module, tuple]:
    """torchvision Mask R-CNN as built by default (images resized to 800), two 3x320x320 images."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    images = list(torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(0)))
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None), (images,)


# name -> the model (random weights) and its example inputs
PIPELINES: dict[str, Callable[[], tuple[nn.Module, object]]] = {
    "resnet50": lambda: (timm.create_model("resnet50", num_classes=10), (torch.randn(2, 3, 224, 224),)),
    "maskrcnn": _maskrcnn,
    "llama": _llama,
}


def _call(model: nn.Module, inputs: object) -> object:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _peak_rss_added(fn: Callable[[], object]) -> int:
    """Bytes the resident set grows to above where it stood, while `fn` runs (Linux: the kernel's high-water mark,
    reset through /proc/self/clear_refs; freed heap memory is given back first, so it is not reused unseen)."""
    import ctypes

    def status(key: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) * 1024

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    result = fn()
    peak = status("VmHWM:") - base
    del result
    return peak


def pipeline(name: str = "resnet50", rounds: int = 3) -> dict:
    """Conversion against `torch.fx.symbolic_trace` + `ShapeProp` (where plain fx traces the model), the default
    validation against one plain forward + backward, and `hatify.hatify()` end to end, interleaved in one process,
    medians (CPU seconds); then the peak resident memory each adds (plain forward + backward alongside)."""
    from torch.fx.passes.shape_prop import ShapeProp

    torch.manual_seed(0)
    model, inputs = PIPELINES[name]()
    model.eval()  # eval: as validation runs it
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    converted = hatify.hatify(model, NUM_TASKS, inputs, validate=False)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        leaves = [v for v in torch.utils._pytree.tree_leaves(_call(model, inputs))
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad]
        sum(v.square().mean() for v in leaves).backward()

    variants = {
        "conversion (validate=False)": lambda: hatify.hatify(model, NUM_TASKS, inputs, validate=False),
        "plain forward + backward": forward_backward,
        "validation": lambda: hatify.validate(model, converted, inputs),
        "hatify() end to end": lambda: hatify.hatify(model, NUM_TASKS, inputs),
    }
    try:
        ShapeProp(torch.fx.symbolic_trace(model)).propagate(*inputs)
        variants["trace + ShapeProp"] = lambda: ShapeProp(torch.fx.symbolic_trace(model)).propagate(*inputs)
    except Exception:  # noqa: BLE001 - plain fx cannot trace it (control flow, keyword inputs): no reference
        pass
    runs: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for key in names[r % len(names):] + names[:r % len(names)]:
            runs[key].append(_seconds(variants[key]))
    med = {k: statistics.median(v) for k, v in runs.items()}
    peak = {key: _peak_rss_added(variants[key]) for key in
            ("plain forward + backward", "conversion (validate=False)", "validation", "hatify() end to end")}
    return {"model": name, "weights_bytes": weights, "median_s": med, "runs_s": runs,
            "conversion_ratio": med["conversion (validate=False)"] / med["trace + ShapeProp"]
            if "trace + ShapeProp" in med else None,
            "validation_ratio": med["validation"] / med["plain forward + backward"],
            "peak_rss_added_bytes": peak, "converted_model_bytes": _held_bytes(converted)}


def _held_bytes(hat: nn.Module) -> int:
    """Bytes of every tensor the converted model holds (parameters, buffers, task copies), each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in
                itertools.chain(hat.parameters(), hat.buffers())}
    return sum(storages.values())


def quick_start(rounds: int = 3) -> dict:
    """`hatify convert timm:resnet18 --num-tasks 5 -o resnet18.hat` (a fresh process, as a user runs it), CPU
    seconds beyond `python -c "import torch"`, interleaved, medians."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(Path(hatify.__file__).resolve().parent.parent)}  # the tree measured
    with tempfile.TemporaryDirectory() as tmp:
        commands = {"import torch": [sys.executable, "-c", "import torch"],
                    "import hatify": [sys.executable, "-c", "import hatify"],
                    "import timm": [sys.executable, "-c", "import timm"],  # the source's own import, in the wait
                    "quick start": [sys.executable, "-m", "hatify", "convert", "timm:resnet18", "--num-tasks", "5",
                                    "-o", str(Path(tmp) / "resnet18.hat")]}
        runs: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(rounds):
            for key, command in commands.items():
                runs[key].append(_seconds(lambda: subprocess.run(command, env=env, check=True, cwd=tmp,
                                                                 capture_output=True)))  # cwd: no other tree
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"median_s": med, "runs_s": runs, "hatify_import_beyond_torch_s": med["import hatify"] - med["import torch"],
            "quick_start_beyond_torch_s": med["quick start"] - med["import torch"]}


# ---------------------------------------------------------------------------------------------- output
def environment(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "threads": threads, "malloc_env": {k: os.environ[k] for k in KEEP_FREED_MEMORY if k in os.environ},
            "cpu": cpu, "hatify_commit": commit, "hatify_path": str(Path(hatify.__file__).parent), "num_tasks": NUM_TASKS}


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "met" if ratio <= target else "missed"


def render(results: dict, console: Console) -> str:
    table = Table(title=f"HAT overhead (CPU ms per call, median; {results['env']['threads']} thread(s))")
    for col in ("model", "input", "train plain", "train HAT", "ratio", "target", "infer plain", "infer HAT",
                "ratio ", "params+buffers MB", "added MB", "mem ratio"):
        table.add_column(col, justify="left" if col in ("model", "input") else "right")
    md = ["# HAT overhead against the plain model", "",
          f"Command: `{results['command']}`  ", f"Environment: {json.dumps(results['env'])}", "",
          "CPU milliseconds per call (median of interleaved rounds); ratio = HAT / plain. Training: task 1 with "
          "protection active, loss + regulariser, SGD momentum. Inference: eval, no grad, binary masks, task 0.", "",
          "| model | input | train plain | train HAT | ratio | target | infer plain | infer HAT | ratio | target | "
          "plain MB | HAT MB | added MB | mem ratio | wall ratio train / infer |",
          "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in results["cases"].items():
        tr, inf, mem = r["train"], r["inference"], r["memory"]
        shape = "x".join(map(str, r["input_shape"]))
        target = r["train_target"]
        table.add_row(name, shape, f"{tr['plain']['cpu_ms']:.2f}", f"{tr['hat']['cpu_ms']:.2f}",
                      f"{r['train_ratio']:.3f}", f"<= {target} {verdict(r['train_ratio'], target)}" if target else "-",
                      f"{inf['plain']['cpu_ms']:.2f}", f"{inf['hat']['cpu_ms']:.2f}", f"{r['inference_ratio']:.3f}",
                      f"{mem['plain_mb']:.1f} -> {mem['hat_mb']:.1f}",
                      f"{mem['added_mb']:.1f}", f"{mem['ratio']:.2f}")
        train_target = f"<= {target} {verdict(r['train_ratio'], target)}" if target else "-"
        md.append(f"| {name} | {shape} | {tr['plain']['cpu_ms']:.2f} | {tr['hat']['cpu_ms']:.2f} | "
                  f"{r['train_ratio']:.3f} | {train_target} | "
                  f"{inf['plain']['cpu_ms']:.2f} | {inf['hat']['cpu_ms']:.2f} | {r['inference_ratio']:.3f} | "
                  f"<= {INFERENCE_TARGET} {verdict(r['inference_ratio'], INFERENCE_TARGET)} | "
                  f"{mem['plain_mb']:.2f} | "
                  f"{mem['hat_mb']:.2f} | {mem['added_mb']:.2f} | {mem['ratio']:.2f} | "
                  f"{r['train_ratio_wall']:.3f} / {r['inference_ratio_wall']:.3f} |")
    console.print(table)
    md += pipeline_lines(results, console)

    if not results["cases"]:
        return "\n".join(md) + "\n"
    blocks = {name: r["train_back_to_back"] for name, r in results["cases"].items() if r.get("train_back_to_back")}
    if blocks:
        md += ["", "## Training steps back to back", "",
               "The table above times single steps, plain and HAT alternating, so each step starts with caches "
               "the other model filled. A training loop runs its steps back to back: here blocks of consecutive "
               "steps (about 40 ms of the plain model), plain and HAT blocks interleaved, medians per step.", "",
               "| model | steps per block | plain ms / step | HAT ms / step | ratio | target |", "|---|---:|---:|---:|---:|---|"]
        for name, b in blocks.items():
            target = results["cases"][name]["train_target"]
            verdict_cell = f"<= {target} {verdict(b['ratio'], target)}" if target else "-"
            md.append(f"| {name} | {b['steps_per_block']} | {b['plain_ms']:.2f} | {b['hat_ms']:.2f} | "
                      f"{b['ratio']:.3f} | {verdict_cell} |")
            console.print(f"{name}: back to back ({b['steps_per_block']} steps per block) ratio {b['ratio']:.3f}")
    md += ["", "## Where the training overhead goes (ablations, CPU ms per step)", "",
           "Each row removes one more HAT mechanism from the same model (interleaved with the others); the "
           "difference is that mechanism's cost.", "",
           "| model | " + " | ".join(next(iter(results["cases"].values()))["train_breakdown_ms"]) + " | total |",
           "|---|" + "---:|" * (len(next(iter(results["cases"].values()))["train_breakdown_ms"]) + 1)]
    breakdown = Table(title="training overhead by mechanism (CPU ms per step)")
    breakdown.add_column("model")
    for key in next(iter(results["cases"].values()))["train_breakdown_ms"]:
        breakdown.add_column(key.split(" (")[0], justify="right")
    breakdown.add_column("total", justify="right")
    for name, r in results["cases"].items():
        parts = r["train_breakdown_ms"]
        total = r["train"]["hat"]["cpu_ms"] - r["train"]["plain"]["cpu_ms"]
        breakdown.add_row(name, *(f"{v:.2f}" for v in parts.values()), f"{total:.2f}")
        md.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts.values()) + f" | {total:.2f} |")
    console.print(breakdown)
    md += ["", "Protection alone (every `Protect` of the model run by itself, CPU ms: forward / forward + "
               "backward with a gradient of ones, which includes allocating that gradient):", ""]
    for name, r in results["cases"].items():
        alone = r["protection_isolated_ms"]
        md.append(f"- {name}: {alone['forward']:.2f} / {alone['forward + backward']:.2f}")
    md += ["", "Inference with `Protect` switched off (not a usable mode: what the protection checks cost; in eval "
               "under no grad `Protect` only checks that nothing was written since its last write-back).", ""]
    for name, r in results["cases"].items():
        inf = r["inference"]
        md.append(f"- {name}: {inf['hat - protection']['cpu_ms'] / inf['plain']['cpu_ms']:.3f}x "
                  f"(with it {r['inference_ratio']:.3f}x)")
    md += ["", "## Memory", "", "| model | " + " | ".join(next(iter(results["cases"].values()))["memory"]["by_kind_mb"])
           + " | runtime cache (not saved) |", "|---|" + "---:|" * (len(next(iter(results["cases"].values()))
                                                                            ["memory"]["by_kind_mb"]) + 1)]
    for name, r in results["cases"].items():
        mem = r["memory"]
        md.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in mem["by_kind_mb"].values())
                  + f" | {mem['runtime_cache_mb']:.2f} |")
    for name, r in results["cases"].items():
        if "profile" not in r:
            continue
        md += ["", f"## Profile: {name} training step (self CPU us per step, torch.profiler)", "",
               "| op | plain | HAT | extra | HAT calls / step |", "|---|---:|---:|---:|---:|"]
        md += [f"| `{p['op']}` | {p['plain_us']:.1f} | {p['hat_us']:.1f} | {p['extra_us']:.1f} | {p['hat_calls']:.0f} |"
               for p in r["profile"]]
    return "\n".join(md) + "\n"


# issue 22's goals per pipeline row (seconds are CPU seconds; memory in multiples of the weights)
GOALS = {"resnet50": {"conversion": "<= 2x", "validation": "<= 4x", "end to end": "<= 1.2 s"},
         "llama": {"conversion": "<= 0.8 s", "validation": "<= 4x", "memory": "<= 1.5x"},
         "maskrcnn": {"validation": "<= 20 s (one thread)"}}


def _pipeline_table(pipe: dict) -> list[str]:
    """One model's conversion, validation and peak-memory rows (markdown)."""
    med, peak, weights = pipe["median_s"], pipe["peak_rss_added_bytes"], pipe["weights_bytes"]
    trace, goal = med.get("trace + ShapeProp"), GOALS.get(pipe["model"], {})
    rows = ["", f"## Conversion and validation: `{pipe['model']}` (CPU s, medians of "
                f"{len(next(iter(pipe['runs_s'].values())))} interleaved rounds)", "",
            "| what | HAT | plain reference | ratio | goal |", "|---|---:|---:|---:|---|",
            f"| conversion (validate=False) / trace + ShapeProp | {med['conversion (validate=False)']:.3f} | "
            + (f"{trace:.3f} | {pipe['conversion_ratio']:.2f}x |" if trace else "- | - |")
            + f" {goal.get('conversion', '-')} |",
            f"| default validation / plain forward + backward | {med['validation']:.3f} | "
            f"{med['plain forward + backward']:.3f} | {pipe['validation_ratio']:.2f}x | {goal.get('validation', '-')} |",
            f"| `hatify.hatify()` end to end, validation included | {med['hatify() end to end']:.3f} | - | - | "
            f"{goal.get('end to end', '-')} |", "",
            f"Peak resident memory added (Linux VmHWM above VmRSS before the call, freed heap trimmed first), "
            f"weights {weights / 2**30:.3f} GB; the converted model itself holds "
            f"{pipe['converted_model_bytes'] / 2**30:.3f} GB ({pipe['converted_model_bytes'] / weights:.2f}x):", "",
            "| call | GB | x weights | goal |", "|---|---:|---:|---|"]
    rows += [f"| {key} | {value / 2**30:.3f} | {value / weights:.2f} | "
             f"{goal.get('memory', '-') if key == 'hatify() end to end' else '-'} |" for key, value in peak.items()]
    return rows


def pipeline_lines(results: dict, console: Console) -> list[str]:
    """The conversion, validation and quick-start rows, and the full training memory, as markdown lines."""
    md = []
    for pipe in results.get("pipelines", {}).values():
        md += _pipeline_table(pipe)
        console.print(f"{pipe['model']}: validation {pipe['validation_ratio']:.2f}x forward+backward, end to end "
                      f"{pipe['median_s']['hatify() end to end']:.2f} s, peak added end to end "
                      f"{pipe['peak_rss_added_bytes']['hatify() end to end'] / pipe['weights_bytes']:.2f}x weights")
    quick = results.get("quick_start")
    if quick:
        med = quick["median_s"]
        md += ["", "## Quick start (fresh processes, CPU s, medians)", "",
               f"`import torch` {med['import torch']:.2f} s; `import hatify` {med['import hatify']:.2f} s "
               f"(+{quick['hatify_import_beyond_torch_s']:.2f} s); `import timm` {med['import timm']:.2f} s; `hatify convert timm:resnet18 --num-tasks 5 -o "
               f"resnet18.hat` {med['quick start']:.2f} s: **{quick['quick_start_beyond_torch_s']:.2f} s beyond "
               "`import torch`** (goal <= 1.5 s)."]
        console.print(f"quick start: {quick['quick_start_beyond_torch_s']:.2f} s beyond import torch")
    memory_rows = {name: r["training_memory"] for name, r in results["cases"].items() if "training_memory" in r}
    if memory_rows:
        md += ["", "## Full training memory (parameters, buffers, gradients, AdamW state, protection indices)", "",
               "| model | plain MB | HAT MB | ratio |", "|---|---:|---:|---:|"]
        md += [f"| {name} | {m['plain_mb']:.2f} | {m['hat_mb']:.2f} | {m['ratio']:.2f} |"
               for name, m in memory_rows.items()]
    return md


# glibc returns large freed blocks to the OS, so every weight-sized tensor a step allocates (the effective
# weights, their masked gradients) is page-faulted in again; these settings keep freed memory in the process.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                     "MALLOC_TOP_PAD_": "1073741824"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for plain and HAT alike (default 1: the machine is shared, and one "
                             "thread keeps process CPU time a faithful measure)")
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the rounds, shorter profiles (writes overhead_quick.*)")
    parser.add_argument("--only", default="", help="comma-separated case names (mlp, mlp_b256, cnn, resnet18, "
                                                   "resnet18_b32_128, vit_tiny; none: the pipeline rows only)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip the resnet50 conversion / validation timing and the CLI quick start")
    parser.add_argument("--pipelines", default="resnet50",
                        help="comma-separated pipeline rows: " + ", ".join(PIPELINES) + " (default resnet50)")
    parser.add_argument("--no-quick-start", action="store_true", help="skip the CLI quick start")
    parser.add_argument("--pipeline-rounds", type=int, default=3, help="rounds of the pipeline and quick start")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="restart under glibc settings that keep freed memory (no page faults for weight-sized "
                             "tensors); writes overhead_keepmem*")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, **KEEP_FREED_MEMORY})   # glibc reads these only at start-up
    torch.set_num_threads(args.threads)
    console = Console(width=180)
    only = set(filter(None, args.only.split(",")))
    results = {"command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": environment(args.threads), "cases": {}}
    for case in CASES:
        if only and case.name not in only:
            continue
        console.print(f"[bold]{case.name}[/] {case.input_shape} ...")
        results["cases"][case.name] = run_case(case, args.quick)
    if not args.no_pipeline:
        results["pipelines"] = {}
        for name in filter(None, args.pipelines.split(",")):
            if name not in PIPELINES:
                parser.error(f"unknown pipeline {name!r}: one of {', '.join(PIPELINES)}")
            console.print(f"[bold]pipeline[/] {name} ...")
            results["pipelines"][name] = pipeline(name, args.pipeline_rounds)
        if not args.no_quick_start:
            results["quick_start"] = quick_start(args.pipeline_rounds)
    markdown = render(results, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads != 1 else "") + (
        "_keepmem" if args.keep_freed_memory else "") + (
        "_" + "_".join(sorted(only)) if only else "") + (
        "_pipelines_" + args.pipelines.replace(",", "_") if args.pipelines != "resnet50" else "")
    (out / f"overhead{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"overhead{suffix}.md").write_text(markdown)
    console.print(f"wrote {out / f'overhead{suffix}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
