"""The `hatify` command: convert a model from the shell, dry-run a conversion, read a converted file.

    hatify convert timm:resnet18 --num-tasks 5 -o resnet18.hat
    hatify report resnet18.hat [--json]
    hatify explain timm:resnet18

Exit status: 0 converted and validated; 1 validation failed (or --strict and something was left
unconverted); 2 bad usage or bad input, with one line on stderr (a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from . import __version__
from . import io as hat_io
from .convert import explain as explain_plan
from .convert import hatify
from .errors import HatifyError
from .capacity import capacity_table, plot_capacity
from .report import Report
from .shapes import infer_example_inputs
from .sources import config_with, example_inputs, load_model, parse_input_shape, parse_source
from .validate import validate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a HatifyError, so it ends as one line like any bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise HatifyError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _source_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE",
                         help="timm:NAME[,key=value...] | hf:DIRECTORY | hf:MODEL_TYPE[,key=value...] | "
                              "package.module:factory[,key=value...] | a model file")
    command.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                         help="example input shape, e.g. 1,3,224,224 (optionally :dtype, e.g. 2,16:int64), or a "
                              "keyword input NAME=SHAPE, e.g. input_ids=2,16:int64; repeat for several inputs; a timm "
                              "model's default size, or an hf: model's usual inputs, are used when omitted")
    command.add_argument("--hf-class", metavar="CLASS",
                         help="the transformers class an hf: SOURCE is built with, e.g. "
                              "AutoModelForSequenceClassification (default: AutoModel)")
    command.add_argument("--arch", metavar="ARCH",
                         help="architecture for a state-dict SOURCE (.pt or .safetensors): timm:NAME or "
                              "package.module:factory, with optional ,key=value arguments")
    command.add_argument("--trust-pickle", action="store_true",
                         help="allow a SOURCE file holding a whole pickled nn.Module (unpickling runs code)")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                         help="override a HATConfig field, e.g. --set s_max=200 --set loose_params=freeze")
    command.add_argument("--debug", action="store_true", help="show tracebacks and warnings")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hatify", description="Turn any PyTorch model into a HAT continual learner.")
    parser.add_argument("--version", action="version", version=f"hatify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert SOURCE, validate it, print the report, write OUT")
    _source_options(convert)
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="the converted model file to write")
    convert.add_argument("--num-tasks", required=True, type=_positive_int, metavar="N")
    convert.add_argument("--report-json", metavar="FILE", help="also write the report as JSON")
    convert.add_argument("--report-md", metavar="FILE", help="also write the report as Markdown")
    convert.add_argument("--strict", action="store_true",
                         help="exit 1 (and write no OUT) if any module or op was left unconverted")
    convert.set_defaults(run=run_convert)

    explain = commands.add_parser("explain", help="dry run: print what convert would do, write nothing")
    _source_options(explain)
    explain.add_argument("--num-tasks", type=_positive_int, default=1, metavar="N")
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    explain.set_defaults(run=run_explain)

    report = commands.add_parser("report", help="print the conversion report stored in a converted file")
    report.add_argument("file", metavar="FILE")
    report.add_argument("--json", action="store_true", help="print the file's metadata as JSON")
    report.add_argument("--plot", metavar="PNG", help="also write the capacity heatmap (units per layer and task)")
    report.add_argument("--debug", action="store_true", help="show tracebacks")
    report.set_defaults(run=run_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if os.getcwd() not in sys.path:   # factories in the current directory import, as under `python -m`
        sys.path.insert(0, os.getcwd())
    out = Console(soft_wrap=False)  # the terminal's width; piped: COLUMNS, else 80
    with warnings.catch_warnings(record=not debug) as caught:
        try:
            args = build_parser().parse_args(argv)
            status = args.run(args, out, Console(stderr=True))
        except HatifyError as exc:
            return _fail(exc, debug, "error")
        except KeyboardInterrupt:
            print("hatify: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a crash inside a conversion is still one line for the user
            return _fail(exc, debug, f"unexpected {type(exc).__name__} (run with --debug for the traceback)")
    for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught or () if str(w.message)):
        print(f"hatify: warning: {message}", file=sys.stderr)
    return status


def _fail(exc: BaseException, debug: bool, what: str) -> int:
    if debug:
        traceback.print_exception(exc)
    print(f"hatify: {what}: {' '.join(str(exc).split())}", file=sys.stderr)
    return EXIT_USAGE


@contextlib.contextmanager
def _step(err: Console, text: str) -> Iterator[None]:
    """A spinner on a terminal's stderr while a slow step runs; nothing when stderr is not a terminal."""
    if not err.is_terminal:
        yield
        return
    with err.status(text):
        yield


def _prepare(args: argparse.Namespace, err: Console) -> tuple[Any, dict, tuple, Any]:
    """Everything a conversion needs, checked before any slow work: model, recipe, example inputs, config."""
    shapes = [parse_input_shape(text) for text in args.input_shape]
    config = config_with(args.overrides)
    spec = parse_source(args.source)
    arch = parse_source(args.arch, "--arch", files=False) if args.arch else None
    if arch is not None and spec.kind != "file":
        raise HatifyError("--arch is only for a state-dict file SOURCE (.pt or .safetensors)")
    with _step(err, f"loading {args.source}"):
        model, recipe = load_model(spec, arch, args.trust_pickle, args.hf_class)
    model.eval()
    if spec.kind == "hf":
        from .hf_source import example_inputs as hf_inputs

        inputs = hf_inputs(model, example_inputs(shapes) if shapes else None)
    elif shapes:
        inputs = example_inputs(shapes)
    else:
        try:
            inputs = infer_example_inputs(model)
        except HatifyError:
            raise HatifyError(f"the input shape of {type(model).__name__} cannot be inferred: pass "
                              "--input-shape, e.g. --input-shape 1,3,224,224") from None
    return model, recipe, inputs, config


