"""The conversion report: made from the plan; rich tables on screen, a plain dict for JSON."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table

from .layers import FoldedGate


@dataclass
class Report:
    model: str
    seconds: float
    plan: dict
    summary: dict
    validation: dict | None = None

    @staticmethod
    def build(hat, seconds: float) -> "Report":
        folded = sum(isinstance(gate, FoldedGate) for gate in hat.net.hat_gates.values())
        summary = _summary(hat.plan, seconds, converted=sum(p.numel() for p in hat.parameters()), folded=folded)
        return Report(hat.net.__class__.__name__, seconds, hat.plan.to_dict(), summary)

    @staticmethod
    def from_plan(plan, model: str, seconds: float) -> "Report":
        """The report of a dry run (`hatify.explain`): no converted model, so `converted_parameters` and
        `folded_gates` are None."""
        return Report(model, seconds, plan.to_dict(), _summary(plan, seconds, converted=None, folded=None))

    @staticmethod
    def from_dict(data: dict) -> "Report":
        """The inverse of `to_dict`, for reports read back from a file."""
        return Report(data["model"], data["summary"]["conversion_seconds"], data["plan"], data["summary"],
                      data.get("validation"))

    def to_dict(self) -> dict:
        return {"model": self.model, "summary": self.summary, "plan": self.plan, "validation": self.validation}

    def rows(self) -> list[tuple[str, ...]]:
        """One row per layer, kept module and loose parameter: name, op, action, units, parameters, the
        producers feeding its input, and its input map (converted layers) or the reason (the rest)."""
        rows = []
        for layer in self.plan["layers"]:
            masked = layer["role"] == "masked"
            rows.append((layer["name"], layer["op"], "converted" if masked else "head (per task)",
                         str(layer["units"]), str(layer["params"]), ", ".join(layer["input_producers"]) or "-",
                         (f"{layer['input_map']}: {layer['reason']}" if layer["reason"] else layer["input_map"])
                         if masked else layer["reason"] or "-"))
        for module in self.plan["modules"]:
            if module["policy"] != "head":
                rows.append((module["name"], module["op"], _action(module["policy"], module["reason"]), "-",
                             str(module["params"]), "-", module["reason"]))
        for param in self.plan["params"]:
            if param["policy"] != "head":
                rows.append((param["name"], "parameter", _action(param["policy"], param["reason"]), "-",
                             str(math.prod(param["shape"])), "-", param["reason"]))
        return rows

    def headline(self) -> str:
        s = self.summary
        folded = f" ({s['folded_gates']} folded into the norm or linear layer before)" if s.get("folded_gates") else ""
        return (f"{s['hat_layers']} HAT layers, {s['heads']} heads, {s['task_indexed_modules']} task-indexed "
                f"norms, {s['mask_units']} mask units, {s.get('gates', '?')} mask applications{folded}, "
                f"{s['nodes']} graph nodes; "
                f"{100 * s['hat_parameter_share']:.1f}% of parameters under HAT control; "
                f"input map known for {s['known_input_maps']} of {s['layers_with_inputs']} HAT layers; "
                f"{'planned' if s['converted_parameters'] is None else 'converted'} in {s['conversion_seconds']:.2f} s")

    def notes(self) -> list[tuple[str, str]]:
        """(kind, text) for every opaque boundary, unknown op and the validation verdict."""
        notes = [("opaque", f"{name}: {why}") for name, why in self.plan["opaque"].items()]
        notes += [("unknown op", f"{op['node']} ({op['op']}) at {op['line'] or '?'}: {op['reason']}")
                  for op in self.plan["unknown"]]
        s = self.summary
        if s.get("frozen"):
            notes.append(("frozen", f"{len(s['frozen'])} modules/parameters kept as they are (requires_grad=False: "
                                    f"no gate, no protection, no per-task copy): {_listed(s['frozen'])}"))
        if s.get("gated_frozen_layers"):
            notes.append(("frozen", f"frozen layers with a per-task gate only: {_listed(s['gated_frozen_layers'])}"))
        if s.get("shared_trainable"):
            notes.append(("SHARED", f"trainable by every task and NOT protected, old tasks forget: "
                                    f"{_listed(s['shared_trainable'])}"))
        if self.validation:
            v = self.validation
            notes.append(("validation", f"{'passed' if v['passed'] else 'FAILED'}: largest open-mask difference "
                                        f"{v['largest_difference']:.3g} (tolerance {v['tolerance']:.3g}), probe "
                                        f"violations {v['probe_violations']}, parameters without gradient "
                                        f"{len(v['missing_gradients'])}"))
        return notes

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"hatify: {self.model}", show_lines=False)
        for col in _COLUMNS:
            table.add_column(col, overflow="fold", justify="right" if col in ("units", "params") else "left")
        for row in self.rows():
            table.add_row(*map(escape, row))
        yield table
        yield f"[bold]{self.headline()}[/]"
        styles = {"opaque": "yellow", "unknown op": "yellow", "validation": "green", "frozen": "cyan", "SHARED": "red"}
        for kind, text in self.notes():
            style = "red" if kind == "validation" and not self.validation["passed"] else styles[kind]
            yield f"[{style}]{kind}[/] {escape(text)}"

    def to_markdown(self) -> str:
        """The same report as a Markdown document (a table and the summary)."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [f"# hatify: {self.model}", "", "| " + " | ".join(_COLUMNS) + " |",
                 "|" + "|".join("---:" if c in ("units", "params") else "---" for c in _COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows()]
        lines += ["", self.headline() + "."]
        notes = self.notes()
        if notes:
            lines += [""] + [f"- **{kind}** {cell(text)}" for kind, text in notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=_Null())
        console.print(self)
        return console.export_text()


