"""Mask rules for attention and drop path: nn.MultiheadAttention and F.multi_head_attention_forward become
HAT layers (packed in-projection, out-projection), F.scaled_dot_product_attention follows v whatever its
masks and keyword arguments, parameter-free mode leaves (drop path / StochasticDepth) keep the residual
path's masks when a probe shows they keep zeros, and functions marked with torch.fx.wrap (torchvision's Swin
window attention) are traced through. Every model: open masks equal the original, the mask-flow probe is
sound, and task 0 stays bit-identical after task 1 trains with one AdamW(weight_decay)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth

import hatify

_spec = importlib.util.spec_from_file_location(
    "timm_zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "timm_zoo.py")
timm_zoo = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("timm_zoo", timm_zoo)
_spec.loader.exec_module(timm_zoo)


def _converts_soundly(model: nn.Module, inputs: tuple) -> hatify.HATModel:
    model.eval()
    hat = hatify.hatify(model, num_tasks=2, example_inputs=inputs)
    result = hatify.validate(model, hat, inputs)
    assert result.passed, result.messages
    return hat


def _keeps_task0(hat, inputs: tuple) -> bool:
    """timm_zoo.train_and_check for models with several inputs: the first is noised, the rest kept."""
    class Bound(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hat = hat

        def forward(self, x, **kwargs):
            return self.hat(x, *inputs[1:], **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.hat, name)
    return timm_zoo.train_and_check(Bound(), inputs[0])


# ------------------------------------------------------------------------------------------ drop path

class DropPath(nn.Module):
    """timm-style drop path: parameter-free, reads self.training, scales each sample by 0 or 1 / keep."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class NoisyInTraining(nn.Module):
    """Parameter-free, reads self.training, but adds noise: zeros are not kept."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


class ChannelMix(nn.Module):
    """Parameter-free mode leaf that mixes channels: zero in, zero out, but not element by element."""

    def forward(self, x):
        return x.mean(1, keepdim=True).expand_as(x) if self.training else x - x.mean(1, keepdim=True)


class ResidualNet(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = drop
        self.after = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.drop(F.relu(self.body(h)))
        return self.head(F.relu(self.after(h)).mean((2, 3)))


@pytest.mark.parametrize("drop", [StochasticDepth(0.5, "row"), StochasticDepth(0.5, "batch"), DropPath(0.5)],
                         ids=["stochastic_depth_row", "stochastic_depth_batch", "drop_path"])
def test_drop_path_keeps_the_residual_masks(drop):
    model, x = ResidualNet(drop), torch.randn(4, 3, 6, 6)
    hat = _converts_soundly(model, (x,))
    assert hat.plan.mode_leaves == ["drop"]
    assert not hat.plan.unknown
    assert set(hat.plan.layer("after").input_producers) == {"stem", "body"}
    assert _keeps_task0(hat, (x,))


@pytest.mark.parametrize("leaf", [NoisyInTraining(), ChannelMix()], ids=["noise", "channel_mix"])
def test_mode_leaf_that_breaks_zeros_is_unknown_and_reported(leaf):
    model, x = ResidualNet(leaf), torch.randn(4, 3, 6, 6)
    hat = _converts_soundly(model, (x,))
    assert [(u.node, u.reason.split(":")[0]) for u in hat.plan.unknown] == [
        ("drop", "zeros not kept when probed in train and eval mode")]
    # the residual still carries the stem's mask (union with all ones is all ones): nothing known
    assert hat.plan.layer("after").input_map.startswith("ones")


# ------------------------------------------------------------------------------------------ Swin

def test_torchvision_swin_window_attention_projections_are_hat_layers():
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2

    torch.manual_seed(0)
    for kwargs in ({}, {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2}):
        model = SwinTransformer([2, 2], 16, [1, 1], [1, 2], [2, 2], num_classes=3, **kwargs)
        x = torch.randn(2, 3, 16, 16)
        hat = _converts_soundly(model, (x,))
        masked = {layer.name for layer in hat.plan.masked_layers}
        assert {f"features.{i}.0.attn.{p}" for i in (1, 3) for p in ("qkv", "proj")} <= masked
        assert not hat.plan.unknown and not hat.plan.opaque
        assert hat.report.summary["hat_parameter_share"] > 0.9
        # the patch merging pad (torch.fx.wrap'd, no parameter) is traced too: the reduction sees the masks
        assert hat.plan.layer("features.2.reduction").input_producers
        assert _keeps_task0(hat, (x,))


def scale_rows(x, weight):
    """A wrapped helper with a data-dependent branch: tracing its body fails, so it stays one node."""
    if bool(x.sum() > 1e9):
        return x
    return F.linear(x, weight)


fx.wrap("scale_rows")


def project(x, weight, bias):
    """A wrapped helper whose body traces: its F.linear on a parameter becomes a HAT layer."""
    return F.linear(x.flatten(1), weight, bias)


fx.wrap("project")


class WrappedHelpers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(12, 6)
        self.mix = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(project(x, self.inner.weight, self.inner.bias))
        return self.head(F.relu(scale_rows(h, self.mix)))


def test_wrapped_function_traced_through_or_left_whole():
    model, x = WrappedHelpers(), torch.randn(3, 3, 4)
    hat = _converts_soundly(model, (x,))
    assert {layer.name for layer in hat.plan.masked_layers} == {"inner"}
    assert [n.target for n in hat.net.graph.nodes if n.op == "call_function" and n.target is scale_rows]
    assert [p.name for p in hat.plan.params] == ["mix"]  # read inside the opaque call: one copy per task
    assert _keeps_task0(hat, (x,))


# ------------------------------------------------------------------------------------------ attention

class Attend(nn.Module):
    """An nn.MultiheadAttention between two linear layers, called as configured."""

    def __init__(self, mha: nn.Module, call: dict, cross: bool = False) -> None:
        super().__init__()
        e = mha.embed_dim
        self.embed, self.mha, self.call, self.cross = nn.Linear(6, e), mha, call, cross
        self.memory = nn.Linear(6, mha.kdim) if cross else None
        self.after = nn.Linear(e, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, memory=None, mask=None):
        h = F.relu(self.embed(x))
        kv = F.relu(self.memory(memory)) if self.cross else h
        out = self.mha(h, kv, kv, **self.call, **({"key_padding_mask": mask} if mask is not None else {}))
        out = out[0]
        return self.head(F.relu(self.after(out)).mean(-2))


def _causal(n: int) -> torch.Tensor:
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)


MHA_CASES = {
    "batch_first_no_weights": (dict(batch_first=True), dict(need_weights=False), False),
    "seq_first_weights": (dict(), dict(), False),
    "causal_mask": (dict(batch_first=True), dict(attn_mask=_causal(5), is_causal=True, need_weights=False), False),
    "float_mask_per_head_weights": (dict(batch_first=True),
                                    dict(attn_mask=torch.randn(5, 5), average_attn_weights=False), False),
    "cross_attention_kdim": (dict(batch_first=True, kdim=12, vdim=12), dict(need_weights=False), True),
    "cross_attention_packed": (dict(batch_first=True), dict(need_weights=False), True),
    "bias_kv_zero_attn": (dict(batch_first=True, add_bias_kv=True, add_zero_attn=True), dict(), False),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_becomes_hat_layers(case):
    ctor, call, cross = MHA_CASES[case]
    torch.manual_seed(0)
    model = Attend(nn.MultiheadAttention(16, 2, **ctor), call, cross)
    x = torch.randn(4, 5, 6)
    inputs = (x, torch.randn(4, 7, 6)) if cross else (x,)
    hat = _converts_soundly(model, inputs)
    masked = {layer.name for layer in hat.plan.masked_layers}
    in_proj = ["mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight"] if "kdim" in ctor else \
        ["mha.in_proj_weight"]
    assert {*in_proj, "mha.out_proj"} <= masked
    assert not hat.plan.opaque and not hat.plan.unknown
    out_proj = hat.plan.layer("mha.out_proj")
    if "bias_k" in case:  # the learned key/value token carries no mask: v is not zero in masked channels
        assert out_proj.input_map.startswith("ones")
    else:  # the out-projection reads v's rows of the packed in-projection, head by head
        assert out_proj.input_producers == [in_proj[-1]]
        expected = "identity" if "kdim" in ctor else "slice [32:48]"
        assert out_proj.input_map == expected
    assert _keeps_task0(hat, inputs)


def test_key_padding_mask_and_unbatched_input():
    torch.manual_seed(0)
    model = Attend(nn.MultiheadAttention(16, 2, batch_first=True), dict(need_weights=False))
    x, mask = torch.randn(4, 5, 6), torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 3:] = True
    hat = _converts_soundly(model, (x, None, mask))
    assert hat.plan.layer("mha.out_proj").input_map == "slice [32:48]"
    unbatched = Attend(nn.MultiheadAttention(16, 2), dict(need_weights=False))
    hat = _converts_soundly(unbatched, (torch.randn(5, 6),))
    assert hat.plan.layer("mha.out_proj").input_map == "slice [32:48]"


def test_attention_dropout_follows_train_and_eval_mode():
    torch.manual_seed(0)
    model = Attend(nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True), dict(need_weights=False))
    x = torch.randn(4, 5, 6)
    hat = _converts_soundly(model, (x,))
    hat.train()
    with torch.no_grad():
        assert not torch.equal(hat(x, task_id=0), hat(x, task_id=0))  # dropped at random in train mode
    hat.eval()
    with torch.no_grad(), hatify.masks_open(hat):
        torch.testing.assert_close(hat(x, task_id=0), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert _keeps_task0(hat, (x,))


class FunctionalAttention(nn.Module):
    """A user module calling F.multi_head_attention_forward on its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.in_proj = nn.Parameter(torch.randn(48, 16) * 0.2)
        self.out_proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.embed(x)).transpose(0, 1)
        out, _ = F.multi_head_attention_forward(h, h, h, 16, 4, self.in_proj, None, None, None, False, 0.0,
                                                self.out_proj.weight, self.out_proj.bias, training=self.training,
                                                need_weights=False)
        return self.head(out.mean(0))


