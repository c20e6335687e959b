"""torchvision zoo: one representative of every torchvision builder family, three checks.

Every module of `torchvision.models` that registers builders (classification, segmentation, detection,
video, optical flow) is one family; its representative is a small variant with `weights=None` at a tiny
input, put through the checks of `benchmarks/timm_zoo.py` (reused from there):

1. convert   `hatify.hatify(model, num_tasks=2, example_inputs=...)` succeeds;
2. validate  `hatify.validate(...)` passes (open masks equal the original, probes sound, gradients);
3. protect   tasks 0 and 1 train a few steps with ONE AdamW(weight_decay=0.01) optimizer and task 0's
             eval outputs stay bit-identical (`torch.equal`). Detectors need targets in train mode: they
             are trained on their eval-mode outputs (boxes, scores), which still updates their weights.

Each family runs in its own subprocess with a timeout. Results: benchmarks/results/torchvision_zoo.{json,md}.

    python benchmarks/torchvision_zoo.py                          # every family
    python benchmarks/torchvision_zoo.py --families resnet,raft
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm_zoo  # noqa: E402  (the checks, reason codes and table cells are shared)

RESULTS = timm_zoo.RESULTS
NUM_CLASSES = timm_zoo.NUM_CLASSES


def _image(size: int, batch: int = 2) -> Callable[[], tuple]:
    return lambda: (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _images(size: int) -> Callable[[], tuple]:
    """Detectors take a list of images."""
    return lambda: (list(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))),)


def _clip(frames: int, size: int, batch: int = 2) -> Callable[[], tuple]:
    return lambda: (torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)),)


def _frame_pair(size: int) -> Callable[[], tuple]:
    gen = torch.Generator().manual_seed(0)
    return lambda: (torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 3, size, size, generator=gen))


_DETECT = {"weights_backbone": None, "num_classes": NUM_CLASSES}
_RCNN = {**_DETECT, "min_size": 64, "max_size": 64}
_SEGMENT = {"weights_backbone": None, "num_classes": NUM_CLASSES, "aux_loss": False}

# family (the torchvision.models module) -> (builder, keyword arguments, inputs, train in train mode)
FAMILIES: dict[str, tuple[str, dict, Callable[[], tuple], bool]] = {
    "alexnet": ("alexnet", {}, _image(64), True),
    "convnext": ("convnext_tiny", {}, _image(32), True),
    "densenet": ("densenet121", {}, _image(32), True),
    "efficientnet": ("efficientnet_b0", {}, _image(32), True),
    "efficientnet_v2": ("efficientnet_v2_s", {}, _image(32), True),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": True}, _image(32), True),
    "inception": ("inception_v3", {"aux_logits": False, "init_weights": True}, _image(80), True),
    "maxvit": ("maxvit_t", {}, _image(224), True),  # its partition size 7 needs 7 * 32
    "mnasnet": ("mnasnet0_5", {}, _image(32), True),
    "mobilenetv2": ("mobilenet_v2", {}, _image(32), True),
    "mobilenetv3": ("mobilenet_v3_small", {}, _image(32), True),
    "regnet": ("regnet_y_400mf", {}, _image(32), True),
    "resnet": ("resnet18", {}, _image(32), True),
    "shufflenetv2": ("shufflenet_v2_x0_5", {}, _image(32), True),
    "squeezenet": ("squeezenet1_1", {}, _image(64), True),
    "swin_transformer": ("swin_t", {}, _image(32), True),
    "swin_transformer_v2": ("swin_v2_t", {}, _image(32), True),
    "vgg": ("vgg11", {}, _image(32), True),
    "vision_transformer": ("vit_b_16", {"image_size": 32}, _image(32), True),
    "segmentation.deeplabv3": ("deeplabv3_mobilenet_v3_large", _SEGMENT, _image(64), True),
    "segmentation.fcn": ("fcn_resnet50", _SEGMENT, _image(64), True),
    "segmentation.lraspp": ("lraspp_mobilenet_v3_large", {"weights_backbone": None, "num_classes": NUM_CLASSES},
                            _image(64), True),
    "detection.faster_rcnn": ("fasterrcnn_mobilenet_v3_large_320_fpn", _RCNN, _images(64), False),
    "detection.fcos": ("fcos_resnet50_fpn", _RCNN, _images(64), False),
    "detection.keypoint_rcnn": ("keypointrcnn_resnet50_fpn", {**_RCNN, "num_classes": 2}, _images(64), False),
    "detection.mask_rcnn": ("maskrcnn_resnet50_fpn", _RCNN, _images(64), False),
    "detection.retinanet": ("retinanet_resnet50_fpn", _RCNN, _images(64), False),
    "detection.ssd": ("ssd300_vgg16", _DETECT, _images(64), False),
    "detection.ssdlite": ("ssdlite320_mobilenet_v3_large", _DETECT, _images(64), False),
    "video.resnet": ("r3d_18", {}, _clip(4, 32), True),
    "video.mvit": ("mvit_v2_s", {}, lambda: (torch.rand(1, 3, 16, 224, 224),), True),
    "video.s3d": ("s3d", {}, _clip(14, 224, batch=1), True),  # its final AvgPool3d(2, 7, 7) needs 14 x 224
    "video.swin_transformer": ("swin3d_t", {}, _clip(4, 32), True),
    "optical_flow.raft": ("raft_small", {}, _frame_pair(128), True),
}


def check_family(family: str) -> dict:
    """Build the family's representative and run the three checks; a result row."""
    from torchvision import models

    name, kwargs, inputs, train_mode = FAMILIES[family]
    row: dict = {"family": family, "model": name, "status": "fail", "reason": "", "why": ""}
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extra = {} if family.startswith("optical_flow") else {"num_classes": NUM_CLASSES}
                model = models.get_model(name, weights=None, **{**extra, **kwargs}).eval()
            example = inputs()
            with torch.no_grad():
                model(*example)
        except Exception as exc:
            raise timm_zoo._Fail("create_error", f"{type(exc).__name__}: {timm_zoo._first_line(exc)}") from exc
        first = example[0][0] if isinstance(example[0], list) else example[0]
        row.update(input=[len(example[0]) if isinstance(example[0], list) else first.shape[0], *first.shape[-3:]],
                   kwargs={k: v for k, v in kwargs.items() if v is not None}, train_mode=train_mode)
        timm_zoo.check_converted(model, example, row, train_mode=train_mode)
    except timm_zoo._Fail as fail:
        row["reason"], row["why"] = fail.code, fail.why
    return row


