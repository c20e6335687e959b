"""Random architectures for the fuzzer: a program of ops over a list of (batch, width) tensors, drawn by hypothesis,
covering the ops hatify has rules for in their out-of-place, in-place and keyword spellings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

IN_WIDTH, OUT_WIDTH = 5, 3

# Unary ops on the newest tensor; binary ops also read an earlier one (index drawn modulo the list length).
UNARY = ["linear", "linear_functional", "linear_scaled_weight", "linear_transposed_weight", "relu", "relu_",
         "gelu", "tanh", "clamp_shifted", "hardtanh_shifted", "layernorm", "batchnorm", "dropout", "offset",
         "one_minus", "scale", "setitem", "setitem_zero", "split_half", "chunk", "view_transpose", "sigmoid",
         "mean_keepdim", "clone_add_", "masked_fill_", "weight_read_outside", "relu_direct", "stale_view",
         "view_then_relu_"]
BINARY = ["add", "add_keyword", "add_", "iadd", "sub", "mul", "cat", "where", "maximum", "add_alpha", "add_direct",
          "view_add_direct", "stale_view_iadd", "iadd_then_view"]

op = st.one_of(st.tuples(st.sampled_from(UNARY), st.integers(2, 6)),
               st.tuples(st.sampled_from(BINARY), st.integers(0, 10)))
programs = st.lists(op, min_size=1, max_size=7)


class FuzzNet(nn.Module):
    """Interprets `program` (a list of (op, argument)); every layer it needs is created here, so fx traces one
    node per op."""

    def __init__(self, program: list[tuple[str, int]]) -> None:
        super().__init__()
        self.program = list(program)
        self.layers = nn.ModuleDict()
        self.weights = nn.ParameterDict()
        widths = [IN_WIDTH]
        self.steps: list[tuple[str, int, int]] = []  # (op, layer key / other index, out width)
        for i, (kind, arg) in enumerate(self.program):
            w = widths[-1]
            key = f"l{i}"
            out = w
            if kind in ("linear", "linear_functional", "linear_scaled_weight", "linear_transposed_weight",
                        "weight_read_outside"):
                out = w if kind == "linear_transposed_weight" else arg
                if kind == "linear":
                    self.layers[key] = nn.Linear(w, out)
                else:
                    self.weights[key] = nn.Parameter(torch.randn(out, w) / w ** 0.5)
                if kind == "weight_read_outside":
                    self.layers[key] = nn.Linear(w, out)
                    del self.weights[key]
            elif kind == "layernorm":
                self.layers[key] = nn.LayerNorm(w)
            elif kind == "batchnorm":
                self.layers[key] = nn.BatchNorm1d(w)
            elif kind in ("split_half", "chunk"):
                if w < 2:
                    kind = "relu"
                else:
                    out = w // 2 if kind == "split_half" else (w + 1) // 2
            elif kind in ("view_transpose", "stale_view", "view_then_relu_") and w % 2:
                kind = "gelu"
            elif kind == "relu_direct" and (not self.steps or self.steps[-1][0] != "linear"):
                kind = "relu"  # in place on a tensor autograd saved would break the original's backward
            elif kind in BINARY:
                if kind in ("stale_view_iadd", "iadd_then_view") and w % 2:
                    kind = "iadd"
                if kind.endswith("_direct") and (not self.steps or self.steps[-1][0] != "linear"):
                    kind = "add"  # in place on a tensor autograd saved would break the original's backward
                other = widths[arg % len(widths)]
                if other != w:  # project the other operand to this width with its own layer
                    self.layers[key] = nn.Linear(other, w)
                if kind == "cat":
                    out = 2 * w
            self.steps.append((kind, arg, out))
            widths.append(out)
        self.head = nn.Linear(widths[-1], OUT_WIDTH)

    def forward(self, x):
        hs = [x]
        for i, (kind, arg, out) in enumerate(self.steps):
            h, key = hs[-1], f"l{i}"
            if kind in BINARY:
                y = hs[arg % len(hs)]
                if key in self.layers:
                    y = self.layers[key](y)
                h = _binary(kind, h, y)
            else:
                h = self._unary(kind, key, h)
            hs.append(h)
        return self.head(hs[-1])

    def _unary(self, kind: str, key: str, h: torch.Tensor) -> torch.Tensor:
        if kind == "linear":
            return self.layers[key](h)
        if kind == "linear_functional":
            return F.linear(h, self.weights[key])
        if kind == "linear_scaled_weight":
            return F.linear(h, self.weights[key] * 2.0)
        if kind == "linear_transposed_weight":
            return F.linear(h, self.weights[key].t())
        if kind == "weight_read_outside":
            layer = self.layers[key]
            return layer(h) + (h @ layer.weight.t()).relu()
        if kind in ("layernorm", "batchnorm"):
            return self.layers[key](h)
        return _UNARY[kind](h)


def _setitem(h: torch.Tensor, value: float) -> torch.Tensor:
    h = h.clone()
    h[:, 0] = value
    return h


def _clone_add_(h: torch.Tensor) -> torch.Tensor:
    g = h.clone()
    g.add_(0.5)
    return g


def _masked_fill_(h: torch.Tensor) -> torch.Tensor:
    g = h.clone()
    g.masked_fill_(h > 0.3, 1.0)
    return g


def _view_transpose(h: torch.Tensor) -> torch.Tensor:
    return h.view(h.shape[0], 2, h.shape[1] // 2).transpose(1, 2).reshape(h.shape[0], h.shape[1])


def _moved(h: torch.Tensor) -> torch.Tensor:
    """A view of `h` that moves elements (units change place)."""
    return h.view(h.shape[0], 2, h.shape[1] // 2).transpose(1, 2)


def _stale_view(h: torch.Tensor) -> torch.Tensor:
    """A view taken before an in-place write and read after it: it sees the written values."""
    g = h.clone()
    v = _moved(g)
    g.add_(0.5)
    return v.reshape(h.shape)


def _view_then_relu_(h: torch.Tensor) -> torch.Tensor:
    """An in-place activation through a view: the base, read afterwards, holds the result."""
    g = h.clone()
    F.relu(_moved(g), inplace=True)
    return g


_UNARY = {
    "relu": torch.relu, "relu_": lambda h: F.relu(h.clone(), inplace=True), "gelu": F.gelu, "tanh": torch.tanh,
    "clamp_shifted": lambda h: h.clamp(min=0.1), "hardtanh_shifted": lambda h: F.hardtanh(h, 0.1, 1.0),
    "dropout": lambda h: F.dropout(h, 0.0), "offset": lambda h: h + 0.5, "one_minus": lambda h: 1 - h,
    "scale": lambda h: h * 0.5, "setitem": lambda h: _setitem(h, 1.0), "setitem_zero": lambda h: _setitem(h, 0.0),
    "split_half": lambda h: h[:, : h.shape[1] // 2], "chunk": lambda h: torch.chunk(h, 2, dim=1)[0],
    "view_transpose": _view_transpose, "sigmoid": torch.sigmoid,
    "mean_keepdim": lambda h: h - h.mean(dim=1, keepdim=True), "clone_add_": _clone_add_,
    "masked_fill_": _masked_fill_, "relu_direct": lambda h: F.relu(h, inplace=True), "stale_view": _stale_view,
    "view_then_relu_": _view_then_relu_,
}


def _binary(kind: str, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "add":
        return h + y
    if kind == "add_keyword":
        return torch.add(h, other=y)
    if kind == "add_alpha":
        return torch.add(h, y, alpha=0.5)
    if kind == "add_":
        return h.clone().add_(y)
    if kind == "add_direct":  # in place on a layer's (gated) output itself
        return h.add_(y)
    if kind == "view_add_direct":  # through a view: the base sees the write
        h.view(-1).add_(y.reshape(-1))
        return h
    if kind == "stale_view_iadd":  # a view taken before a residual add in place, read after it (fx traces
        g = h.clone()               # `g += y` as an out-of-place add, so the write is spelled add_)
        v = _moved(g)
        g.add_(y)
        return v.reshape(h.shape)
    if kind == "iadd_then_view":  # the view is taken after the write: it follows the merged map
        g = h.clone()
        g += y
        return _moved(g).reshape(h.shape)
    if kind == "iadd":
        g = h.clone()
        g += y
        return g
    if kind == "sub":
        return torch.sub(input=h, other=y)
    if kind == "mul":
        return h * y
    if kind == "cat":
        return torch.cat([h, y], dim=1)
    if kind == "where":
        return torch.where(y > 0, h, y)
    return torch.maximum(h, y)
