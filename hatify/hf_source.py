"""The `hf:` SOURCE: a HuggingFace transformers model from a local directory (`hf:./my-bert`, offline) or from a
config by model type with random weights (`hf:bert,num_hidden_layers=2`), its recipe for `hatify.load`, and
example inputs derived from its config. transformers is imported only here, and only when used."""
from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import HatifyError
from .inputs import Inputs

DEFAULT_CLASS = "AutoModel"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise HatifyError("an hf: SOURCE needs transformers: pip install 'hatify[hf]'") from exc
    return transformers


def model_class(name: str | None) -> Any:
    """`AutoModelForSequenceClassification` (or any transformers class with `from_config`) by name."""
    transformers = _transformers()
    name = name or DEFAULT_CLASS
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise HatifyError(f"--hf-class {name}: not a transformers model class (e.g. AutoModel, "
                          "AutoModelForSequenceClassification, AutoModelForCausalLM)")
    return cls


def _from_config(cls: Any, config: Any) -> nn.Module:
    if hasattr(cls, "from_config"):
        return cls.from_config(config)
    return cls(config)


def load(target: str, kwargs: dict, class_name: str | None) -> tuple[nn.Module, dict]:
    """The model an `hf:` SOURCE names and the recipe that rebuilds its architecture (its whole config)."""
    transformers = _transformers()
    cls = model_class(class_name)
    path = Path(target)
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise HatifyError(f"hf:{target}: the directory has no config.json (a save_pretrained directory)")
            model = cls.from_pretrained(path, local_files_only=True, **kwargs)
        elif "/" in target or target.startswith(".") or target not in transformers.CONFIG_MAPPING:
            raise HatifyError(unknown_model_type(target, list(transformers.CONFIG_MAPPING.keys())))
        else:
            model = _from_config(cls, transformers.AutoConfig.for_model(target, **kwargs))
    except HatifyError:
        raise
    except Exception as exc:
        raise HatifyError(f"hf:{target} with {cls.__name__} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return model, recipe(model, cls.__name__)


def unknown_model_type(target: str, model_types: list[str]) -> str:
    """One short line for an `hf:` target that is neither a directory nor a model type: the closest model types
    (by spelling, or the type a hub name starts with, `bert-base-uncased` -> `bert`), and what to pass instead."""
    name = target.rstrip("/").rsplit("/", 1)[-1].lower()
    prefixes = sorted((t for t in model_types if name.startswith((f"{t}-", f"{t}_"))), key=len, reverse=True)
    close = list(dict.fromkeys(prefixes[:1] + difflib.get_close_matches(name, model_types, n=3)))[:3]
    what = "no such directory" if "/" in target or target.startswith(".") else "unknown model type"
    hint = f" (did you mean {', '.join(f'hf:{t}' for t in close)}?)" if close else ""
    return (f"hf:{target}: {what}{hint}; hub names are not downloaded: pass a save_pretrained directory "
            "(hf:./my-model) or a model type with random weights (hf:bert,num_hidden_layers=2)")


def recipe(model: nn.Module, class_name: str) -> dict:
    config = model.config.to_dict()
    json.dumps(config)  # a config that is not JSON cannot be recorded
    return {"kind": "hf", "class": class_name, "config": config}


def build(source: dict) -> nn.Module:
    """The architecture a recorded `hf` recipe names, with random weights (the file brings the weights)."""
    transformers = _transformers()
    config = dict(source.get("config") or {})
    model_type = config.pop("model_type", None)
    if not model_type:
        raise HatifyError("the file's hf recipe has no model_type in its config: pass model= to hatify.load")
    try:
        return _from_config(model_class(source.get("class")), transformers.AutoConfig.for_model(model_type, **config))
    except HatifyError:
        raise
    except Exception as exc:
        raise HatifyError(f"rebuilding the {model_type} model from the file's config failed: "
                          f"{type(exc).__name__}: {exc}") from exc


def example_inputs(model: nn.Module, given: Inputs | None = None, batch: int = 2, length: int = 16) -> Inputs:
    """Keyword inputs a transformers model takes (`given`, or sized from its config: `input_ids` and what its
    tokenizer returns with them (`text_inputs`) for text, `pixel_values` for vision, `input_values` or
    `input_features` for audio; `decoder_input_ids` too for an encoder-decoder), with `use_cache=False` where the model takes it."""
    config = model.config
    if given is not None:
        return Inputs(given.args, {**_no_cache(model), **given.kwargs})
    gen = torch.Generator().manual_seed(0)
    name = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(config, "vocab_size", None) or 2
    if name == "pixel_values":
        size = _first(getattr(config, "image_size", None), 224)
        channels = getattr(config, "num_channels", 3)
        kwargs = {name: torch.randn(batch, channels, size, size, generator=gen)}
    elif name == "input_values":
        kwargs = {name: torch.randn(batch, 16000, generator=gen)}
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        kwargs = {name: torch.randn(batch, getattr(config, "num_mel_bins", 80), frames, generator=gen)}
    elif name == "input_ids":
        kwargs = {name: torch.randint(0, vocab, (batch, length), generator=gen)}
        for extra in text_inputs(model):
            kwargs[extra] = (torch.ones if extra == "attention_mask" else torch.zeros)(batch, length, dtype=torch.long)
    else:
        raise HatifyError(f"{type(model).__name__} takes {name!r}: give its shape with --input-shape {name}=...")
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, length // 2), generator=gen)
    return Inputs((), {**kwargs, **_no_cache(model)})


def text_inputs(model: nn.Module) -> list[str]:
    """The inputs besides `input_ids` that the model type's tokenizer returns by default and the forward takes
    (`attention_mask`, and `token_type_ids` for BERT): the tokenizer class's `model_input_names`, read without
    loading any vocabulary. Without a known tokenizer: `attention_mask`, and `token_type_ids` where the config
    has several token types."""
    taken = inspect.signature(model.forward).parameters
    names = ["attention_mask"] + (["token_type_ids"] if getattr(model.config, "type_vocab_size", 0) > 1 else [])
    try:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

        entry = TOKENIZER_MAPPING_NAMES.get(getattr(model.config, "model_type", None))
        classes = [n for n in (entry if isinstance(entry, (tuple, list)) else (entry,)) if n]
        tokenizer = tokenizer_class_from_name(classes[0]) if classes else None
        names = list(getattr(tokenizer, "model_input_names", None) or names)
    except Exception:  # a tokenizer class that needs a missing package: keep the guess from the config
        pass
    return [n for n in dict.fromkeys(names) if n != "input_ids" and n in taken]


def _no_cache(model: nn.Module) -> dict:
    """A KV cache is no training output, and no graph output either."""
    if getattr(model.config, "use_cache", False) and "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False}
    return {}


def _first(value: Any, default: int) -> int:
    if isinstance(value, (tuple, list)):
        return int(value[0])
    return int(value) if value else default
