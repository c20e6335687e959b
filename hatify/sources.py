"""Where a model comes from on the command line: `timm:NAME,k=v`, `package.module:factory,k=v`, a state-dict
file with an architecture, or a pickled module (only when trusted). Also the small value parsers the
command line shares: keyword values, input shapes and `--set` config overrides."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import json
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import HATConfig
from .errors import HatifyError
from .inputs import Inputs

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")   # checkpoints that wrap a state dict
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors", ".hat")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_KWARG_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")   # commas inside values such as (64,64) stay
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed SOURCE: kind "timm" (target: model name), "hf" (target: a directory or a model type),
    "factory" (target: "module:function") or "file"."""

    kind: str
    target: str
    kwargs: dict

    def recipe(self) -> dict:
        """The JSON recipe `hatify.load` rebuilds the architecture from."""
        if self.kind == "timm":
            return {"kind": "timm", "name": self.target, "kwargs": self.kwargs}
        return {"kind": "factory", "target": self.target, "kwargs": self.kwargs}


def parse_source(text: str, what: str = "SOURCE", files: bool = True) -> SourceSpec:
    """`timm:resnet18,num_classes=10` | `package.module:factory,width=8` | a file path.

    Example:
        >>> parse_source("timm:resnet18,num_classes=10,img_size=(64,64)")
        SourceSpec(kind='timm', target='resnet18', kwargs={'num_classes': 10, 'img_size': (64, 64)})
    """
    text = text.strip()
    if text.startswith("hf:"):
        target, kwargs = _split_kwargs(text[len("hf:"):], what)
        if not target:
            raise HatifyError(f"{what} {text!r}: expected hf:DIRECTORY or hf:MODEL_TYPE, e.g. hf:bert")
        return SourceSpec("hf", target, kwargs)
    if text.startswith("timm:"):
        name, kwargs = _split_kwargs(text[len("timm:"):], what)
        if not re.fullmatch(r"[\w.\-]+", name):
            raise HatifyError(f"{what} {text!r}: expected timm:NAME, e.g. timm:resnet18")
        return SourceSpec("timm", name, kwargs)
    if files and Path(text).exists():
        if not Path(text).is_file():
            raise HatifyError(f"{what} {text}: not a file")
        return SourceSpec("file", text, {})
    target, kwargs = _split_kwargs(text, what)
    if _TARGET.fullmatch(target):
        return SourceSpec("factory", target, kwargs)
    if files and (Path(text).suffix in FILE_SUFFIXES or "/" in text):
        raise HatifyError(f"{what}: no such file: {text}")
    forms = "timm:NAME, hf:DIRECTORY, hf:MODEL_TYPE, package.module:factory or an existing model file" if files \
        else "timm:NAME or package.module:factory"
    raise HatifyError(f"{what} {text!r} is not one of {forms}{_prefixed(target, files)}")


def _prefixed(name: str, hf: bool) -> str:
    """`; did you mean timm:resnet18?` when a bare name is a timm model (or, for SOURCE, a transformers model
    type); the libraries are only imported on this error path."""
    try:
        import timm
        if timm.is_model(name):
            return f"; did you mean timm:{name}?"
    except ImportError:
        pass
    try:
        from transformers import CONFIG_MAPPING
        if hf and name in CONFIG_MAPPING:
            return f"; did you mean hf:{name}?"
    except ImportError:
        pass
    return ""


def _split_kwargs(text: str, what: str) -> tuple[str, dict]:
    head, *items = _KWARG_SPLIT.split(text)
    kwargs = {}
    for item in items:
        key, _, raw = item.partition("=")
        kwargs[key.strip()] = parse_value(raw)
    if "=" in head or "," in head:
        raise HatifyError(f"{what} {text!r}: keyword arguments follow the name as ,key=value")
    return head.strip(), kwargs


