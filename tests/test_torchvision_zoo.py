"""torchvision families in CI: the zoo's three checks (convert, validate, task 0 bit-identical after task 1
with one AdamW) on small builds of the families that need hatify's general mechanisms most: drop path
(ConvNeXt, EfficientNetV2), nn.MultiheadAttention (ViT), a detector whose sub-traces fail and fall back to
opaque leaves (Faster R-CNN) and traced sizes turned into tensors (RAFT). `python benchmarks/torchvision_zoo.py`
runs every family at its real size."""
import importlib.util
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torchvision import models
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig

_spec = importlib.util.spec_from_file_location(
    "torchvision_zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "torchvision_zoo.py")
torchvision_zoo = importlib.util.module_from_spec(_spec)
sys.modules["torchvision_zoo"] = torchvision_zoo
_spec.loader.exec_module(torchvision_zoo)
timm_zoo = torchvision_zoo.timm_zoo


def _image(size: int) -> tuple:
    return (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


SMALL = {
    "convnext": (lambda: models.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)],
                                         stochastic_depth_prob=0.3, num_classes=4), partial(_image, 32), 0.9, 13),
    "efficientnet_v2": (lambda: models.EfficientNet(
        [FusedMBConvConfig(1, 3, 1, 16, 16, 2), MBConvConfig(4, 3, 2, 16, 32, 2)], dropout=0.2,
        stochastic_depth_prob=0.3, last_channel=64, num_classes=4), partial(_image, 32), 0.9, 13),
    "vision_transformer": (lambda: models.VisionTransformer(32, 8, 2, 2, 32, 64, dropout=0.1, attention_dropout=0.1,
                                                            num_classes=4), partial(_image, 32), 0.9, 4),
}


@pytest.mark.parametrize("family", list(SMALL))
def test_small_build_converts_validates_and_keeps_task0(family):
    build, inputs, share, known = SMALL[family]
    torch.manual_seed(0)
    model = build().eval()
    row = timm_zoo.check_converted(model, inputs(), {"model": family})
    assert row["status"] == "pass"
    assert row["hat_share"] > share, f"{family}: only {row['hat_share']:.0%} of parameters under HAT control"
    assert not row["opaque"] and not row["unknown_ops"], (row["opaque"], row["unknown_ops"])
    # The zoo records the known input maps; `--known-only` (explain alone) measures the same figures.
    assert int(row["known_maps"].split("/")[0]) >= known, (row["known_maps"], row["unknown_inputs"])
    fast = timm_zoo.known_only(model, inputs())
    assert {k: fast[k] for k in ("known_maps", "known_share", "unknown_inputs")} == \
        {k: row[k] for k in ("known_maps", "known_share", "unknown_inputs")}


# The share under HAT each family reached (Faster R-CNN: its rpn and roi_heads stay opaque, their heads and box
# MLP are nested HAT subgraphs, hatify.nested; 0.17 with the whole opaque modules copied per task).
MIN_SHARE = {"detection.faster_rcnn": 0.85, "detection.fcos": 0.9, "optical_flow.raft": 0.98}


@pytest.mark.parametrize("family", ["detection.faster_rcnn", "detection.fcos", "optical_flow.raft"])
def test_zoo_family(family):
    row = torchvision_zoo.check_family(family)
    assert row["status"] == "pass", f"{family}: {row['reason']}: {row['why']}"
    assert row["hat_share"] >= MIN_SHARE[family], row["hat_share"]
