"""Regression tests for issue 14: conversions that used to break the guarantee silently, crash with something
other than HatifyError, or fail validation falsely. Each test names the issue's class."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hatify
from soundness_models import (CachesActivation, InPlace, KeywordAdd, MaxNormEmbedding, NamedLikeGraphModule,
                              PruneShapes, TiedEmbedding, TransformedWeight, UntakenBranch, WeightReadOutside, WithRunningMean,
                              task0_drift, train_task)

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["t", "flip", "norm", "scale"])
def test_class1_transformed_weight(kind):
    assert task0_drift(TransformedWeight(kind), (X,)) == 0.0
    plan = hatify.explain(TransformedWeight(kind), 2, (X,))
    layers = {layer.name for layer in plan.layers}
    if kind == "scale":  # rows stay in place: still a protected HAT layer
        assert "w" in layers
    else:
        assert "w" not in layers and any("transformed across rows" in u.reason for u in plan.unknown)
        assert [p.name for p in plan.params] == ["w"]


def test_class2_weight_read_outside_its_layer():
    assert task0_drift(WeightReadOutside(), (X,)) == 0.0
    plan = hatify.explain(WeightReadOutside(), 2, (X,))
    assert any("read outside the layer" in u.reason or "two kinds of layer" in u.reason for u in plan.unknown)


def test_class2_tied_embedding_is_one_hat_layer_for_both_reads():
    """The output projection reading the embedding's weight is the embedding's tied read (`flow.ties`): one HAT
    layer, whose protection covers the hidden columns the projection's input used."""
    assert task0_drift(TiedEmbedding(), (IDS,)) == 0.0
    emb = hatify.explain(TiedEmbedding(), 2, (IDS,)).layer("emb")
    assert emb.role == "masked" and [site.tied for site in emb.sites] == [False, True]


def test_class3_embedding_max_norm():
    assert task0_drift(MaxNormEmbedding(), (IDS,)) == 0.0
    assert "emb" not in {layer.name for layer in hatify.explain(MaxNormEmbedding(), 2, (IDS,)).layers}


def test_class4_running_buffer_per_task():
    assert task0_drift(WithRunningMean(), (X,)) == 0.0
    plan = hatify.explain(WithRunningMean(), 2, (X,))
    assert any(m.name == "centre" and "buffers" in m.reason for m in plan.modules)


def test_class5_fused_adamw_steps_in_eval():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert task0_drift(net, (X,), optimizer="fused_adamw", eval_steps=True) == 0.0


@pytest.mark.parametrize("kind", ["add_", "setitem", "view_add_", "copy_", "clamp_", "masked_fill_"])
def test_class7_in_place_writes(kind):
    model = InPlace(kind)
    assert task0_drift(model, (X,)) == 0.0
    hat = hatify.hatify(model, 2, (X,))
    assert hatify.validate(model, hat, (X,)).probe_violations == 0


def test_class8_keyword_operand():
    model = KeywordAdd()
    assert task0_drift(model, (X,)) == 0.0
    plan = hatify.explain(model, 2, (X,))
    assert set(plan.layer("c").input_producers) == {"a", "b"}


@pytest.mark.parametrize("name", ["meta", "graph", "code"])
def test_class10_names_a_graph_module_uses_convert_and_are_kept(name, tmp_path):
    model = NamedLikeGraphModule(name)
    hat = hatify.hatify(model, 2, (X,), config=hatify.HATConfig(heads=()))  # validated; both layers masked
    assert [(layer["name"], layer["input_producers"]) for layer in hat.report.plan["layers"]] == [
        ("fc", []), (name, ["fc"])]
    assert set(hat.capacity()) == {"fc", name}
    keys = list(hat.state_dict())
    assert f"net.{name}.parametrizations.weight.original" in keys and not any("user_" in k for k in keys)
    train_task(hat, 0, (X,), torch.optim.AdamW(hat.parameters(), lr=0.05))
    before = hat.eval()(X, task_id=0)
    hatify.save(hat, tmp_path / "model.hat")
    loaded = hatify.load(tmp_path / "model.hat", model=NamedLikeGraphModule(name))
    assert torch.equal(loaded(X, task_id=0), before) and set(loaded.state_dict()) == set(hat.state_dict())
    meta = hatify.io.read_metadata(tmp_path / "model.hat")
    assert [layer["name"] for layer in meta["report"]["plan"]["layers"]] == ["fc", name] and name in meta["capacity"]
    headed = hatify.hatify(model, 2, (X,), config=hatify.HATConfig(heads=(name,)))  # the config names it too
    assert [(layer["name"], layer["role"]) for layer in headed.report.plan["layers"]] == [
        ("fc", "masked"), (name, "head")]


def test_class11_model_with_cached_activations_converts():
    model = CachesActivation()
    model(X)  # the cache now holds a non-leaf tensor
    hat = hatify.hatify(model, 2, (X,))
    with hatify.masks_open(hat):
        torch.testing.assert_close(hat(X, task_id=0), model.eval()(X))


def test_class12_no_false_alarm_for_parameters_unused_in_the_original():
    model = UntakenBranch()
    result = hatify.validate(model, hatify.hatify(model, 2, (X,)), (X,))
    assert result.passed and result.missing_gradients == []


def test_diverging_task_cannot_poison_a_finished_one():
    """Task 1's units at inf: task 0's gates keep them exactly zero (not 0 * inf = NaN). (A later layer's free
    entries at inf meeting task 0's zero inputs in a matmul are not covered: see the issue notes.)"""
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    hat = hatify.hatify(net, 2, (X,))
    train_task(hat, 0, (X,), torch.optim.SGD(hat.parameters(), lr=0.1))
    hat.eval()
    before = hat(X, task_id=0).detach().clone()
    hat.train()
    hat.begin_task(1)
    with torch.no_grad():
        for name, p in hat.named_parameters():
            if "hat_masks" not in name:
                p.fill_(float("inf"))
    hat.end_task()
    hat.eval()
    assert torch.equal(hat(X, task_id=0), before)


PRUNE_KINDS = ["offset", "one_minus", "clamp", "hardtanh", "pool_over_units", "in_place", "layer_twice",
               "norm_twice", "linear_into_conv1d", "keyword_add"]


@pytest.mark.parametrize("kind", PRUNE_KINDS)
def test_class6_and_9_extract_and_prune_give_the_task_outputs(kind):
    hat = hatify.hatify(PruneShapes(kind), 2, (X,))
    train_task(hat, 0, (X,), torch.optim.SGD(hat.parameters(), lr=0.1))
    hat.eval()
    with torch.no_grad():
        expected = hat(X, task_id=0)
        for prune in (False, True):
            torch.testing.assert_close(hat.extract(0, prune=prune)(X), expected, rtol=1e-5, atol=1e-6)
