"""The one exception type a user can cause, so callers can catch hatify's complaints in one place."""
import os

_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class HatifyError(ValueError):
    """Bad input to hatify: the message names the module, node or argument at fault and what to do."""


class HatifyWarning(UserWarning):
    """Something the user may want to change: hatify did what was asked, but the result may not be what is
    wanted (filter with `warnings.simplefilter("ignore", hatify.HatifyWarning)`)."""


class ValidationFailed(HatifyError):
    """`hatify()` converted the model but the conversion failed validation; `report` holds the plan and figures,
    `result` the `ValidationResult`."""

    def __init__(self, message: str, report=None, result=None) -> None:
        super().__init__(message)
        self.report, self.result = report, result


def node_location(node) -> str:
    """`node 'conv1' (call_module conv1) at model.py:42` for error messages and report entries."""
    where = f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)})"
    line = source_line(node)
    return f"{where} at {line}" if line else where


def source_line(node) -> str:
    """The user's source line that created `node`, from the stack trace fx recorded while tracing."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")
              and "/torch/" not in ln and _OWN_DIR not in ln]
    if not frames:
        return ""
    # 'File "/path/model.py", line 42, in forward' -> 'model.py:42'
    parts = frames[-1].split('"')
    path = parts[1].rsplit("/", 1)[-1] if len(parts) > 1 else "?"
    line = frames[-1].split("line ")[-1].split(",")[0]
    return f"{path}:{line}"