def run_family(family: str, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out_path = tmp.name
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", family, "--out", out_path],
                              capture_output=True, text=True, timeout=timeout, env=env)
        text = Path(out_path).read_text() if Path(out_path).stat().st_size else ""
        if text:
            row = json.loads(text)
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            row = {"family": family, "model": FAMILIES[family][0], "status": "fail", "reason": "crashed",
                   "why": f"exit {proc.returncode}: {tail[-1][:200] if tail else ''}"}
    except subprocess.TimeoutExpired:
        row = {"family": family, "model": FAMILIES[family][0], "status": "fail", "reason": "timeout",
               "why": f"no result within {timeout:.0f} s"}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def write_results(rows: list[dict]) -> None:
    import torchvision

    RESULTS.mkdir(parents=True, exist_ok=True)
    passed = sum(r["status"] == "pass" for r in rows)
    meta = {"torchvision": torchvision.__version__, "torch": torch.__version__}
    payload = {**meta, "passed": passed, "total": len(rows), "reasons": timm_zoo.REASONS, "families": rows}
    (RESULTS / "torchvision_zoo.json").write_text(json.dumps(payload, indent=1))
    columns = [c for c in timm_zoo.COLUMNS if c != "why"] + ["why"]
    lines = ["# hatify x torchvision zoo", "",
             f"torchvision {meta['torchvision']}, torch {meta['torch']}; {passed} / {len(rows)} families pass all "
             "three checks (convert, validate, task 0 bit-identical after task 1 with one AdamW(weight_decay=0.01)). "
             "`hat_share` is the report's `hat_parameter_share`. Input: batch x (frames x) height x width. "
             f"{timm_zoo.share_line(rows, name='family')}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [timm_zoo._cell(row, c).replace("|", "/") for c in columns]
        if row.get("input"):
            cells[columns.index("input")] = "x".join(str(v) for v in [row["input"][0], *row["input"][2:]])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Reason codes", ""] + [f"- `{code}`: {why}" for code, why in timm_zoo.REASONS.items()]
    (RESULTS / "torchvision_zoo.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per family")
    parser.add_argument("--merge", action="store_true", help="update the rows of an existing torchvision_zoo.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
        torch.manual_seed(0)
        Path(args.out).write_text(json.dumps(check_family(args.worker)))
        return 0
    chosen = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        print(f"unknown families: {', '.join(unknown)}")
        return 2
    rows = {}
    for family in chosen:
        row = rows[family] = run_family(family, args.timeout)
        share = f"{100 * row['hat_share']:.1f}%" if row.get("hat_share") is not None else "-"
        print(f"{family:28s} {row['model']:40s} {row['status']:5s} {row['reason']:16s} share {share:>6s} "
              f"{row['seconds']:6.1f} s  {row['why'][:90]}", flush=True)
    ordered = [rows[f] for f in chosen]
    if args.merge and (RESULTS / "torchvision_zoo.json").exists():
        old = {r["family"]: r for r in json.loads((RESULTS / "torchvision_zoo.json").read_text())["families"]}
        old.update(rows)
        ordered = [old[f] for f in FAMILIES if f in old]
    write_results(ordered)
    passed = sum(r["status"] == "pass" for r in ordered)
    print(f"{passed} / {len(ordered)} families pass all three checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
