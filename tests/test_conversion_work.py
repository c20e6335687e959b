"""Conversion does each piece of work once: zero checks shared between alike ops give the answers run one by one,
stack traces hold the model's own frames, and `save` copies only the tensors it must."""
import timm
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import hatify
from hatify.capture import capture
from hatify.config import HATConfig
from hatify.convert import explain
from hatify.errors import _OWN_DIR, source_line
from hatify.inputs import Inputs
from hatify.rules import RULES, RuleContext, _canon, _keeps_zero, _zero_kept


class AlikeClamps(nn.Module):
    """Ops of one kind on tensors of one shape, differing only in a constant or a module setting: each pair's
    second op moves zero, so a zero check shared between the pair would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4, self.fc5 = (nn.Linear(8, 8) for _ in range(5))
        self.keeps, self.moves = nn.Hardtanh(0.0, 1.0), nn.Hardtanh(0.1, 1.0)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.fc2(self.fc1(x).clamp(min=0.0))
        x = self.fc3(x.clamp(min=0.1))
        x = self.fc4(self.keeps(x))
        return self.head(self.fc5(self.moves(x)))


def test_zero_checks_are_shared_only_between_ops_alike_in_all_they_depend_on() -> None:
    plan = explain(AlikeClamps().eval(), 2, (torch.randn(4, 8),))
    producers = {layer.name: layer.input_producers for layer in plan.layers}
    assert producers["fc2"] == ["fc1"]   # clamp(min=0): zero stays zero
    assert producers["fc3"] == []        # clamp(min=0.1), same shape: zero becomes 0.1
    assert producers["fc4"] == ["fc3"]   # Hardtanh(0, 1)
    assert producers["fc5"] == []        # Hardtanh(0.1, 1), same shape


def _zero_checked_nodes(gm):
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        key = type(module) if module is not None else _canon(node.target) if node.op in (
            "call_function", "call_method") else None
        rule = RULES.get(key) if key is not None else None
        if rule is not None and rule.fn.__name__ in ("passthrough", "window") and node.args:
            yield node, module


def test_shared_zero_checks_answer_as_each_check_run_alone() -> None:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    ids = torch.randint(0, 50, (2, 8))
    cases = [(timm.create_model("resnet18", num_classes=3), (torch.randn(2, 3, 32, 32),)),
             (timm.create_model("efficientnet_b0", num_classes=3), (torch.randn(2, 3, 32, 32),)),
             (transformers.BertModel(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    checked = 0
    for model, inputs in cases:
        gm = capture(model.eval(), HATConfig(), set(), Inputs.of(inputs)).graph_module
        memo: dict = {}
        for node, module in _zero_checked_nodes(gm):
            shared, alone = RuleContext(node, {}, module, 1, memo), RuleContext(node, {}, module, 1)
            assert _keeps_zero(shared, node.args[0]) == _zero_kept(alone, node.args[0]), node.format_node()
            checked += 1
        assert len(memo) < checked  # some checks were shared
    assert checked > 40


def test_stack_traces_hold_the_models_own_frames() -> None:
    gm = capture(timm.create_model("resnet18", num_classes=3).eval(), HATConfig(), set(),
                 Inputs.of((torch.randn(1, 3, 32, 32),))).graph_module
    conv = next(n for n in gm.graph.nodes if n.name == "layer1_0_conv1")
    assert conv.stack_trace.startswith('File "') and "in forward_features" in conv.stack_trace
    assert "/torch/" not in conv.stack_trace and _OWN_DIR not in conv.stack_trace
    assert conv.stack_trace.rstrip().endswith("x = self.conv1(x)")
    assert source_line(conv).startswith("resnet.py:")


class StridedBuffers(nn.Module):
    """State entries that cannot be written as they are: a transposed buffer, two views of one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
        self.register_buffer("scale", torch.rand(6, 3).t())
        base = torch.rand(12)
        self.register_buffer("low", base[:6])
        self.register_buffer("high", base[6:])

    def forward(self, x):
        return self.head(F.relu(self.fc(x)) * (self.low + self.high) * self.scale.sum(0))


def test_save_copies_only_entries_that_share_or_stride_their_storage(tmp_path) -> None:
    model, x = StridedBuffers().eval(), torch.randn(3, 4)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=(x,))
    hatify.save(hat, tmp_path / "strided.hat")
    again = hatify.load(tmp_path / "strided.hat", model=StridedBuffers())
    saved, loaded = hat.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(hat(x, task_id=1), again(x, task_id=1))
