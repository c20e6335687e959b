"""The conversion report: made from the plan; rich tables on screen, a plain dict for JSON."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table


@dataclass
class Report:
    model: str
    seconds: float
    plan: dict
    summary: dict
    validation: dict | None = None

    @staticmethod
    def build(hat, seconds: float) -> "Report":
        plan = hat.plan
        masked = sum(layer.params for layer in plan.masked_layers)
        original = sum(layer.params for layer in plan.layers) + sum(m.params for m in plan.modules) + sum(
            math.prod(p.shape) for p in plan.params if p.policy != "head")
        summary = {
            "nodes": plan.node_count, "hat_layers": len(plan.masked_layers),
            "heads": sum(layer.role == "head" for layer in plan.layers),
            "mask_units": plan.total_units,
            "task_indexed_modules": sum(m.policy == "task_indexed" for m in plan.modules),
            "opaque_modules": [m.name for m in plan.modules if m.reason.startswith("opaque")],
            "loose_parameters": [p.name for p in plan.params if p.policy != "head"],
            "unknown_ops": len(plan.unknown), "remasked_norms": len(plan.remask),
            "original_parameters": original, "parameters_in_hat_layers": masked,
            "hat_parameter_share": masked / max(1, original),
            "converted_parameters": sum(p.numel() for p in hat.parameters()),
            "conversion_seconds": round(seconds, 4),
        }
        return Report(hat.net.__class__.__name__, seconds, plan.to_dict(), summary)

    def to_dict(self) -> dict:
        return {"model": self.model, "summary": self.summary, "plan": self.plan, "validation": self.validation}

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"hatify: {self.model}", show_lines=False)
        for col in ("layer", "op", "action", "units", "input from", "input map"):
            table.add_column(col, overflow="fold")
        for layer in self.plan["layers"]:
            action = "converted" if layer["role"] == "masked" else "head (per task)"
            table.add_row(layer["name"], layer["op"], action, str(layer["units"]),
                          ", ".join(layer["input_producers"]) or "-", layer["input_map"] if layer["role"] == "masked"
                          else "-")
        for module in self.plan["modules"]:
            if module["policy"] != "head":
                table.add_row(module["name"], module["op"], module["policy"], "-", "-", module["reason"])
        for param in self.plan["params"]:
            if param["policy"] != "head":
                table.add_row(param["name"], "parameter", param["policy"], "-", "-", param["reason"])
        yield table
        s = self.summary
        yield (f"[bold]{s['hat_layers']}[/] HAT layers, {s['heads']} heads, {s['task_indexed_modules']} task-indexed "
               f"norms, {s['mask_units']} mask units, {s['nodes']} graph nodes; "
               f"{100 * s['hat_parameter_share']:.1f}% of parameters under HAT control; "
               f"converted in {s['conversion_seconds']:.2f} s")
        for name, why in self.plan["opaque"].items():
            yield f"[yellow]opaque[/] {name}: {why}"
        for op in self.plan["unknown"]:
            yield f"[yellow]unknown op[/] {op['node']} ({op['op']}) at {op['line'] or '?'}: {op['reason']}"
        if self.validation:
            v = self.validation
            verdict = "[green]passed[/]" if v["passed"] else "[red]FAILED[/]"
            yield (f"validation {verdict}: largest open-mask difference {v['largest_difference']:.3g}, "
                   f"probe violations {v['probe_violations']}, parameters without gradient "
                   f"{len(v['missing_gradients'])}")

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=_Null())
        console.print(self)
        return console.export_text()


class _Null:
    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass
