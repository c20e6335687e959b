"""The conversion report: made from the plan; rich tables on screen, a plain dict for JSON."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table

from .layers import FoldedGate
from .naming import user_names
from .nested import nested_parts, nested_paths
from .plan import MADE_FROM


@dataclass
class Report:
    model: str
    seconds: float
    plan: dict
    summary: dict
    validation: dict | None = None

    @staticmethod
    def build(hat, seconds: float) -> "Report":
        folded = sum(isinstance(gate, FoldedGate) for net in [hat.net, *(hat.net.get_submodule(path) for path in
                                                                         nested_paths(hat.plan))]
                     for gate in net.hat_gates.values())
        summary = _summary(hat.plan, seconds, converted=sum(p.numel() for p in hat.parameters()), folded=folded)
        return Report(hat.net.__class__.__name__, seconds, *user_names((hat.plan.to_dict(), summary), hat.plan.renamed))

    @staticmethod
    def from_plan(plan, model: str, seconds: float) -> "Report":
        """The report of a dry run (`hatify.explain`): no converted model, so `converted_parameters` and
        `folded_gates` are None."""
        summary = _summary(plan, seconds, converted=None, folded=None)
        return Report(model, seconds, *user_names((plan.to_dict(), summary), plan.renamed))

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
                         _input_cell(layer) if masked else layer["reason"] or "-"))
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
        broken: dict[str, list[str]] = {}  # opaque module -> its submodules converted as nested HAT subgraphs
        for path in self.plan.get("nested", ()):
            broken.setdefault(path.rpartition(".")[0], []).append(path)
        notes = [("graph break", f"{name}: {why}; kept opaque, its submodules {', '.join(broken[name])} are HAT "
                                 "subgraphs") if name in broken else ("opaque", f"{name}: {why}")
                 for name, why in self.plan["opaque"].items()]
        notes += [("unknown op", f"{op['node']} ({op['op']}) at {op['line'] or '?'}: {op['reason']}")
                  for op in self.plan["unknown"]]
        s = self.summary
        if s.get("unmasked_inputs"):
            notes.append(("no input mask", f"{len(s['unmasked_inputs'])} converted layers get no mask on their input "
                                           f"(protected by output unit only; why: the table): "
                                           f"{_listed(s['unmasked_inputs'])}"))
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
        rows = self.rows()
        yield self._table(rows) if _table_width(rows) <= options.max_width else self._stacked(rows)
        yield f"[bold]{self.headline()}[/]"
        styles = {"opaque": "yellow", "graph break": "yellow", "unknown op": "yellow", "no input mask": "yellow",
                  "validation": "green",
                  "frozen": "cyan", "SHARED": "red"}
        for kind, text in self.notes():
            style = "red" if kind == "validation" and not self.validation["passed"] else styles[kind]
            yield f"[{style}]{kind}[/] {escape(text)}"

    def _table(self, rows: list[tuple[str, ...]]) -> Table:
        """One column per field; only the input map / reason wraps (at words)."""
        table = Table(title=f"hatify: {self.model}", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in _COLUMNS:
            table.add_column(col, justify="right" if col in ("units", "params") else "left",
                             no_wrap=col not in _COLUMNS[-2:], min_width=_REASON_WIDTH if col == _COLUMNS[-1] else None)
        for row in rows:
            table.add_row(*map(escape, row))
        return table

    def _stacked(self, rows: list[tuple[str, ...]]) -> Table:
        """A terminal too narrow for one column per field (80 columns): the layer name, then everything else as
        one text that wraps at words, so names never break."""
        table = Table(title=f"hatify: {self.model}", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("layer", no_wrap=True)
        table.add_column("op, action, units, parameters; input map / reason")
        for name, op, action, units, params, producers, text in rows:
            sizes = f"{units} units, {params} params" if units != "-" else f"{params} params"
            source = f" from {producers}" if producers != "-" else ""
            tail = f"input {text}{source}" if action == "converted" else text
            table.add_row(escape(name), escape(f"{op}, {action}, {sizes}; {tail}"))
        return table

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
        """The table at the terminal's width (`COLUMNS`, else 80 when there is no terminal), as rich measures it."""
        console = Console(record=True, file=_Null())
        console.print(self)
        return console.export_text()


_REASON_WIDTH = 30  # the input map / reason column is never narrower


def _table_width(rows: list[tuple[str, ...]]) -> int:
    """The width one column per field needs: every column but the wrapping last two at their widest, the
    producers at up to 24 characters, the reason at `_REASON_WIDTH`, two spaces between columns."""
    widths = [max([len(col)] + [len(row[i]) for row in rows]) for i, col in enumerate(_COLUMNS)]
    return sum(widths[:-2]) + min(widths[-2], 24) + _REASON_WIDTH + 2 * (len(_COLUMNS) - 1)


def _unmasked_input(layer) -> bool:
    """A converted layer whose input units carry no mask, for a reason other than being fed by the model input."""
    return layer.input_units is not None and not layer.input_producers and not layer.reason.startswith(MADE_FROM)


def _input_cell(layer: dict) -> str:
    """A converted layer's input map, with the reason where no mask reaches its input (or it is not used)."""
    if layer["reason"] and not layer["input_producers"]:
        return f"ones: {layer['reason']}"
    return f"{layer['input_map']}; {layer['reason']}" if layer["reason"] else layer["input_map"]


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
        "unmasked_inputs": [layer.name for layer in plan.masked_layers if _unmasked_input(layer)],
        "gates": sum(len(p.gates) + len(p.remask) for p in [plan, *(part.plan for _, part in nested_parts(plan))]),
        "folded_gates": folded,
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
