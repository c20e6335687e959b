"""Saving and loading converted models: one safetensors file, tensors plus a JSON recipe in its header.

Loading never unpickles. It rebuilds the architecture from the recipe (a timm name or an importable
factory) or from the `model=` the caller supplies, converts it again with the recorded configuration
and example input shapes, re-freezes the trained tasks and only then loads the tensors.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils import _pytree as pytree

from . import fsdp
from .config import HATConfig
from .convert import hatify
from .errors import HatifyError
from .inputs import CONSTANTS, KEYWORD, Inputs
from .layers import Protect
from .model import HATModel
from .report import Report
from .rewrite import SCALE_ARG, TASK_ARG
from .shapes import TensorSpec
from .sources import build_source
from .validate import _unwrap

FORMAT = 1
METADATA_KEY = "hatify"
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header
_REQUIRED = {"source", "num_tasks", "config", "example_inputs", "trained_tasks", "report"}


def save(hat: nn.Module, path: str | os.PathLike) -> None:
    """Write `hat` to `path` atomically: its tensors in safetensors, its recipe as JSON metadata. For a model
    sharded with `fully_shard` every rank must call it (the full tensors are gathered); rank 0 writes the file.

    Example:
        >>> hatify.save(hat, "model.hat")
        >>> again = hatify.load("model.hat")            # or load("model.hat", model=untrained_instance)
    """
    hat = _unwrap(hat)
    fsdp.refuse_fsdp1(hat, "save()")
    fsdp.reshard(hat)
    sharded = fsdp.is_sharded(hat)  # fully_shard: every rank calls save() (gathers), rank 0 writes
    tensors, written = {}, set()
    for key, value in hat.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise HatifyError(f"cannot save state entry {key!r}: it is a {type(value).__name__}, not a tensor")
        value = fsdp.full(value.detach())
        storage = value.untyped_storage()
        # Own, contiguous storage per entry (safetensors refuses tensors that share memory): copied where not.
        alone = value.device.type == "cpu" and value.numel() > 0 and value.is_contiguous() and \
            value.storage_offset() == 0 and storage.nbytes() == value.nbytes and storage.data_ptr() not in written
        tensors[key] = value if alone else value.to("cpu", copy=True).contiguous()
        written.add(storage.data_ptr())
    header = {METADATA_KEY: _to_json(metadata(hat), "the model's recipe")}
    if not sharded or torch.distributed.get_rank() == 0:
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    if sharded:
        torch.distributed.barrier()  # the file exists on return, on every rank


def metadata(hat: HATModel) -> dict[str, Any]:
    """Everything `load` needs besides the tensors, and what `hatify report` shows."""
    from . import __version__   # defined by the package once its imports are done

    report = hat.report if hat.report is not None else Report.build(hat, seconds=0.0)
    config = hat.plan.config
    return {
        "format": FORMAT, "hatify_version": __version__, "torch_version": torch.__version__,
        "source": hat.source, "model_class": hat.net.__class__.__name__, "num_tasks": hat.num_tasks,
        "config": config.to_dict(), "leaf_module_types": [isinstance(m, type) for m in config.leaf_modules],
        "example_inputs": example_input_specs(hat), "example_keyword_inputs": example_input_specs(hat, keyword=True),
        "example_constants": hat.net.meta.get(CONSTANTS, {}), "trained_tasks": hat.trained_tasks,
        "capacity": hat.capacity(),
        "report": report.to_dict(),
    }


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a file written by `save`, read from the header alone (no tensors loaded)."""
    path = _existing(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HatifyError(f"{path} is not a hatify file: it is too short to hold a safetensors header")
            (length,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if length > min(_HEADER_LIMIT, size - 8):
                raise HatifyError(f"{path} is not a hatify file, or it is truncated: its header claims "
                                  f"{length} bytes but the file has {size - 8} after the length field")
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HatifyError(f"{path} is not a hatify file, or it is corrupt: its header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise HatifyError(f"{path} is not a hatify file: it has no hatify metadata (was it written by hatify.save?)")
    try:
        end = max((int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"),
                  default=0)
        data = json.loads(meta[METADATA_KEY])
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise HatifyError(f"{path} is corrupt: its header cannot be read ({type(exc).__name__}: {exc})") from exc
    if 8 + length + end > size:
        raise HatifyError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise HatifyError(f"{path} uses hatify file format {found!r}; this hatify reads format {FORMAT}")
    missing = sorted(_REQUIRED - set(data))
    if missing or not isinstance(data["report"], dict) or not isinstance(data["report"].get("plan"), dict):
        raise HatifyError(f"{path} is corrupt: its hatify metadata lacks {', '.join(missing) or 'the plan'}")
    return data


def load(path: str | os.PathLike, model: nn.Module | None = None) -> HATModel:
    """Load a model written by `save`, without unpickling anything; returned in eval mode.

    `model` is an untrained instance of the original architecture; it is needed only when the file's
    recipe cannot rebuild it (a model that was not created from timm or an importable factory).

    Example:
        >>> hat = hatify.load("resnet18.hat")
        >>> hat(x, task_id=0).shape
        torch.Size([8, 1000])
    """
    meta = read_metadata(path)
    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HatifyError(f"{path} is corrupt: its tensors cannot be read ({exc})") from exc
    if model is None:
        model = build_source(meta["source"], meta.get("model_class", "the model"))
    elif not isinstance(model, nn.Module):
        raise HatifyError(f"load(path, model=...) needs an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    # Parameters frozen at conversion were kept out of HAT: freeze them again for the conversion only.
    frozen = set(meta["report"]["plan"].get("frozen", ()))
    thawed = [p for name, p in model.named_parameters() if name in frozen and p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad_(False)
        hat = hatify(model, meta["num_tasks"], recorded_inputs(meta), config_from(meta), source=meta["source"])
    finally:
        model.train(was_training)
        for p in thawed:
            p.requires_grad_(True)
    if hat.plan.total_units != meta["report"]["plan"]["total_units"]:
        raise HatifyError(f"the rebuilt architecture has {hat.plan.total_units} mask units but {path} was saved "
                          f"with {meta['report']['plan']['total_units']}: pass the original architecture as model=, or, if this hatify "
                          f"converts it differently from the one that saved the file (version "
                          f"{meta.get('hatify_version', 'unknown')}), convert the original weights again")
    with torch.no_grad():
        for t in meta["trained_tasks"]:
            hat._freeze_task(t)
            hat.trained[t] = True
    try:
        hat.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise HatifyError(f"the tensors in {path} do not fit the rebuilt architecture; pass the original "
                          f"architecture as model=, or, if an earlier hatify saved it and converted it differently "
                          f"(tied embeddings and weight-normed layers are converted differently now), convert the "
                          f"original weights again ({reason[:400]})") from exc
    for module in hat.modules():
        if isinstance(module, Protect):
            module.active = bool(module.protect.any())
    if hat.report is not None:
        hat.report.validation = meta["report"].get("validation")
    return hat


def config_from(meta: dict) -> HATConfig:
    """The recorded HATConfig; leaf module types are imported back from their qualified names."""
    recorded = dict(meta["config"])
    known = {f.name for f in dataclasses.fields(HATConfig)}
    unknown = set(recorded) - known
    if unknown:
        raise HatifyError(f"the file's config has fields this hatify does not know: {', '.join(sorted(unknown))}")
    kinds = meta.get("leaf_module_types") or [False] * len(recorded.get("leaf_modules", ()))
    recorded["leaf_modules"] = tuple(_import_type(m) if is_type else m
                                     for m, is_type in zip(recorded.get("leaf_modules", ()), kinds))
    for key in ("heads", "task_outputs", "include", "exclude"):
        if isinstance(recorded.get(key), list):
            recorded[key] = tuple(recorded[key])
    return HATConfig(**recorded)


def _import_type(qualified: str) -> type:
    # The module part is the longest prefix that imports; the rest may be a nested class.
    parts = qualified.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for part in parts[split:]:
                obj = getattr(obj, part)
        except AttributeError:
            break
        if isinstance(obj, type):
            return obj
    raise HatifyError(f"cannot import the leaf module type {qualified!r} named in the file's config")


def example_input_specs(hat: HATModel, keyword: bool = False) -> list | dict:
    """The example inputs the model was converted with, as JSON: shapes and dtypes, from the graph; the
    positional ones as a list, or (`keyword=True`) the keyword ones by name."""
    placeholders = [n for n in hat.net.graph.nodes if n.op == "placeholder" and n.target not in (TASK_ARG, SCALE_ARG)
                    and bool(n.meta.get(KEYWORD)) == keyword]
    if keyword:
        return {n.target: _spec_to_json(n.meta.get("hat_spec")) for n in placeholders}
    specs = [n.meta.get("hat_spec") for n in placeholders]
    has_tensor = [any(isinstance(leaf, TensorSpec) for leaf in pytree.tree_leaves(s)) for s in specs]
    keep = max((i + 1 for i, flag in enumerate(has_tensor) if flag), default=0)
    return [_spec_to_json(s) for s in specs[:keep]]


def _spec_to_json(spec: Any) -> Any:
    if isinstance(spec, TensorSpec):
        return {"shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch.")}
    if isinstance(spec, (tuple, list)):
        return {"sequence": [_spec_to_json(s) for s in spec]}
    if isinstance(spec, dict):
        return {"mapping": {str(k): _spec_to_json(v) for k, v in spec.items()}}
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return {"value": spec}
    raise HatifyError(f"cannot record an example input of type {type(spec).__name__} in the file")


def recorded_inputs(meta: dict) -> Inputs:
    """The recorded example inputs (zero tensors of their shapes), keyword inputs and constants included."""
    keywords = {name: example_inputs([spec])[0] for name, spec in meta.get("example_keyword_inputs", {}).items()}
    return Inputs(example_inputs(meta["example_inputs"]), {**keywords, **meta.get("example_constants", {})})


def example_inputs(specs: list) -> tuple:
    """Zero tensors of the recorded shapes and dtypes: enough to trace and propagate shapes again."""
    def build(spec: dict) -> Any:
        if "shape" in spec:
            dtype = getattr(torch, spec["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise HatifyError(f"unknown dtype {spec['dtype']!r} in the file's example inputs")
            return torch.zeros(spec["shape"], dtype=dtype)
        if "sequence" in spec:
            return tuple(build(s) for s in spec["sequence"])
        if "mapping" in spec:
            return {k: build(v) for k, v in spec["mapping"].items()}
        return spec["value"]

    return tuple(build(s) for s in specs)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`: a reader sees
    the old file or the complete new one, never a partial one, and a failure leaves nothing behind."""
    target = Path(path)
    if not target.parent.is_dir():
        raise HatifyError(f"cannot write {target}: directory {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise HatifyError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise HatifyError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise HatifyError(f"{path} is a directory: give the path of a file written by hatify.save (e.g. model.hat)")
    if not path.is_file():
        raise HatifyError(f"no such file: {path}")
    return path


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise HatifyError(f"cannot save {what} as JSON ({exc}); give hatify.hatify(..., source=...) and the "
                          "config JSON-compatible values") from exc