def _check_writable(*paths: str | None) -> None:
    for path in filter(None, paths):
        target = Path(path)
        if target.is_dir():
            raise HatifyError(f"cannot write {target}: it is a directory")
        if not target.parent.is_dir():
            raise HatifyError(f"cannot write {target}: directory {target.parent} does not exist")


def run_convert(args: argparse.Namespace, out: Console, err: Console) -> int:
    _check_writable(args.output, args.report_json, args.report_md)
    if Path(args.output).resolve() == Path(args.source).resolve():
        raise HatifyError(f"-o {args.output} would overwrite SOURCE")
    model, recipe, inputs, config = _prepare(args, err)
    with _step(err, f"converting {type(model).__name__}"):
        hat = hatify(model, args.num_tasks, inputs, config, source=recipe, validate=False)
    with _step(err, "validating"):
        result = validate(model, hat, inputs)
    hat.report.validation = result.to_dict()
    out.print(hat.report)
    problems = [] if result.passed else [f"validation failed: {'; '.join(result.messages)}"]
    summary = hat.report.summary
    if args.strict and (summary["opaque_modules"] or summary["unknown_ops"]):
        problems.append(f"--strict: left unconverted: {len(summary['opaque_modules'])} opaque module(s) "
                        f"{', '.join(summary['opaque_modules'])}, {summary['unknown_ops']} unknown op(s)")
    if args.report_json:
        hat_io.write_text_atomic(args.report_json, json.dumps(hat.report.to_dict(), indent=2) + "\n")
    if args.report_md:
        hat_io.write_text_atomic(args.report_md, hat.report.to_markdown())
    if problems:
        for problem in problems:
            print(f"hatify: {problem}; {args.output} not written", file=sys.stderr)
        return EXIT_FAILED
    with _step(err, f"writing {args.output}"):
        hat_io.save(hat, args.output)
    size = Path(args.output).stat().st_size
    out.print(f"wrote [bold]{args.output}[/] ({size / 2**20:.1f} MiB)" if size >= 2**20 else
              f"wrote [bold]{args.output}[/] ({size / 2**10:.1f} KiB)")
    return EXIT_OK


def run_explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    model, _, inputs, config = _prepare(args, err)
    start = time.perf_counter()
    with _step(err, f"planning {type(model).__name__}"):
        plan = explain_plan(model, args.num_tasks, inputs, config)
    report = Report.from_plan(plan, type(model).__name__, time.perf_counter() - start)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out.print(report)
    return EXIT_OK


def run_report(args: argparse.Namespace, out: Console, err: Console) -> int:
    meta = hat_io.read_metadata(args.file)
    capacity = meta.get("capacity") or {}
    if args.plot and not (meta["trained_tasks"] and capacity):  # before printing anything
        raise HatifyError(f"--plot: {args.file} has no trained task, so no capacity to plot (train a task: "
                          "begin_task, end_task, then hatify.save)")
    if args.json:
        sys.stdout.write(json.dumps(meta, indent=2) + "\n")
        return EXIT_OK
    about = Table.grid(padding=(0, 2))
    about.add_row("file", args.file)
    about.add_row("source", describe_source(meta["source"]))
    about.add_row("tasks", f"{meta['num_tasks']} (trained: {', '.join(map(str, meta['trained_tasks'])) or 'none'})")
    named = [f"{k}={_describe_input(s)}" for k, s in meta.get("example_keyword_inputs", {}).items()]
    about.add_row("example inputs", ", ".join([_describe_input(s) for s in meta["example_inputs"]] + named) or "-")
    about.add_row("written by", f"hatify {meta['hatify_version']}, torch {meta['torch_version']}")
    out.print(about)
    out.print(Report.from_dict(meta["report"]))
    if meta["trained_tasks"] and capacity:
        out.print(capacity_table(capacity))
    if args.plot:
        out.print(f"wrote {plot_capacity(capacity, args.plot)}")
    return EXIT_OK


def describe_source(source: dict) -> str:
    """A recipe in the syntax SOURCE takes on the command line."""
    kwargs = "".join(f",{k}={v!r}" for k, v in (source.get("kwargs") or {}).items())
    if source.get("kind") == "timm":
        return f"timm:{source['name']}{kwargs}"
    if source.get("kind") == "factory":
        return f"{source['target']}{kwargs}"
    if source.get("kind") == "hf":
        return f"hf:{source.get('config', {}).get('model_type', '?')} ({source.get('class')}, config recorded)"
    if source.get("kind") == "module":
        return f"pickled {source['class']} (hatify.load needs model=)"
    return "unknown (hatify.load needs model=)"


def _describe_input(spec: dict) -> str:
    if "shape" in spec:
        return f"{spec['dtype']}[{','.join(map(str, spec['shape']))}]"
    return json.dumps(spec)


if __name__ == "__main__":
    sys.exit(main())
