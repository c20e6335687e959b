"""The user's top-level names that the converted GraphModule cannot hold (`meta`, `graph`, `code`, `forward`:
attributes of `torch.fx.GraphModule` or of hatify's own layers) live in the graph under an alias; the report,
`capacity()`, `state_dict()` and saved files show the user's names again.

    >>> aliases(["meta", "fc"], {"meta", "graph"})
    {'user_meta': 'meta'}
"""
from __future__ import annotations

import functools
import re
from typing import Any, Iterable

from torch import nn


def aliases(names: Iterable[str], reserved: set[str]) -> dict[str, str]:
    """alias -> user name for every name in `names` that is `reserved`; an alias clashes with nothing."""
    names = list(names)
    renamed = {}
    for name in names:
        if name in reserved:
            alias = f"user_{name}"
            while alias in reserved or alias in names or alias in renamed:
                alias += "_"
            renamed[alias] = name
    return renamed


def _pattern(renamed: dict[str, str]) -> re.Pattern:
    # An alias as the first segment of a dotted name: `user_meta`, `user_meta.fc.weight`, `... user_meta.fc ...`.
    return re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(renamed, key=len, reverse=True))) + r")(?!\w)")


def user_names(value: Any, renamed: dict[str, str]) -> Any:
    """`value` (a report dict, a name, a list of names) with every alias written as the user's name."""
    if not renamed:
        return value
    pattern = _pattern(renamed)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return pattern.sub(lambda m: renamed[m.group(1)], item)
        if isinstance(item, dict):
            return {walk(k): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    return walk(value)


def graph_names(value: Any, renamed: dict[str, str]) -> Any:
    """The inverse of `user_names`: the user's names (and fnmatch patterns on them: `meta.*`) as the graph holds
    them, for the config fields that name modules (`heads`, `include`, `exclude`)."""
    return user_names(value, {user: alias for alias, user in renamed.items()})


def keep_user_names(model: nn.Module, renamed: dict[str, str], graph_prefix: str) -> None:
    """`model.state_dict()` (and so every saved file) uses the user's names for the aliased entries of the graph
    module at `graph_prefix` (`"net."`); `load_state_dict` takes them back."""
    if renamed:
        model.register_state_dict_post_hook(functools.partial(_to_user, renamed=renamed, graph_prefix=graph_prefix))
        model.register_load_state_dict_pre_hook(functools.partial(_to_alias, renamed=renamed,
                                                                  graph_prefix=graph_prefix))


def _rename_keys(state_dict: dict, mapping: dict[str, str]) -> None:
    """Rename, in place and in order, every key equal to a mapping key or starting with it and a dot."""
    def new(key: str) -> str:
        for old, replacement in mapping.items():
            if key == old or key.startswith(old + "."):
                return replacement + key[len(old):]
        return key

    items = list(state_dict.items())
    state_dict.clear()
    state_dict.update((new(k), v) for k, v in items)


def _to_user(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, renamed: dict[str, str],
             graph_prefix: str) -> None:
    _rename_keys(state_dict, {f"{prefix}{graph_prefix}{a}": f"{prefix}{graph_prefix}{u}" for a, u in renamed.items()})


def _to_alias(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
              missing_keys: list, unexpected_keys: list, error_msgs: list, *, renamed: dict[str, str],
              graph_prefix: str) -> None:
    _rename_keys(state_dict, {f"{prefix}{graph_prefix}{u}": f"{prefix}{graph_prefix}{a}" for a, u in renamed.items()})
