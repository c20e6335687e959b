"""A zoo of small hand-written models covering the graph patterns hatify must handle.

`ZOO[name] = (factory, example_inputs_factory)`: `factory()` builds a fresh model (seeded by the caller),
`example_inputs_factory()` returns the tuple of example inputs. Every model is tiny so the whole zoo
converts and validates in seconds.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _randint(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(2))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(10, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualBlock(nn.Module):
    """ResNet basic block with a projection shortcut, then a second identity block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        x = F.relu(x + self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseBlock(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all earlier feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layer1 = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 4, 3, padding=1))
        self.fc = nn.Linear(14, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.layer1(x)], 1)
        x = torch.cat([x, self.layer2(x)], 1)
        return self.fc(x.mean(dim=(2, 3)))


class Inception(nn.Module):
    """Inception-style: parallel branches concatenated on channels, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.bpool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 2, 1))
        self.mix = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b3(x), self.bpool(x)], dim=1)
        x = F.relu(self.mix(F.relu(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class AlexNetLike(nn.Module):
    """3 convs + ReLU + dropout + maxpool, flattened into 2 Linear layers and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
            nn.Conv2d(8, 10, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(10 * 2 * 2, 24)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.flatten(self.features(x))
        x = self.drop(F.relu(self.fc1(x)))
        return self.head(F.relu(self.fc2(x)))


class MobileNetLike(nn.Module):
    """Depthwise-separable and grouped convolutions with BatchNorm and ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6())
        self.grouped = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU())
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.grouped(self.pw(self.dw(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyUNet(nn.Module):
    """Encoder-decoder with ConvTranspose upsampling and concatenated skip connections."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class Conv1dGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 5, padding=2)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.gelu(self.gn1(self.conv1(x)))
        x = F.gelu(self.gn2(self.conv2(x)))
        return self.fc(F.adaptive_max_pool1d(x, 1).squeeze(-1))


class Attention(nn.Module):
    """Hand-written multi-head self-attention: fused qkv, reshape/permute, softmax(q k^T) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TinyTransformer(nn.Module):
    """Token embeddings, a class token, a learned position embedding, one pre-norm encoder block."""

    def __init__(self, vocab: int = 20, dim: int = 8, heads: int = 2, tokens: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = F.relu(self.conv2(x * gate))
        return self.fc(x.mean((2, 3)))


class SharedLinear(nn.Module):
    """The same nn.Linear applied twice (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x)


class TwoInputsDict(nn.Module):
    """Two inputs (image and vector), fused; the output is a dict of two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.vec = nn.Linear(5, 6)
        self.fuse = nn.Linear(4 + 6, 8)
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 1)

    def forward(self, image, vector):
        a = F.relu(self.conv(image)).amax(dim=(2, 3))
        b = F.relu(self.vec(vector))
        h = F.relu(self.fuse(torch.cat([a, b], dim=-1)))
        return {"logits": self.cls(h), "value": self.reg(h)}


class FunctionalParams(nn.Module):
    """F.conv2d and F.linear on the module's own nn.Parameters (no nn.Conv2d/nn.Linear modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.conv_b = nn.Parameter(torch.zeros(6))
        self.fc_w = nn.Parameter(torch.randn(10, 6 * 4 * 4) * 0.05)
        self.fc_b = nn.Parameter(torch.zeros(10))
        self.head_w = nn.Parameter(torch.randn(3, 10) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=1))
        x = F.max_pool2d(x, 2).flatten(1)
        x = F.relu(F.linear(x, self.fc_w, self.fc_b))
        return F.linear(x, self.head_w)


class FunctionalConv(nn.Module):
    """F.conv2d on a submodule's own nn.Parameter (weight and bias), as custom layers do."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class FunctionalLinear(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) * cin ** -0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalSubmodules(nn.Module):
    """The functional layers of `FunctionalParams`, each on a submodule's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = FunctionalConv(3, 6)
        self.fc = FunctionalLinear(6 * 4 * 4, 10)
        self.head = FunctionalLinear(10, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.head(F.relu(self.fc(x)))


class SDPABlock(nn.Module):
    """Self-attention through F.scaled_dot_product_attention with separate q, k, v projections."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(4, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = F.relu(self.inp(x))
        b, n, c = x.shape
        split = lambda t: t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        y = self.out(y.transpose(1, 2).reshape(b, n, c))
        return self.head(F.relu(y).mean(1))


class ChunkSplit(nn.Module):
    """chunk and split on the feature axis, the pieces recombined (GLU-style gate and a split-add)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(8, 12)
        self.fc3 = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        h = a * torch.sigmoid(b)
        p, q = torch.split(F.relu(self.fc2(h)), [8, 4], dim=-1)
        return self.head(F.relu(self.fc3(p)) + q)


class RecurrentAndMHA(nn.Module):
    """nn.LSTM (an opaque leaf) and nn.MultiheadAttention (converted) between HAT layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x, _ = self.lstm(x)
        x, _ = self.mha(x, x, x, need_weights=False)
        return self.head(F.relu(self.fc(x[:, -1])))


class SignGate(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so hatify must keep it as an opaque leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.scale(x)
        return -x


class DataDependentSubmodule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.gate = SignGate()
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.gate(x)
        return self.head(F.relu(self.fc2(x)))


class ClampActivations(nn.Module):
    """Clamps as activations: clamp(min=0) keeps zeros, clamp_min(0.1) and Hardtanh(0.1, 1) do not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 6)
        self.shifted = nn.Hardtanh(0.1, 1.0)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.fc1(x).clamp(min=0)
        x = torch.clamp_min(self.fc2(x), 0.1)
        x = self.shifted(self.fc3(x))
        return self.head(F.relu(self.fc4(x)))


