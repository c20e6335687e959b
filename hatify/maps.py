"""Unit maps: which mask units gate each element of a tensor.

A `UnitMap` is a union of terms. A term is an int64 tensor broadcastable to the tensor it describes;
each element holds a global mask-unit index, or ONES (-1) where no mask is known to zero it. The
element is guaranteed exactly zero when every unit it names (over all terms) is zero. Shape-moving ops
(view, permute, cat, split, ...) are followed by applying the very same op to the terms, so index
maps through flatten, concat, reshapes and attention come out of one mechanism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ONES = -1


def compress(term: torch.Tensor) -> torch.Tensor:
    """Shrink every axis along which the term is constant to size 1 (keeps maps small)."""
    for dim in range(term.ndim):
        if term.shape[dim] > 1:
            first = term.narrow(dim, 0, 1)
            if bool((term == first).all()):
                term = first
    return term.contiguous()


@dataclass(frozen=True)
class UnitMap:
    terms: tuple[torch.Tensor, ...] = ()
    # True when a union needed more terms than allowed and was made unknown for that reason.
    truncated: bool = False

    @staticmethod
    def ones() -> "UnitMap":
        return UnitMap()

    @staticmethod
    def units(offset: int, count: int, ndim: int, axis: int) -> "UnitMap":
        """The map of a mask applied along `axis` of an `ndim`-dim tensor."""
        shape = [1] * ndim
        shape[axis] = count
        return UnitMap((torch.arange(offset, offset + count).view(shape),))

    @property
    def is_ones(self) -> bool:
        return not self.terms

    def expanded(self, shape: Sequence[int]) -> list[torch.Tensor]:
        """Terms broadcast to `shape`; a ONES map becomes one term filled with ONES."""
        if self.is_ones:
            return [torch.full(tuple(shape), ONES, dtype=torch.long)]
        return [t.expand(tuple(shape)) if t.ndim == len(shape) else t.reshape(
            (1,) * (len(shape) - t.ndim) + tuple(t.shape)).expand(tuple(shape)) for t in self.terms]

    def broadcastable_to(self, shape: Sequence[int]) -> bool:
        # (torch.broadcast_shapes(t.shape, shape) == shape, without its cost: it runs torch's reference code)
        return all(t.ndim <= len(shape) and all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(shape)))
                   for t in self.terms)

    def units_used(self) -> torch.Tensor:
        if self.is_ones:
            return torch.empty(0, dtype=torch.long)
        flat = torch.cat([t.reshape(-1) for t in self.terms]).unique()
        return flat[flat != ONES]


def normalise(terms: Sequence[torch.Tensor], max_terms: int) -> UnitMap:
    """Make a union canonical: ONES absorbs an element in every term, duplicate terms go, all-ONES is ONES."""
    if not terms:
        return UnitMap.ones()
    if len(terms) == 1:  # nothing to absorb or to deduplicate: no stacked copy
        if bool((terms[0] == ONES).all()):
            return UnitMap.ones()
        return UnitMap((compress(terms[0]),)) if max_terms >= 1 else UnitMap(truncated=True)
    shape = torch.broadcast_shapes(*(t.shape for t in terms))
    stacked = torch.stack([t.expand(shape) for t in terms])
    unknown = (stacked == ONES).any(0)
    if bool(unknown.all()):
        return UnitMap.ones()
    stacked = stacked.masked_fill(unknown, ONES)
    unique: list[torch.Tensor] = []
    for term in stacked:
        term = compress(term)
        if not any(term.shape == u.shape and torch.equal(term, u) for u in unique):
            unique.append(term)
    if len(unique) > max_terms:
        return UnitMap(truncated=True)
    return UnitMap(tuple(unique))


def union(maps: Sequence[UnitMap], max_terms: int) -> UnitMap:
    if any(m.is_ones for m in maps):
        return UnitMap(truncated=any(m.truncated for m in maps))
    return normalise([t for m in maps for t in m.terms], max_terms)


def apply_layout(fn: Callable[[list[torch.Tensor]], object], maps: Sequence[UnitMap],
                 shapes: Sequence[Sequence[int]], max_terms: int) -> object:
    """Run a shape-moving op on the terms of its tensor arguments; returns the output's map(s).

    `fn` takes one tensor per input map (the k-th term of each, expanded to the input's real shape) and
    returns a tensor or a (nested) tuple/list of tensors. Inputs with fewer terms repeat their first.
    """
    expanded = [[t.contiguous() for t in m.expanded(s)] for m, s in zip(maps, shapes)]
    count = max(len(e) for e in expanded)
    outputs = [fn([e[k] if k < len(e) else e[0] for e in expanded]) for k in range(count)]
    return _collect(outputs, max_terms)


def _collect(outputs: list, max_terms: int):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return normalise(list(outputs), max_terms)
    if isinstance(first, (tuple, list)):
        return type(first)(_collect([o[i] for o in outputs], max_terms) for i in range(len(first)))
    return None


def per_unit(unit_map: UnitMap, axis: int, size: int, ndim: int, max_terms: int) -> torch.Tensor:
    """Rows of global unit indices (ONES allowed) for each of the `size` units on `axis`: unit j of the
    consumer's input is exactly zero for every position when all the units in column j are zero."""
    if unit_map.is_ones:
        return torch.full((1, size), ONES, dtype=torch.long)
    rows = []
    for term in unit_map.terms:
        term = term.reshape((1,) * (ndim - term.ndim) + tuple(term.shape))
        moved = term.movedim(axis, -1)
        moved = moved.expand(*moved.shape[:-1], size)
        rows.append(moved.reshape(-1, size).unique(dim=0))
    table = torch.cat(rows).unique(dim=0)
    unknown = (table == ONES).any(0)
    table = table.masked_fill(unknown, ONES).unique(dim=0)
    if table.shape[0] > max_terms:
        return torch.full((1, size), ONES, dtype=torch.long)
    return table
