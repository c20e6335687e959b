"""Multi-head attention as ops hatify has rules for: a traceable `F.multi_head_attention_forward`.

torch's own function projects q, k and v with slices of the packed `in_proj_weight` (3E, E) and, in eval
mode, `nn.MultiheadAttention` runs a fused kernel: either way its weights are no HAT layer. While tracing,
an `nn.MultiheadAttention` is traced as `multihead_attention` and `F.multi_head_attention_forward` as
`multi_head_attention_forward` below, which applies the whole packed weight with one `F.linear` per distinct
input and slices the result (q rows, then k, then v), so the in-projection is one HAT layer whose 3E units are masked, the out-projection another, and the mask
flow follows v through the heads into the out-projection. Numerically it is torch's slow path.

Attention dropout depends on the module's train/eval mode, which a trace cannot read: an
`nn.MultiheadAttention` with dropout gets an `nn.Dropout` child (`ATTENTION_DROPOUT`) before tracing and the
attention weights go through it, so the converted model drops in train mode and not in eval mode.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

ATTENTION_DROPOUT = "hat_attention_dropout"


def add_attention_dropout(root: nn.Module) -> None:
    """Give every `nn.MultiheadAttention` with dropout an `nn.Dropout` child that follows its mode."""
    for module in root.modules():
        if type(module) is nn.MultiheadAttention and module.dropout > 0 and not hasattr(module, ATTENTION_DROPOUT):
            module.add_module(ATTENTION_DROPOUT, nn.Dropout(module.dropout))


def _project(inputs: tuple, weight: torch.Tensor, bias: torch.Tensor | None) -> list:
    """Rows [i*E, (i+1)*E) of the packed projection applied to inputs[i]: one `F.linear` with the whole
    weight per distinct input tensor (self-attention: one call), sliced afterwards."""
    done: list[tuple[Any, torch.Tensor]] = []
    out = []
    for i, x in enumerate(inputs):
        proj = next((p for seen, p in done if seen is x), None)
        if proj is None:
            proj = F.linear(x, weight, bias)
            done.append((x, proj))
        out.append(proj.chunk(3, dim=-1)[i].contiguous())
    return out


def multi_head_attention_forward(query, key, value, embed_dim_to_check: int, num_heads: int, in_proj_weight,
                                 in_proj_bias, bias_k, bias_v, add_zero_attn: bool, dropout_p: float,
                                 out_proj_weight, out_proj_bias, training: bool = True, key_padding_mask=None,
                                 need_weights: bool = True, attn_mask=None, use_separate_proj_weight: bool = False,
                                 q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None,
                                 static_v=None, average_attn_weights: bool = True, is_causal: bool = False,
                                 attention_dropout: nn.Module | None = None) -> tuple:
    """`F.multi_head_attention_forward` (same arguments and results) with the packed in-projection applied
    as whole-weight `F.linear` calls. `attention_dropout`, when given, replaces `dropout_p`/`training`.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2).eval()
        >>> x = torch.randn(5, 3, 8)
        >>> out, _ = multi_head_attention_forward(x, x, x, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None,
        ...     None, False, 0.0, mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False)
        >>> torch.allclose(out, mha(x, x, x, need_weights=False)[0], atol=1e-6)
        True
    """
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim_to_check // num_heads  # a Python int, also while tracing
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=None if attn_mask is None else attn_mask.dtype, other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    # The attention weights are needed, or dropped by a module that follows train/eval mode: computed here.
    explicit = need_weights or attention_dropout is not None
    if is_causal and key_padding_mask is None and not explicit:
        attn_mask = None  # SDPA takes the causal hint itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    if not use_separate_proj_weight:
        q, k, v = _project((query, key, value), in_proj_weight, in_proj_bias)
    else:
        biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value),
                                                         (q_proj_weight, k_proj_weight, v_proj_weight), biases))
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = (k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_k is None else static_k)
    v = (v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_v is None else static_v)
    if add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(
            bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    if explicit:
        if is_causal and attn_mask is None:
            raise AssertionError("is_causal needs attn_mask when the attention weights are computed")
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        weights = torch.bmm(q_scaled, k.transpose(-2, -1)) if attn_mask is None else \
            torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if attention_dropout is not None:
            weights = attention_dropout(weights)
        elif dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
                attn_mask.view(bsz, num_heads, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, num_heads, tgt_len, head_dim),
                                             k.view(bsz, num_heads, src_len, head_dim),
                                             v.view(bsz, num_heads, src_len, head_dim), attn_mask, dropout_p,
                                             is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    out = out.view(tgt_len, bsz, out.size(1))
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.view(bsz, num_heads, tgt_len, src_len)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, (weights if batched else weights.squeeze(0))


def _batch_second(*tensors: Any) -> list:
    """Transpose batch-first inputs, keeping `query is key is value` (one projection per distinct input)."""
    moved: list[tuple[Any, Any]] = []
    out = []
    for x in tensors:
        done = next((m for seen, m in moved if seen is x), None)
        if done is None:
            done = x.transpose(1, 0)
            moved.append((x, done))
        out.append(done)
    return out


def multihead_attention(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                        need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple:
    """`nn.MultiheadAttention.forward` (its slow path) through `multi_head_attention_forward`: what the
    tracer traces in place of the module. Its attention dropout goes through its `ATTENTION_DROPOUT` child.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(multihead_attention(mha, x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """
    batched = query.dim() == 3
    if mha.batch_first and batched:
        query, key, value = _batch_second(query, key, value)
    out, weights = multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k,
        mha.bias_v, mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias, training=mha.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=mha.q_proj_weight,
        k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight, average_attn_weights=average_attn_weights,
        is_causal=is_causal, attention_dropout=getattr(mha, ATTENTION_DROPOUT, None))
    return (out.transpose(1, 0) if mha.batch_first and batched else out), weights


# Module types traced as a function of the module (and its call's arguments) instead of their forward.
DECOMPOSED_MODULES: dict[type, Callable] = {nn.MultiheadAttention: multihead_attention}


@contextlib.contextmanager
def traced_attention() -> Iterator[None]:
    """While tracing, `F.multi_head_attention_forward` called with a traced argument (a user's functional
    attention) is traced as `multi_head_attention_forward`."""
    original = F.multi_head_attention_forward

    def traced(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
            return original(*args, **kwargs)
        return multi_head_attention_forward(*args, **kwargs)

    F.multi_head_attention_forward = traced
    try:
        yield
    finally:
        F.multi_head_attention_forward = original
