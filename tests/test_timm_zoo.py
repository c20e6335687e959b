"""timm families in CI: a representative selection runs the zoo's three checks (convert, validate, task 0
bit-identical after task 1 with one AdamW) at tiny inputs; `make zoo` runs every family. Also: converting
a model with trained weights keeps them."""
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

import hatify
from hatify.validate import original_parameter_map

_spec = importlib.util.spec_from_file_location(
    "timm_zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "timm_zoo.py")
timm_zoo = importlib.util.module_from_spec(_spec)
sys.modules["timm_zoo"] = timm_zoo
_spec.loader.exec_module(timm_zoo)

pytestmark = pytest.mark.timm_zoo

# (model, input sizes to try, extra keyword arguments): one per family, picked to cover the hard parts
# (residual adds, concat, depthwise/grouped convs, squeeze-excite, weight standardisation, layer scale,
# position embeddings, class and distillation tokens, windowed and relative-position attention, token
# mixing, modules timm marks untraceable, timm's wrapped helpers (one returning None), shape-dependent
# control flow, in-place item assignment) in a few seconds each. Depths are cut where the smallest variant
# is still slow on two cores.
REPRESENTATIVE = [
    ("resnet18", (32,), {}),
    ("vit_tiny_patch16_224", (32,), {}),
    ("convnext_atto", (32,), {}),
    ("efficientnet_b0", (32,), {}),
    ("mobilenetv3_small_050", (32,), {}),
    ("densenet121", (32,), {}),
    ("regnetx_002", (32,), {}),
    ("nf_regnet_b0", (32,), {}),
    ("swin_tiny_patch4_window7_224", (56,), {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}),
    ("hiera_tiny_224", (64,), {"stages": (1, 1, 1, 1)}),
    ("levit_128s", (64,), {}),
    ("cait_xxs24_224", (32,), {"depth": 2}),
    ("deit_tiny_distilled_patch16_224", (32,), {"depth": 2}),
    ("beit_base_patch16_224", (32,), {"depth": 2, "embed_dim": 64, "num_heads": 2}),
    ("mixer_s32_224", (64,), {}),
    ("coat_lite_tiny", (32,), {}),
    ("crossvit_tiny_240", (48,), {"depth": ((1, 1, 0),)}),
    ("maxvit_pico_rw_256", (64,), {}),
    ("mobilevit_xxs", (64,), {}),
    ("tiny_vit_5m_224", (64,), {}),
    ("convit_tiny", (32,), {"depth": 2}),
    ("naflexvit_base_patch16_parfac_gap", (32,), {"depth": 2, "embed_dim": 64, "num_heads": 2}),
]


@pytest.mark.parametrize("name,sizes,kwargs", REPRESENTATIVE, ids=[r[0] for r in REPRESENTATIVE])
def test_family_converts_validates_and_keeps_task0(name, sizes, kwargs):
    row = timm_zoo.check_model(name, sizes, **kwargs)
    assert row["status"] == "pass", f"{name}: {row['reason']}: {row['why']}"
    assert row["hat_share"] > 0.9, f"{name}: only {row['hat_share']:.0%} of parameters under HAT control"
    assert not row["opaque"], f"{name}: opaque submodules {row['opaque']}"


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32})])
def test_trained_weights_are_kept(name, kwargs, tmp_path):
    """A state dict saved locally (weights cannot be downloaded here) stands for pretrained weights: the
    converted model reproduces the trained model and holds exactly its parameters and statistics."""
    trained = timm.create_model(name, num_classes=3, **kwargs)
    with torch.no_grad():
        for value in trained.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.1)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    fresh = timm.create_model(name, num_classes=3, **kwargs)
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    hat = hatify.hatify(fresh, num_tasks=2, example_inputs=(x,))
    with torch.no_grad(), hatify.masks_open(hat):
        torch.testing.assert_close(hat(x, task_id=1), trained.eval()(x), rtol=1e-5, atol=1e-5)
    original = trained.state_dict()
    converted = dict(hat.net.named_parameters())
    mapping = original_parameter_map(hat)
    assert set(mapping) == {n for n, _ in trained.named_parameters()}
    for orig, new in mapping.items():
        assert torch.equal(converted[new], original[orig]), f"{orig} -> {new} changed"
    buffers = dict(hat.net.named_buffers())
    for module_plan in hat.plan.modules:  # every task's copy of a norm starts from the trained statistics
        prefix = f"{module_plan.name}."
        for key, value in original.items():
            if key.startswith(prefix) and "running" in key:
                for t in range(2):
                    assert torch.equal(buffers[f"{prefix}copies.{t}.{key[len(prefix):]}"], value), key