def parse_value(text: str) -> Any:
    """A Python literal (10, 0.5, (64, 64), 'x'), true/false/none in any case, or else the text itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...], str]:
    """`1,3,224,224`, `2,16:int64` or a keyword input `input_ids=2,16:int64` -> (name or None, shape, dtype).

    Example:
        >>> parse_input_shape("input_ids=2,16:int64")
        ('input_ids', (2, 16), 'int64')
    """
    name, sep, rest = text.strip().partition("=")
    if not sep:
        name, rest = None, text
    elif not name.strip().isidentifier():
        raise HatifyError(f"--input-shape {text!r}: a keyword input is NAME=SHAPE, e.g. input_ids=2,16:int64")
    dims, _, dtype = rest.strip().partition(":")
    dtype = dtype.strip() or "float32"
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise HatifyError(f"--input-shape {text!r}: expected positive integers separated by commas, "
                          "e.g. 1,3,224,224 (optionally :dtype, e.g. 2,16:int64)")
    if dtype not in DTYPES:
        raise HatifyError(f"--input-shape {text!r}: unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    return (name.strip() if name else None), shape, dtype


def example_inputs(shapes: list[tuple[str | None, tuple[int, ...], str]]) -> Inputs:
    """Seeded random floats (ones for integer and bool inputs, which are usually indices or masks); named
    shapes become keyword inputs, the others positional ones, in order."""
    gen = torch.Generator().manual_seed(0)
    args, kwargs = [], {}
    for name, shape, dtype_name in shapes:
        dtype = getattr(torch, dtype_name)
        value = torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
        if name is None:
            if kwargs:
                raise HatifyError("--input-shape: positional shapes come before the named ones (NAME=SHAPE)")
            args.append(value)
        elif name in kwargs:
            raise HatifyError(f"--input-shape: {name} is given twice")
        else:
            kwargs[name] = value
    return Inputs(tuple(args), kwargs)


def config_with(overrides: list[str]) -> HATConfig:
    """HATConfig with `key=value` overrides, each value converted to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(HATConfig)}
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise HatifyError(f"--set {item!r}: expected key=value")
        if key not in fields:
            raise HatifyError(f"--set {key}: unknown key; known: {', '.join(fields)}")
        changes[key] = _coerce(key, raw.strip(), fields[key].default)
    return HATConfig(**changes)


def _coerce(key: str, raw: str, default: Any) -> Any:
    if key in ("heads", "task_outputs"):   # "auto", "none"/"all" or names separated by commas
        return raw if raw in ("auto", "none", "all") else tuple(n.strip() for n in raw.split(",") if n.strip())
    if isinstance(default, tuple):
        return tuple(n.strip() for n in raw.split(",") if n.strip())
    if isinstance(default, str):
        return raw
    value = parse_value(raw)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = value is None or isinstance(value, dict)
    if not ok:
        expected = "a dict or none" if default is None else {bool: "true or false", int: "an integer"}.get(
            type(default), "a number")
        raise HatifyError(f"--set {key}={raw}: expected {expected}")
    return value