def test_functional_multi_head_attention_forward():
    x = torch.randn(3, 5, 6)
    hat = _converts_soundly(FunctionalAttention(), (x,))
    assert {"in_proj", "out_proj"} <= {layer.name for layer in hat.plan.masked_layers}
    assert hat.plan.layer("out_proj").input_map == "slice [32:48]"
    assert _keeps_task0(hat, (x,))


def test_transformer_encoder_and_decoder_stacks():
    torch.manual_seed(0)

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.src, self.tgt = nn.Linear(6, 16), nn.Linear(6, 16)
            self.transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.1, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, src, tgt):
            causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.head(self.transformer(self.src(src), self.tgt(tgt), tgt_mask=causal, tgt_is_causal=True))

    inputs = (torch.randn(2, 7, 6), torch.randn(2, 5, 6))
    hat = _converts_soundly(Seq2Seq(), inputs)
    assert not hat.plan.opaque and not hat.plan.unknown
    assert hat.report.summary["hat_parameter_share"] > 0.9
    masked = {layer.name for layer in hat.plan.masked_layers}
    assert "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in masked
    assert _keeps_task0(hat, inputs)


# ------------------------------------------------------------------------------------------ SDPA

class SDPA(nn.Module):
    def __init__(self, call: dict) -> None:
        super().__init__()
        self.qkv, self.out, self.head, self.call = nn.Linear(6, 48), nn.Linear(16, 8), nn.Linear(8, 3), call

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        mask = self.call.get("attn_mask")
        extra = {k: v for k, v in self.call.items() if k != "attn_mask"}
        o = F.scaled_dot_product_attention(q, k, value=v, attn_mask=mask, **extra)
        return self.head(F.relu(self.out(o.transpose(1, 2).flatten(2))).mean(1))


@pytest.mark.parametrize("call", [dict(), dict(is_causal=True), dict(attn_mask=_causal(5).logical_not()),
                                  dict(attn_mask=torch.randn(2, 5, 5), scale=0.3), dict(dropout_p=0.3)],
                         ids=["plain", "causal", "bool_mask", "float_mask_scale", "dropout"])
def test_sdpa_output_follows_v_with_masks_and_keywords(call):
    x = torch.randn(4, 5, 6)
    model = SDPA(call)
    random = "dropout_p" in call  # dropout in a functional call is on in eval mode too: no output comparison
    hat = hatify.hatify(model.eval(), num_tasks=2, example_inputs=(x,)) if random else _converts_soundly(model, (x,))
    layer = hat.plan.layer("out")
    assert layer.input_producers == ["qkv"] and layer.input_map == "slice [32:48]"
    if not random:
        assert _keeps_task0(hat, (x,))
