"""Graph breaks at opaque modules (`hatify.nested`): the traceable submodules that an opaque module's Python
calls become HAT subgraphs sharing the model's mask bank. On torchvision's R-CNNs (real classes, random weights,
64x64 images) `rpn` and `roi_heads` stay opaque (box decoding, `range()` of a traced size) while their heads and
box MLP become HAT layers: validated (open masks, probes reaching inside), task 0 bit-identical after task 1,
extract, save/load and deepcopy."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import hatify
from hatify.inputs import Inputs
from hatify import probe
from hatify.probe import observe_zeros, probe_flow

SMALL = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
         "box_detections_per_img": 8}
DETECTORS = {
    "faster": (lambda bb: detection.FasterRCNN(bb, num_classes=3, **SMALL),
               ["roi_heads.box_head", "roi_heads.box_predictor", "rpn.head"]),
    "mask": (lambda bb: detection.MaskRCNN(bb, num_classes=3, **SMALL),
             ["roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor",
              "rpn.head"]),
    "keypoint": (lambda bb: detection.KeypointRCNN(bb, num_classes=2, num_keypoints=3, **SMALL),
                 ["roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.keypoint_head",
                  "roi_heads.keypoint_predictor", "rpn.head"]),
}


def _detector(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return DETECTORS[kind][0](backbone).eval()


def _images(seed: int = 0) -> list:
    return list(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))


def _loss(outputs: list) -> torch.Tensor:
    """A small loss over every float output of the detections (boxes, masks, keypoints); scores rise, so that
    detections remain to compare."""
    return sum(v.float().mean() * (-1.0 if k == "scores" else 0.01) for d in outputs for k, v in d.items()
               if v.is_floating_point() and v.numel())


def _equal(a: list, b: list) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(scope="module", params=list(DETECTORS))
def converted(request):
    model = _detector(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hat = hatify.hatify(model, num_tasks=2, example_inputs=(_images(),))  # validates: raises on failure
    return request.param, model, hat


def test_rcnn_heads_become_hat_layers(converted):
    kind, model, hat = converted
    assert sorted(hat.plan.nested) == DETECTORS[kind][1]
    assert hat.report.validation["passed"], hat.report.validation["messages"]
    assert hat.report.validation["probe_violations"] == 0
    assert {"rpn", "roi_heads"} <= set(hat.plan.opaque)  # still opaque, reported with their source lines
    assert not [m.name for m in hat.plan.modules if m.name in ("rpn", "roi_heads")]  # no per-task copy of them
    masked = {layer.name for layer in hat.plan.masked_layers}
    assert {"roi_heads.box_head.fc6", "rpn.head.conv.0.0"} <= masked
    assert hat.report.summary["hat_parameter_share"] >= 0.8, hat.report.summary["hat_parameter_share"]


def test_probe_reaches_nested_layers(converted):
    """The mask-flow probe observes the layers inside nested subgraphs, and a wrong map there is caught."""
    _, _, hat = converted
    inputs = Inputs.of((_images(),))
    seen = observe_zeros(hat, inputs, torch.zeros(hat.plan.total_units))
    assert any(name.startswith("roi_heads.box_head.") for name in seen)
    layer = hat.plan.layer("roi_heads.box_head.fc6")
    saved = layer.input_index
    source = hat.plan.layer("rpn.head.conv.0.0")  # claim: fc6 reads rpn's conv units (it does not)
    layer.input_index = torch.arange(source.offset, source.offset + source.units).repeat(
        layer.input_units // source.units + 1)[None, :layer.input_units]
    try:
        _, violations, _ = probe_flow(hat, inputs)
    finally:
        layer.input_index = saved
    assert violations > 0


def test_probe_runs_stop_after_the_opaque_call_that_runs_their_last_layer(converted):
    """A pattern that zeroes only backbone layers stops before the opaque calls; one that predicts a zero inside
    a nested subgraph runs through the opaque call that runs it; both record what a full run records."""
    from test_validate import early_runs_record_what_full_runs_record

    _, _, hat = converted
    inputs = Inputs.of((_images(),))
    assert early_runs_record_what_full_runs_record(hat, inputs) >= 1
    watch = probe.watched_sites(hat)
    nested = [site for site in watch if site.startswith("roi_heads.")]
    seen = observe_zeros(hat, inputs, torch.zeros(hat.plan.total_units), watch, set(nested[:1]))
    assert set(nested) <= seen.keys()  # the opaque call ran to its end
    own = [site for site in watch if "." not in site]
    seen = observe_zeros(hat, inputs, torch.zeros(hat.plan.total_units), watch, set(own[:1]))
    assert seen.keys() == set(own[:1])


def test_task0_bit_identical_after_task1(converted):
    """Tasks 0 and 1 trained one after the other (layers in eval mode, as detectors are fine-tuned; a small loss
    over the detections); task 0's detections stay bit-identical while the nested layers keep learning."""
    _, _, hat = converted
    hat = copy.deepcopy(hat)
    images = _images()
    opt = torch.optim.SGD(hat.parameters(), lr=0.05, momentum=0.9)
    fc6 = hat.net.roi_heads.box_head.fc6.parametrizations.weight.original
    for t in range(2):
        hat.train()
        hat.net.eval()
        hat.begin_task(t)
        for b in range(2):
            loss = _loss(hat(_images(b + 1), task_id=t, mask_scale=hat.mask_scale(b, 2))) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hat.end_task()
        hat.eval()
        with torch.no_grad():
            if t == 0:
                after0, fc6_after0 = hat(images, task_id=0), fc6.detach().clone()
            else:
                assert _equal(hat(images, task_id=0), after0)
    assert all(len(d["boxes"]) for d in after0)  # there is something to compare
    assert not torch.equal(fc6, fc6_after0)  # task 1 moved fc6's free weights: the check has power
    with torch.no_grad():
        assert _equal(hat.extract(0)(images), after0)