def build_source(source: dict, model_class: str = "the model", weights: bool = False) -> nn.Module:
    """An instance of the architecture a recipe names: `{"kind": "timm", "name", "kwargs"}` or
    `{"kind": "factory", "target": "package.module:function", "kwargs"}`. `weights=False` drops a timm
    `pretrained=True`: a saved file brings its own weights."""
    kind = source.get("kind")
    kwargs = dict(source.get("kwargs") or {})
    if kind == "hf":
        from . import hf_source

        return hf_source.build(source)
    if kind == "timm":
        import timm

        if not weights:
            kwargs.pop("pretrained", None)
        name = source.get("name", "")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise HatifyError(f"unknown timm model {name!r} (timm {timm.__version__}){hint}")
        try:
            return timm.create_model(name, **kwargs)
        except Exception as exc:
            raise HatifyError(f"timm.create_model({name!r}, **{kwargs}) failed: {type(exc).__name__}: {exc}") from exc
    if kind == "factory":
        factory = import_object(source.get("target", ""))
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise HatifyError(f"{source['target']}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise HatifyError(f"{source['target']} returned a {type(model).__name__}, not an nn.Module")
        return model
    raise HatifyError(f"the architecture of {model_class} cannot be rebuilt from its recipe "
                      f"({json.dumps(source) if source else 'no recipe recorded'}): pass an untrained instance, "
                      "hatify.load(path, model=...)")


def import_object(target: str) -> Callable:
    """`package.module:attribute.path` -> the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise HatifyError(f"expected 'package.module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HatifyError(f"cannot import module {module_name!r} for {target!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HatifyError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise HatifyError(f"{target!r} is not callable")
    return obj


def load_model(spec: SourceSpec, arch: SourceSpec | None = None, trust_pickle: bool = False,
               hf_class: str | None = None) -> tuple[nn.Module, dict]:
    """The model a SOURCE names, and the recipe that rebuilds its architecture (for `hatify.save`)."""
    if hf_class is not None and spec.kind != "hf":
        raise HatifyError("--hf-class is only for an hf: SOURCE")
    if spec.kind == "hf":
        from . import hf_source

        if arch is not None:
            raise HatifyError("--arch is only for a state-dict file SOURCE")
        return hf_source.load(spec.target, spec.kwargs, hf_class)
    if spec.kind != "file":
        if arch is not None:
            raise HatifyError("--arch is only for a state-dict file SOURCE")
        return build_source(spec.recipe(), weights=True), spec.recipe()
    path = Path(spec.target)
    if arch is not None:
        model = build_source(arch.recipe())
        state = read_state_dict(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise HatifyError(f"the state dict in {path} does not fit --arch {arch.target}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
        return model, arch.recipe()
    if trust_pickle and path.suffix != ".safetensors":
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise HatifyError(f"cannot read {path}: {_first_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise HatifyError(f"{path} holds a {type(model).__name__}, not an nn.Module"
                              + ("; for a state dict pass --arch" if isinstance(model, Mapping) else ""))
        kind = type(model)
        return model, {"kind": "module", "class": f"{kind.__module__}.{kind.__qualname__}"}
    read_state_dict(path)
    raise HatifyError(f"{path} holds a state dict: pass the architecture with --arch timm:NAME or "
                      "--arch package.module:factory")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file, loaded with weights_only=True."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise HatifyError(f"cannot read {path}: corrupt or truncated safetensors file "
                              f"({_first_line(exc)})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            pickled = pickled_global(path)
            if pickled is None:
                raise HatifyError(f"cannot read {path}: not a PyTorch file, or corrupt or truncated "
                                  f"({_first_line(exc)})") from exc
            raise HatifyError(f"{path} holds a whole pickled {pickled}, not a state dict, and unpickling it can run "
                              "arbitrary code: convert it with --trust-pickle (and no --arch) if you trust the file"
                              ) from exc
    for key in STATE_DICT_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HatifyError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def pickled_global(path: Path) -> str | None:
    """The first class or function a pickle names, if `path` is a pickle (plain or in PyTorch's zip format);
    None if it is not one. Only reads opcodes: nothing in the file is executed."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not members:
                return None
            data = archive.read(members[0])
    else:
        data = path.read_bytes()
    strings: list[str] = []
    first = None
    try:
        for opcode, arg, _ in pickletools.genops(BytesIO(data)):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif first is None and opcode.name == "GLOBAL":
                first = arg.replace(" ", ".")
            elif first is None and opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                first = ".".join(strings[-2:])
    except Exception:   # not a pickle: genops stops at the first byte that is no opcode
        return None
    return first or "object"


def _first_line(exc: BaseException) -> str:
    """`Type: first sentence` of an exception: library messages can run to paragraphs."""
    lines = str(exc).strip().splitlines()
    sentence = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {sentence}"
