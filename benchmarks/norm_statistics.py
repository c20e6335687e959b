"""The README loop on a BatchNorm CNN, eval-mode accuracy with and without `end_task(data=...)` (issue 20).

    .venv/bin/python benchmarks/norm_statistics.py [--model resnet18] [--epochs 2] [--tasks 3]

Split digits (scikit-learn's 8x8 digits, 2 classes a task) upsampled to 3x32x32, one AdamW(1e-3, weight decay
0.01) across tasks, batch 32, the README's loop; after training, per task: accuracy in eval mode (binary masks,
running statistics) on its test split. `end_task()` keeps the statistics gathered while training (soft masks,
moving weights); `end_task(data=loader)` re-estimates them under the final binary masks.
Writes benchmarks/results/norm_statistics.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hatify  # noqa: E402
from test_split_digits import split_digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.view(-1, 1, 8, 8).repeat(1, 3, 1, 1), size=32, mode="bilinear", align_corners=False)


def run(model_name: str, tasks: int, epochs: int, with_data: bool) -> list[float]:
    torch.manual_seed(0)
    data = split_digits()[:tasks]
    hat = hatify.hatify(timm.create_model(model_name, num_classes=2), tasks, (torch.zeros(2, 3, 32, 32),))
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-3, weight_decay=0.01)
    for t, ((x, y), _) in enumerate(data):
        hat.train()
        hat.begin_task(t)
        loader = list(zip(upsample(x).split(32), y.split(32)))
        for _ in range(epochs):
            for b, (xb, yb) in enumerate(loader):
                loss = F.cross_entropy(hat(xb, task_id=t, mask_scale=hat.mask_scale(b, len(loader))), yb)
                opt.zero_grad()
                (loss + hat.regularization()).backward()
                opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hatify.HatifyWarning)
            hat.end_task(data=loader) if with_data else hat.end_task()
    hat.eval()
    with torch.no_grad():
        return [float((hat(upsample(xte), task_id=t).argmax(1) == yte).float().mean())
                for t, (_, (xte, yte)) in enumerate(data)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for with_data in (False, True):
        start = time.perf_counter()
        accuracy = run(args.model, args.tasks, args.epochs, with_data)
        rows.append({"end_task": "end_task(data=loader)" if with_data else "end_task()", "eval_accuracy": accuracy,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {**vars(args), "torch": torch.__version__, "timm": timm.__version__}
    (RESULTS / "norm_statistics.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Eval-mode accuracy of the README loop on timm {args.model}", "",
             f"`python benchmarks/norm_statistics.py --model {args.model} --tasks {args.tasks} --epochs {args.epochs}`"
             ": split digits at 3x32x32, AdamW(1e-3, weight decay 0.01), batch 32, binary masks in eval mode.", "",
             "| end of task | " + " | ".join(f"task {t}" for t in range(args.tasks)) + " |",
             "|---|" + "---:|" * args.tasks]
    lines += [f"| `{r['end_task']}` | " + " | ".join(f"{a:.3f}" for a in r["eval_accuracy"]) + " |" for r in rows]
    (RESULTS / "norm_statistics.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