def test_save_load_deepcopy_and_direct_call(converted, tmp_path):
    kind, _, hat = converted
    images = _images(3)
    hat.eval()
    with torch.no_grad():
        ref = hat(images, task_id=1)
        assert _equal(copy.deepcopy(hat)(images, task_id=1), ref)
        hatify.save(hat, tmp_path / "det")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = hatify.load(tmp_path / "det", model=_detector(kind, seed=7))
        assert _equal(loaded(images, task_id=1), ref)
    with pytest.raises(hatify.HatifyError, match="outside its model's forward"):
        hat.net.roi_heads.box_head(torch.randn(3, 256, 7, 7))


class _Decoder(nn.Module):
    """Python that depends on data around a traceable MLP: opaque to the trace."""

    def __init__(self, own_parameter: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.scale = nn.Parameter(torch.ones(4)) if own_parameter else None

    def forward(self, x):
        rows = x[x.sum(1) > -1e9]  # a data-dependent number of rows
        out = self.mlp(rows)
        for _ in range(int(rows.shape[0] > 0)):
            out = out * 2
        return out * self.scale if self.scale is not None else out


class _Net(nn.Module):
    def __init__(self, own_parameter: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.decoder = _Decoder(own_parameter)

    def forward(self, x):
        return self.decoder(self.stem(x))


def test_opaque_module_with_own_parameter_stays_whole():
    """A break needs every parameter of the opaque module inside submodules that convert; else it stays one
    per-task copy, as before."""
    x = torch.randn(5, 6)
    torch.manual_seed(0)
    whole = hatify.hatify(_Net(own_parameter=True), 2, (x,))
    assert not whole.plan.nested
    assert [m.policy for m in whole.plan.modules if m.name == "decoder"] == ["per_task"]
    torch.manual_seed(0)
    broken = hatify.hatify(_Net(), 2, (x,))
    assert list(broken.plan.nested) == ["decoder.mlp"]
    roles = {layer.name: layer.role for layer in broken.plan.layers}
    assert roles == {"stem.0": "head", "decoder.mlp.0": "masked", "decoder.mlp.2": "masked", "decoder.mlp.4": "head"}
    # inside the nested subgraph the map is known: mlp.2 reads mlp.0's units
    assert broken.plan.layer("decoder.mlp.2").input_map == "identity"


def test_compiled_training_matches_eager_and_keeps_old_tasks():
    """Under torch.compile the opaque module's data-dependent Python breaks the graph, and the nested subgraph
    still reads the task id and masks its call bound."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 4
    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(hatify.hatify(_Net(), num_tasks=2, example_inputs=(x[:4],)))
    eager, compiled_hat = models
    compiled = torch.compile(compiled_hat)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    after = {}
    for t in range(2):
        for hat, fwd, opt in ((eager, eager, opts[0]), (compiled_hat, compiled, opts[1])):
            hat.train()
            hat.begin_task(t)
            for b in range(3):
                loss = nn.functional.cross_entropy(fwd(x, task_id=t, mask_scale=hat.mask_scale(b, 3)), y) + \
                    hat.regularization()
                opt.zero_grad()
                loss.backward()
                opt.step()
            hat.end_task()
            hat.eval()
        with torch.no_grad():
            after[t] = compiled(x, task_id=t)
            torch.testing.assert_close(after[t], eager(x, task_id=t), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(compiled(x, task_id=0), after[0])
    assert not torch.equal(after[0], after[1])


def test_mixed_task_batch_runs_each_task_with_its_masks():
    """One id per sample: each task's rows run under that task's masks, nested subgraph included (the per-sample
    path refuses a graph whose opaque call binds one task's masks)."""
    from hatify import per_sample

    torch.manual_seed(0)
    x = torch.randn(6, 6)
    hat = hatify.hatify(_Net(), 2, (x,)).eval()
    with torch.no_grad():
        hat.masks.task1.neg_()  # the two tasks' masks differ
        ids = torch.tensor([0, 1, 0, 1, 1, 0])
        out = hat(x, task_id=ids)
        for t in range(2):
            assert torch.equal(out[ids == t], hat(x[ids == t], task_id=t))
        assert not torch.equal(hat(x, task_id=0), hat(x, task_id=1))
    with pytest.raises(per_sample.Unsupported, match="nested HAT subgraphs"):
        per_sample.run(hat.net, (x,), {}, ids)


def test_forget_task_keeps_the_others_and_capacity_counts_nested_layers():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    hat = hatify.hatify(_Net(), 3, (x,))
    opt = torch.optim.Adam(hat.parameters(), lr=0.05)
    outs = {}
    for t in range(3):
        hat.train()
        hat.begin_task(t)
        for b in range(3):
            loss = hat(x, task_id=t, mask_scale=hat.mask_scale(b, 3)).square().mean() + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        with torch.no_grad():
            outs[t] = hat(x, task_id=t)
    assert set(hat.capacity()) == {"decoder.mlp.0", "decoder.mlp.2"}
    hat.forget_task(1)
    with torch.no_grad():
        assert torch.equal(hat(x, task_id=0), outs[0]) and torch.equal(hat(x, task_id=2), outs[2])