class TokenConcatPool(nn.Module):
    """Two token streams concatenated along the token axis, smoothed by a stride-1 pool over tokens (which mixes
    neighbouring tokens of both streams), then the first stream's tokens are read back."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(3, 6), nn.Linear(5, 6)
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, text, image):
        n = text.shape[1]
        tokens = torch.cat([F.relu(self.text(text)), F.relu(self.image(image))], dim=1)
        tokens = F.avg_pool1d(tokens.transpose(1, 2), 3, 1, 1).transpose(1, 2)
        return self.head(F.relu(self.fc(tokens[:, :n])).mean(1))


class UnfoldPatches(nn.Module):
    """F.unfold (im2col) of a feature map into patches, each patch projected by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        patches = F.unfold(F.relu(self.conv(x)), kernel_size=3, padding=1).transpose(1, 2)
        return self.head(F.relu(self.fc(patches)).mean(1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2 * 2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool3d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class EmbeddingOnly(nn.Module):
    """Just a lookup table: the embedding reaches the output and is a per-task head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)

    def forward(self, tokens):
        return self.embed(tokens)


class EmbeddingBag(nn.Module):
    """Embedding -> mean over tokens -> Linear: the embedding is masked, the linear sees its units."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


Factory = Callable[[], nn.Module]
InputsFactory = Callable[[], tuple]

ZOO: dict[str, tuple[Factory, InputsFactory]] = {
    "mlp": (MLP, lambda: (_randn(4, 10),)),
    "resnet_block": (ResidualBlock, lambda: (_randn(2, 3, 8, 8),)),
    "densenet": (DenseBlock, lambda: (_randn(2, 3, 6, 6),)),
    "inception": (Inception, lambda: (_randn(2, 3, 6, 6),)),
    "alexnet_like": (AlexNetLike, lambda: (_randn(2, 3, 16, 16),)),
    "mobilenet_like": (MobileNetLike, lambda: (_randn(2, 3, 8, 8),)),
    "unet": (TinyUNet, lambda: (_randn(2, 2, 8, 8),)),
    "conv1d_groupnorm": (Conv1dGroupNorm, lambda: (_randn(3, 2, 12),)),
    "transformer": (TinyTransformer, lambda: (_randint(20, 3, 5),)),
    "squeeze_excite": (SqueezeExcite, lambda: (_randn(2, 3, 6, 6),)),
    "shared_linear": (SharedLinear, lambda: (_randn(4, 6),)),
    "two_inputs_dict": (TwoInputsDict, lambda: (_randn(3, 1, 5, 5), _randn(3, 5))),
    "functional_params": (FunctionalParams, lambda: (_randn(2, 3, 8, 8),)),
    "functional_submodules": (FunctionalSubmodules, lambda: (_randn(2, 3, 8, 8),)),
    "sdpa": (SDPABlock, lambda: (_randn(2, 5, 4),)),
    "chunk_split": (ChunkSplit, lambda: (_randn(4, 6),)),
    "lstm_mha": (RecurrentAndMHA, lambda: (_randn(2, 5, 4),)),
    "data_dependent_submodule": (DataDependentSubmodule, lambda: (_randn(4, 5),)),
    "clamp_activations": (ClampActivations, lambda: (_randn(4, 5),)),
    "token_concat_pool": (TokenConcatPool, lambda: (_randn(2, 3, 3), _randn(2, 2, 5))),
    "unfold_patches": (UnfoldPatches, lambda: (_randn(2, 3, 4, 4),)),
    "conv3d": (Conv3dNet, lambda: (_randn(2, 1, 4, 4, 4),)),
    "embedding_only": (EmbeddingOnly, lambda: (_randint(12, 3, 4),)),
    "embedding_bag": (EmbeddingBag, lambda: (_randint(12, 3, 4),)),
}


class RootControlFlow(nn.Module):
    """Data-dependent control flow in the root forward itself: no opaque-leaf fallback can help."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class UnbatchedConv1d(nn.Module):
    """Conv1d on an unbatched (channels, length) input, which torch allows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(-1))
