"""Pretrained models: frozen parameters kept as they are, HAT only where HATConfig.include/exclude put it,
PEFT LoRA (timm ViT, HF BERT) and bottleneck adapters on frozen backbones, and `init="dense"`."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import hatify
from hatify.cli import main
from hatify.layers import Protect, TaskIndexed
from hatify.sources import config_with

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"num_classes": 3, "img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


class ConvBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.head = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.linear(x)))


class Blocks(nn.Module):
    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(3)))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Adapted(nn.Module):
    """A frozen layer followed by a bottleneck adapter (Houlsby et al.): h + up(relu(down(h)))."""

    def __init__(self, layer: nn.Module, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.layer, self.down, self.up = layer, nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        return h + self.up(F.relu(self.down(h)))


def _train(hat: hatify.HATModel, x, tasks=(0, 1), steps: int = 4, classes: int = 3) -> dict[int, torch.Tensor]:
    """The API loop with one AdamW (weight decay) for every task; each task's eval output right after it."""
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    after = {}
    for t in tasks:
        hat.train()
        hat.begin_task(t)
        for b in range(steps):
            y = torch.randint(0, classes, (_batch(x),), generator=gen)
            loss = F.cross_entropy(hat(*x, task_id=t, mask_scale=hat.mask_scale(b, steps)), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad():
            after[t] = hat(*x, task_id=t)
    return after


def _batch(x: tuple) -> int:
    return x[0].shape[0]


def _assert_old_tasks_identical(hat, x, after) -> None:
    hat.eval()
    with torch.no_grad():
        for t, expected in after.items():
            assert torch.equal(hat(*x, task_id=t), expected), f"task {t} changed"


def _frozen_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def _assert_frozen_untouched(hat, frozen: dict[str, torch.Tensor], copied: tuple = ()) -> None:
    """Every parameter frozen in the original is, in the converted model, the same plain parameter (no
    parametrization, no per-task copy), still frozen, bit-identical to the original (`copied`: modules given
    per-task copies all the same)."""
    assert sorted(hat.plan.frozen) == sorted(frozen)
    for name, value in frozen.items():
        if name.startswith(copied):
            continue
        owner, _, attr = name.rpartition(".")
        module = hat.net.get_submodule(owner)
        assert not parametrize.is_parametrized(module, attr), name
        param = hat.net.get_parameter(name)
        assert not param.requires_grad and torch.equal(param, value), name


def _protected(hat) -> dict[str, int]:
    """Parameters guarded by Protect and the size of their frozen-values buffer."""
    return {name.rpartition(".parametrizations.")[0] + "." + name.split(".")[-2]: m.frozen.numel()
            for name, m in hat.net.named_modules() if isinstance(m, Protect)}


def test_frozen_layers_kept_as_they_are():
    model = ConvBackbone()
    for module in (model.conv1, model.bn1, model.conv2):
        module.requires_grad_(False)
    frozen = _frozen_values(model)
    x = (torch.randn(8, 3, 8, 8),)
    hat = hatify.hatify(model, 2, x)
    assert [layer.name for layer in hat.plan.layers] == ["fc", "head"]
    policies = {m.name: m.policy for m in hat.plan.modules}
    # bn1's affine is frozen, its running statistics still move in train mode: one copy per task.
    assert policies == {"conv1": "frozen", "conv2": "frozen", "bn1": "statistics_per_task", "head": "head"}
    assert not any(p.requires_grad for p in hat.net.get_submodule("bn1").parameters())
    assert hat.report.summary["frozen"] == ["conv1", "conv2"]
    assert "kept frozen" in str(hat.report)
    assert hatify.validate(model, hat, x).passed
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    _assert_frozen_untouched(hat, frozen, copied=("bn1.",))
    # Only fc carries protection buffers (the frozen values of its protected rows): the frozen convolutions have none.
    fc = model.fc.weight.numel() + model.fc.bias.numel()
    assert sorted(_protected(hat)) == ["fc.bias", "fc.weight"] and 0 < sum(_protected(hat).values()) <= fc
    assert torch.equal(model.conv1.weight, frozen["conv1.weight"])   # the original is not modified


def test_frozen_layers_gated_on_request():
    model = ConvBackbone()
    model.conv2.requires_grad_(False)
    frozen = _frozen_values(model)
    x = (torch.randn(8, 3, 8, 8),)
    hat = hatify.hatify(model, 2, x, config=hatify.HATConfig(frozen_layers="gate"))
    conv2 = hat.plan.layer("conv2")
    assert conv2.role == "masked" and conv2.frozen == ["conv2.weight", "conv2.bias"] and conv2.protected == []
    assert hat.report.summary["gated_frozen_layers"] == ["conv2"]
    assert "conv2.weight" not in _protected(hat) and "conv1.weight" in _protected(hat)
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    _assert_frozen_untouched(hat, frozen)
    used = hat.capacity()["conv2"]["used"]
    assert set(used) == {0, 1}   # the frozen layer's units are selected per task
    _assert_forget_and_extract(hat, x, after)


def _assert_forget_and_extract(hat, x, after) -> None:
    """extract(0) computes task 0's outputs; forgetting task 1 leaves task 0 bit-identical."""
    with torch.no_grad():
        torch.testing.assert_close(hat.extract(0)(*x), after[0])
    hat.forget_task(1)
    _assert_old_tasks_identical(hat, x, {0: after[0]})


def test_frozen_weight_trainable_bias_protects_the_bias_only():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    model[0].weight.requires_grad_(False)   # BitFit-style: biases train, weights stay
    weight = model[0].weight.detach().clone()
    x = (torch.randn(8, 6),)
    hat = hatify.hatify(model, 2, x)
    layer = hat.plan.layer("0")
    assert layer.role == "masked" and layer.frozen == ["0.weight"] and layer.protected == ["0.bias"]
    assert sorted(_protected(hat)) == ["0.bias"]
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    assert torch.equal(hat.net.get_parameter("0.weight"), weight)


@pytest.mark.parametrize("policy", ["frozen", "per_task", "shared"])
def test_include_selects_where_hat_goes(policy):
    model = Blocks()
    x = (torch.randn(8, 12),)
    config = hatify.HATConfig(include=("blocks.2",), unselected=policy)
    if policy == "shared":
        with pytest.warns(UserWarning, match="forget"):
            hat = hatify.hatify(model, 2, x, config=config)
    else:
        hat = hatify.hatify(model, 2, x, config=config)
    assert [layer.name for layer in hat.plan.masked_layers] == ["blocks.2.linear"]
    assert hat.plan.layer("head").role == "head"
    outside = ["blocks.0.linear", "blocks.0.norm", "blocks.1.linear", "blocks.1.norm"]
    assert {m.name: m.policy for m in hat.plan.modules if m.name in outside} == dict.fromkeys(outside, policy)
    assert hat.report.summary["shared_trainable"] == (outside if policy == "shared" else [])
    assert hatify.validate(model, hat, x).passed
    before = {name: hat.net.get_parameter(name).detach().clone() for name in
              ("blocks.0.linear.weight", "blocks.1.norm.weight")} if policy != "per_task" else {}
    after = _train(hat, x)
    if policy == "shared":   # honest about it: the shared, unprotected blocks moved and task 0 changed
        with torch.no_grad():
            assert not torch.equal(hat.eval()(*x, task_id=0), after[0])
        assert not torch.equal(hat.net.get_parameter("blocks.0.linear.weight"), before["blocks.0.linear.weight"])
        return
    _assert_old_tasks_identical(hat, x, after)
    if policy == "frozen":
        for name, value in before.items():
            assert not hat.net.get_parameter(name).requires_grad and torch.equal(hat.net.get_parameter(name), value)
    else:
        assert isinstance(hat.net.get_submodule("blocks.0.linear"), TaskIndexed)


def test_unselected_batchnorm_keeps_statistics_per_task():
    model = ConvBackbone()
    x = (torch.randn(8, 3, 8, 8),)
    hat = hatify.hatify(model, 2, x, config=hatify.HATConfig(include=("conv*", "fc")))
    assert [layer.name for layer in hat.plan.masked_layers] == ["conv1", "conv2", "fc"]
    # The mask flow runs over the whole graph: conv1's mask reaches conv2 through the unselected bn1.
    assert hat.plan.layer("conv2").input_producers == ["conv1"]
    assert {m.name: m.policy for m in hat.plan.modules} == {"bn1": "statistics_per_task", "head": "head"}
    bn1 = hat.net.get_submodule("bn1")
    assert isinstance(bn1, TaskIndexed) and not any(p.requires_grad for p in bn1.parameters())
    assert hatify.validate(model, hat, x).passed
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    # Each task's copy counted only its own 4 training batches (one shared copy would have seen 8).
    assert [int(copy.num_batches_tracked) for copy in bn1.copies] == [4, 4]


def test_exclude_and_patterns():
    config = hatify.HATConfig(exclude=("blocks.0.*", "*.norm"))
    assert config.selects("blocks.1.linear") and not config.selects("blocks.0.linear")
    assert not config.selects("blocks.2.norm") and hatify.HATConfig(include=("*.lora_*",)).selects(
        "blocks.0.attn.qkv.lora_A.default")
    hat = hatify.hatify(Blocks(), 2, (torch.randn(4, 12),), config=config)
    assert [layer.name for layer in hat.plan.masked_layers] == ["blocks.1.linear", "blocks.2.linear"]
    from_cli = config_with(["include=blocks.1,*.lora_*", "unselected=per_task", "frozen_layers=gate"])
    assert (from_cli.include, from_cli.unselected, from_cli.frozen_layers) == (("blocks.1", "*.lora_*"), "per_task",
                                                                               "gate")
    with pytest.raises(hatify.HatifyError, match="include"):
        hatify.HATConfig(include="blocks.1")
    with pytest.raises(hatify.HatifyError, match="unselected"):
        hatify.HATConfig(unselected="trainable")


def _lora_vit():
    from peft import LoraConfig, get_peft_model

    vit = timm.create_model(VIT, **VIT_KWARGS)
    pretrained = {k: v.clone() for k, v in vit.state_dict().items()}
    model = get_peft_model(vit, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"])).get_base_model()
    model.head.requires_grad_(True)   # a new classifier per task on top of the frozen backbone
    return model, pretrained


def _check_lora(model: nn.Module, pretrained: dict, x: tuple, lora_layers: int) -> None:
    frozen = _frozen_values(model)
    hat = hatify.hatify(model, 2, x)
    masked = [layer.name for layer in hat.plan.masked_layers]
    assert len(masked) == 2 * lora_layers and all(".lora_A." in n or ".lora_B." in n for n in masked)
    ranks = [layer.units for layer in hat.plan.masked_layers if ".lora_A." in layer.name]
    assert ranks == [4] * lora_layers   # HAT masks the rank units (and, on lora_B, the output units)
    assert hatify.validate(model, hat, x).passed
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    _assert_frozen_untouched(hat, frozen)
    state = hat.net.state_dict()
    for name, value in pretrained.items():   # the base weights are the pretrained ones, bit for bit
        if name.startswith("head."):   # the trainable classifier: one copy per task
            continue
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[name if name in state else peft_name], value), name
    trained_b = [hat.net.get_parameter(f"{n}.parametrizations.weight.original") for n in masked if ".lora_B." in n]
    assert any(bool(b.abs().sum()) for b in trained_b)   # the adapters did learn


def test_peft_lora_on_timm_vit():
    model, pretrained = _lora_vit()
    _check_lora(model, pretrained, (torch.randn(6, 3, 16, 16),), lora_layers=4)


class EncoderClassifier(nn.Module):
    """HF encoder called with keyword inputs, returning a tensor (until HF models convert as they are)."""

    def __init__(self, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(dim, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])


def test_peft_lora_on_hf_bert():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    bert = AutoModel.from_config(cfg)
    pretrained = {f"encoder.{k}": v.clone() for k, v in bert.state_dict().items()}
    lora = get_peft_model(bert, LoraConfig(r=4, target_modules=["query", "value"])).get_base_model()
    model = EncoderClassifier(lora, 32).eval()
    _check_lora(model, pretrained, (torch.randint(0, 100, (6, 8)),), lora_layers=4)


def test_peft_model_wrapper_converts_as_it_is_with_keyword_inputs():
    """The `PeftModel` itself (its `forward(*args, **kwargs)`), called with a keyword batch: LoRA layers are HAT
    layers, task 0 stays bit-identical under AdamW(weight_decay), the base weights stay the pretrained ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100, max_position_embeddings=32, num_labels=3)
    peft_model = get_peft_model(AutoModelForSequenceClassification.from_config(cfg),
                                LoraConfig(r=4, target_modules=["query", "value"])).eval()
    frozen = _frozen_values(peft_model)
    batch = {"input_ids": torch.randint(0, 100, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long)}
    hat = hatify.hatify(peft_model, 2, batch)
    masked = [layer.name for layer in hat.plan.masked_layers]
    assert len(masked) == 8 and all(".lora_A." in n or ".lora_B." in n for n in masked)
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    after = {}
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(4):
            y = torch.randint(0, 3, (6,), generator=gen)
            out = hat(**batch, task_id=t, mask_scale=hat.mask_scale(b, 4))
            loss = F.cross_entropy(out.logits, y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad():
            after[t] = hat(**batch, task_id=t).logits
    with torch.no_grad():
        assert torch.equal(hat(**batch, task_id=0).logits, after[0])
    _assert_frozen_untouched(hat, frozen)


def test_bottleneck_adapters_in_a_frozen_backbone():
    backbone = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    pretrained = copy.deepcopy(backbone.state_dict())
    backbone.requires_grad_(False)
    model = nn.Sequential(Adapted(backbone[0], 16, 4), backbone[1], Adapted(backbone[2], 16, 4), backbone[3],
                          nn.Linear(16, 3))
    x = (torch.randn(8, 10),)
    hat = hatify.hatify(model, 2, x)
    assert [layer.name for layer in hat.plan.masked_layers] == ["0.down", "0.up", "2.down", "2.up"]
    assert hat.plan.layer("0.up").input_producers == ["0.down"]
    assert hatify.validate(model, hat, x).passed
    after = _train(hat, x)
    _assert_old_tasks_identical(hat, x, after)
    assert torch.equal(hat.net.get_parameter("0.layer.weight"), pretrained["0.weight"])
    assert torch.equal(hat.net.get_parameter("2.layer.bias"), pretrained["2.bias"])
    assert sorted(_protected(hat)) == ["0.down.bias", "0.down.weight", "0.up.bias", "0.up.weight",
                                       "2.down.bias", "2.down.weight", "2.up.bias", "2.up.weight"]
    _assert_forget_and_extract(hat, x, after)


def test_save_load_keeps_the_frozen_plan(tmp_path):
    model = Blocks()
    model.blocks[0].requires_grad_(False)
    x = (torch.randn(6, 12),)
    hat = hatify.hatify(model, 2, x, config=hatify.HATConfig(include=("blocks.1", "blocks.2")),
                        source={"kind": "factory", "target": f"{__name__}:Blocks", "kwargs": {}})
    after = _train(hat, x, tasks=(0,))
    hatify.save(hat, tmp_path / "blocks.hat")
    loaded = hatify.load(tmp_path / "blocks.hat", model=Blocks())   # a fresh instance: nothing frozen
    assert loaded.plan.to_dict()["modules"] == hat.plan.to_dict()["modules"]
    assert loaded.plan.frozen == hat.plan.frozen == ["blocks.0.linear.weight", "blocks.0.linear.bias",
                                                     "blocks.0.norm.weight", "blocks.0.norm.bias"]
    _assert_old_tasks_identical(loaded, x, after)


def test_dense_init_reproduces_a_trained_timm_model(tmp_path):
    """init="dense" (e = dense_value = 1): binary masks are exactly 1, and soft masks sigmoid(s e) round to exactly
    1.0 in float32 at s = s_max (s e >= 17 suffices), so the converted model computes the original's outputs bit for
    bit, for every task, before any training. The linear schedule starts each epoch at s = 1/s_max (masks near 0.5):
    that is HAT's annealing, not the init; the cosine schedule starts at s_max."""
    model = timm.create_model(VIT, **VIT_KWARGS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    for _ in range(3):   # "pretrained" here: no downloads
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    source = f"timm:{VIT}," + ",".join(f"{k}={v}" for k, v in VIT_KWARGS.items())
    args = ["convert", str(tmp_path / "weights.safetensors"), "--arch", source, "--num-tasks", "3",
            "--input-shape", "2,3,16,16", "--set", "init=dense", "--set", "schedule=cosine",
            "-o", str(tmp_path / "vit.hat")]
    assert main(args) == 0
    hat = hatify.load(tmp_path / "vit.hat")
    with torch.no_grad():
        expected = model(x)
        assert torch.sigmoid(torch.tensor(hat.plan.config.s_max * hat.plan.config.dense_value)) == 1.0
        for t in range(3):
            assert torch.equal(hat(x, task_id=t), expected)
            assert torch.equal(hat(x, task_id=t, mask_scale=hat.mask_scale(0, 10)), expected)
        assert not torch.allclose(hat(x, task_id=0, mask_scale=1.0), expected)   # soft masks below 1 differ
    normal = hatify.hatify(model, 3, (x,))
    with torch.no_grad():
        assert not torch.allclose(normal.eval()(x, task_id=0), expected)   # the paper's N(0, 1) init does not