_COLUMNS = ("layer", "op", "action", "units", "params", "input from", "input map / reason")


_ACTIONS = {"task_indexed": "task-indexed", "per_task": "copied per task", "freeze": "frozen",
            "frozen": "kept frozen", "shared": "SHARED (forgets)",
            "statistics_per_task": "statistics per task, affine frozen"}


def _action(policy: str, reason: str) -> str:
    return f"opaque, {_ACTIONS.get(policy, policy)}" if reason.startswith("opaque") else _ACTIONS.get(policy, policy)


def kept_names(plan, policy: str) -> list[str]:
    """Modules and parameters left out of HAT with `policy` ("frozen": kept as they are, never trained;
    "shared": trainable by every task, unprotected)."""
    return [m.name for m in plan.modules if m.policy == policy] + [p.name for p in plan.params if p.policy == policy]


def known_input_maps(plan) -> tuple[int, int]:
    """(masked layers whose input map is known, masked layers with input units): the precision of the mask flow.
    A layer fed by the model input counts as not known (no mask can feed it)."""
    layers = [layer for layer in plan.masked_layers if layer.input_units is not None]
    return sum(not layer.input_map.startswith("ones") for layer in layers), len(layers)


def _summary(plan, seconds: float, converted: int | None, folded: int | None) -> dict:
    masked = sum(layer.params for layer in plan.masked_layers)
    known, with_inputs = known_input_maps(plan)
    # A head module is also a head layer: count its parameters once.
    original = sum(layer.params for layer in plan.layers) + sum(m.params for m in plan.modules if m.policy != "head") \
        + sum(math.prod(p.shape) for p in plan.params if p.policy != "head")
    return {
        "nodes": plan.node_count, "hat_layers": len(plan.masked_layers),
        "heads": sum(layer.role == "head" for layer in plan.layers),
        "mask_units": plan.total_units,
        "task_indexed_modules": sum(m.policy in ("task_indexed", "statistics_per_task") for m in plan.modules),
        "opaque_modules": [m.name for m in plan.modules if m.reason.startswith("opaque")],
        "loose_parameters": [p.name for p in plan.params if p.policy != "head"],
        "known_input_maps": known, "layers_with_inputs": with_inputs, "known_input_share": known / max(1, with_inputs),
        "unknown_ops": len(plan.unknown), "remasked_norms": len(plan.remask),
        "gates": len(plan.gates) + len(plan.remask), "folded_gates": folded,
        "original_parameters": original, "parameters_in_hat_layers": masked,
        "hat_parameter_share": masked / max(1, original),
        "converted_parameters": converted,
        "frozen": kept_names(plan, "frozen"), "shared_trainable": kept_names(plan, "shared"),
        "frozen_parameters": len(plan.frozen),
        "gated_frozen_layers": [layer.name for layer in plan.masked_layers if layer.frozen],
        "conversion_seconds": round(seconds, 4),
    }


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


class _Null:
    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass
