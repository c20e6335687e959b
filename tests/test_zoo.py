"""Every model of the zoo converts, validates and keeps its contract; specific mask-flow facts of the plan;
the errors a user can cause."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

import hatify
from hatify import per_sample
from hatify.maps import ONES
from models import ZOO, RootControlFlow, UnbatchedConv1d

NUM_TASKS = 3

# Zoo models whose converted forward is known to fail in a hatify stage these tests may not fix.
FORWARD_XFAIL: dict[str, str] = {}


def zoo_params(xfail: dict[str, str]) -> list:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=xfail[name])) if name in xfail
            else name for name in ZOO]


@dataclass
class Converted:
    model: nn.Module
    hat: hatify.HATModel
    inputs: tuple


@functools.lru_cache(maxsize=None)
def converted(name: str) -> Converted:
    """One conversion per zoo model, shared by the tests that only read it (eval mode throughout)."""
    factory, make_inputs = ZOO[name]
    torch.manual_seed(0)
    model, inputs = factory(), make_inputs()
    hat = hatify.hatify(model, num_tasks=NUM_TASKS, example_inputs=inputs)
    return Converted(model.eval(), hat.eval(), inputs)


def units(hat: hatify.HATModel, name: str) -> torch.Tensor:
    layer = hat.plan.layer(name)
    return layer.offset + torch.arange(layer.units)


def index_rows(hat: hatify.HATModel, name: str) -> set[tuple[int, ...]]:
    return {tuple(row.tolist()) for row in hat.plan.layer(name).input_index}


def assert_input_index(hat: hatify.HATModel, name: str, *rows: torch.Tensor) -> None:
    """The layer's input index is exactly the union of `rows` (one row per union term)."""
    assert index_rows(hat, name) == {tuple(r.tolist()) for r in rows}, hat.plan.layer(name).input_index


# ------------------------------------------------------------------------------------------ the zoo

def test_zoo_is_broad() -> None:
    assert len(ZOO) >= 14


@pytest.mark.parametrize("name", zoo_params(FORWARD_XFAIL))
def test_validate_passes(name: str) -> None:
    c = converted(name)
    result = hatify.validate(c.model, c.hat, c.inputs)
    assert result.passed, result.messages
    assert result.probe_violations == 0
    assert result.missing_gradients == []
    assert result.largest_difference <= result.tolerance


@pytest.mark.parametrize("name", zoo_params(FORWARD_XFAIL))
def test_open_masks_equal_original(name: str) -> None:
    c = converted(name)
    with torch.no_grad():
        expected = c.model(*c.inputs)
        with hatify.masks_open(c.hat):
            got = c.hat(*c.inputs, task_id=NUM_TASKS - 1)
    assert pytree.tree_structure(got) == pytree.tree_structure(expected)
    for e, g in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(ZOO))
def test_conversion_leaves_the_original_untouched(name: str) -> None:
    factory, make_inputs = ZOO[name]
    model = factory().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    hatify.hatify(model, num_tasks=NUM_TASKS, example_inputs=make_inputs())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.training


@pytest.mark.parametrize("name", zoo_params(FORWARD_XFAIL))
def test_every_task_runs_with_binary_masks(name: str) -> None:
    c = converted(name)
    with torch.no_grad():
        expected = c.model(*c.inputs)
        for t in range(NUM_TASKS):
            mask = c.hat.masks(t, None)
            assert bool(((mask == 0) | (mask == 1)).all())
            assert mask.shape == (c.hat.plan.total_units + 1,)
            out = c.hat(*c.inputs, task_id=t)
            assert pytree.tree_structure(out) == pytree.tree_structure(expected)
            for e, o in zip(pytree.tree_leaves(expected), pytree.tree_leaves(out)):
                assert o.shape == e.shape and o.dtype == e.dtype
                assert bool(torch.isfinite(o).all())
            again = c.hat(*c.inputs, task_id=torch.tensor(t))
            for o, a in zip(pytree.tree_leaves(out), pytree.tree_leaves(again)):
                assert torch.equal(o, a)


@pytest.mark.parametrize("name", zoo_params(FORWARD_XFAIL))
def test_mixed_task_batch_matches_single_task_runs(name: str) -> None:
    c = converted(name)
    batch = pytree.tree_leaves(c.inputs)[0].shape[0]
    ids = torch.arange(batch) % NUM_TASKS
    with torch.no_grad():
        mixed = pytree.tree_leaves(c.hat(*c.inputs, task_id=ids))
        per_task = [pytree.tree_leaves(c.hat(*c.inputs, task_id=t)) for t in range(NUM_TASKS)]
    for i, t in enumerate(ids.tolist()):
        for leaf, ref in zip(mixed, per_task[t]):
            torch.testing.assert_close(leaf[i], ref[i], rtol=1e-5, atol=1e-6)


# Zoo models the per-sample path refuses (they split by task): a per-task parameter read by the graph, or a
# gated activation whose batch is not its first axis.
PER_SAMPLE_REFUSED = {"transformer", "functional_params", "functional_submodules", "lstm_mha"}


@pytest.mark.parametrize("name", zoo_params(FORWARD_XFAIL))
def test_per_sample_path_matches_single_task_runs(name: str) -> None:
    c = converted(name)
    batch = pytree.tree_leaves(c.inputs)[0].shape[0]
    ids = torch.arange(batch) % NUM_TASKS
    c.hat.eval()
    with torch.no_grad():
        if name in PER_SAMPLE_REFUSED:
            with pytest.raises(per_sample.Unsupported):
                per_sample.run(c.hat.net, c.inputs, {}, ids)
            return
        one_pass = pytree.tree_leaves(per_sample.run(c.hat.net, c.inputs, {}, ids))
        per_task = [pytree.tree_leaves(c.hat(*c.inputs, task_id=t)) for t in range(NUM_TASKS)]
    for i, t in enumerate(ids.tolist()):
        for leaf, ref in zip(one_pass, per_task[t]):
            torch.testing.assert_close(leaf[i], ref[i], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ mask-flow facts

def test_alexnet_flatten_repeats_conv_units_channel_major() -> None:
    hat = converted("alexnet_like").hat
    conv = units(hat, "features.7")
    fc1 = hat.plan.layer("fc1")
    assert fc1.input_producers == ["features.7"]
    assert fc1.input_map == "repeat_interleave(4)"
    assert torch.equal(fc1.input_index, conv.repeat_interleave(2 * 2)[None])
    assert torch.equal(hat.plan.layer("fc2").input_index, units(hat, "fc1")[None])
    assert hat.plan.layer("head").role == "head"


def test_alexnet_chain_of_convs() -> None:
    hat = converted("alexnet_like").hat
    assert hat.plan.layer("features.0").input_producers == []
    assert bool((hat.plan.layer("features.0").input_index == ONES).all())
    assert_input_index(hat, "features.3", units(hat, "features.0"))
    assert_input_index(hat, "features.7", units(hat, "features.3"))


def test_residual_add_is_a_union() -> None:
    hat = converted("resnet_block").hat
    conv3 = hat.plan.layer("conv3")
    assert sorted(conv3.input_producers) == ["conv2", "stem"]
    assert_input_index(hat, "conv3", units(hat, "stem"), units(hat, "conv2"))
    assert_input_index(hat, "conv2", units(hat, "conv1"))
    assert_input_index(hat, "conv1", units(hat, "stem"))


def test_mask_goes_after_batchnorm() -> None:
    plan = converted("resnet_block").hat.plan
    assert [s.apply_after for s in plan.layer("stem").sites] == ["bn0"]
    assert [s.apply_after for s in plan.layer("conv2").sites] == ["bn2"]
    assert {m.name: m.policy for m in plan.modules if m.op == "BatchNorm2d"} == {
        f"bn{i}": "task_indexed" for i in range(4)}


def test_unet_decoder_sees_both_producers_of_the_cat() -> None:
    hat = converted("unet").hat
    dec2, dec1 = hat.plan.layer("dec2.0"), hat.plan.layer("dec1.0")
    assert sorted(dec2.input_producers) == ["enc2.1", "up2"]
    assert_input_index(hat, "dec2.0", torch.cat([units(hat, "up2"), units(hat, "enc2.1")]))
    assert_input_index(hat, "dec1.0", torch.cat([units(hat, "up1"), units(hat, "enc1.0")]))
    assert hat.plan.layer("up2").kind == "conv_transpose"
    assert_input_index(hat, "up2", units(hat, "bottom.1"))
    assert hat.plan.layer("out").role == "head"


def test_densenet_concat_through_batchnorm() -> None:
    hat = converted("densenet").hat
    assert_input_index(hat, "layer1.2", units(hat, "stem"))
    assert_input_index(hat, "layer2.2", torch.cat([units(hat, "stem"), units(hat, "layer1.2")]))


def test_inception_branches_concatenate_in_order() -> None:
    hat = converted("inception").hat
    assert_input_index(hat, "mix", torch.cat([units(hat, n) for n in ("b1", "b3.2", "bpool.1")]))
    assert_input_index(hat, "bpool.1", units(hat, "stem"))


def test_attention_projection_follows_v_of_fused_qkv() -> None:
    hat = converted("transformer").hat
    dim = 8
    qkv = units(hat, "attn.qkv")
    assert_input_index(hat, "attn.proj", qkv[2 * dim:])
    assert hat.plan.layer("attn.proj").input_producers == ["attn.qkv"]
    assert_input_index(hat, "mlp.2", units(hat, "mlp.0"))
    assert hat.plan.layer("embed").kind == "embedding" and hat.plan.layer("embed").role == "masked"
    loose = {p.name: p.policy for p in hat.plan.params}
    assert loose == {"cls_token": "per_task", "pos_embed": "per_task"}


def test_sdpa_output_follows_v() -> None:
    hat = converted("sdpa").hat
    assert_input_index(hat, "out", units(hat, "v"))
    for name in ("q", "k", "v"):
        assert_input_index(hat, name, units(hat, "inp"))


def test_chunk_and_split_take_slices() -> None:
    hat = converted("chunk_split").hat
    assert_input_index(hat, "fc2", units(hat, "fc1")[:8])
    assert_input_index(hat, "fc3", units(hat, "fc2")[:8])


def test_squeeze_excite_gate_keeps_the_feature_mask() -> None:
    hat = converted("squeeze_excite").hat
    assert_input_index(hat, "reduce", units(hat, "conv"))
    assert_input_index(hat, "expand", units(hat, "reduce"))
    assert_input_index(hat, "conv2", units(hat, "conv"))


def test_module_called_twice_sees_both_inputs() -> None:
    hat = converted("shared_linear").hat
    shared = hat.plan.layer("shared")
    assert len(shared.sites) == 2
    assert_input_index(hat, "shared", units(hat, "inp"), units(hat, "shared"))


def test_two_inputs_concat_and_dict_heads() -> None:
    hat = converted("two_inputs_dict").hat
    assert_input_index(hat, "fuse", torch.cat([units(hat, "conv"), units(hat, "vec")]))
    assert {layer.name for layer in hat.plan.layers if layer.role == "head"} == {"cls", "reg"}


def test_depthwise_and_grouped_convs() -> None:
    hat = converted("mobilenet_like").hat
    dw, grouped = hat.plan.layer("dw.0"), hat.plan.layer("grouped.0")
    assert (dw.groups, dw.input_units) == (8, 8)
    assert (grouped.groups, grouped.input_units) == (3, 12)
    assert_input_index(hat, "dw.0", units(hat, "stem.0"))
    assert_input_index(hat, "grouped.0", units(hat, "pw.0"))


def test_functional_layers_on_own_parameters() -> None:
    hat = converted("functional_submodules").hat
    conv, fc = hat.plan.layer("conv"), hat.plan.layer("fc")
    assert (conv.op, conv.weight, conv.bias) == ("F.conv2d", "conv.weight", "conv.bias")
    assert fc.op == "F.linear" and fc.input_map == "repeat_interleave(16)"
    assert torch.equal(fc.input_index, units(hat, "conv").repeat_interleave(16)[None])


def test_functional_layers_on_root_parameters_are_planned() -> None:
    plan = hatify.explain(ZOO["functional_params"][0](), NUM_TASKS, ZOO["functional_params"][1]())
    fc = plan.layer("fc_w")
    conv = plan.layer("conv_w")
    assert (conv.op, conv.bias, fc.op, fc.bias) == ("F.conv2d", "conv_b", "F.linear", "fc_b")
    assert torch.equal(fc.input_index, (conv.offset + torch.arange(6)).repeat_interleave(16)[None])
    assert plan.layer("head_w").role == "head"


def test_conv1d_groupnorm_is_remasked() -> None:
    hat = converted("conv1d_groupnorm").hat
    assert_input_index(hat, "conv2", units(hat, "conv1"))
    assert {"gn1", "gn2"} <= set(hat.plan.remask)
    assert {m.name: m.policy for m in hat.plan.modules if m.op == "GroupNorm"} == {
        "gn1": "task_indexed", "gn2": "task_indexed"}


def test_conv3d_flatten() -> None:
    hat = converted("conv3d").hat
    assert hat.plan.layer("fc").input_map == "repeat_interleave(8)"
    assert torch.equal(hat.plan.layer("fc").input_index, units(hat, "conv2").repeat_interleave(8)[None])
    assert_input_index(hat, "conv2", units(hat, "conv1"))


def test_data_dependent_submodule_becomes_opaque() -> None:
    hat = converted("data_dependent_submodule").hat
    assert set(hat.plan.opaque) == {"gate"}
    assert "control flow" in hat.plan.opaque["gate"]
    assert "gate" in {u.node for u in hat.plan.unknown}
    fc2 = hat.plan.layer("fc2")
    assert fc2.input_producers == [] and bool((fc2.input_index == ONES).all())
    assert {m.name: m.policy for m in hat.plan.modules}["gate"] == "per_task"


def test_lstm_is_an_opaque_leaf_and_mha_is_converted() -> None:
    hat = converted("lstm_mha").hat
    policies = {m.name: (m.op, m.policy) for m in hat.plan.modules}
    assert policies["lstm"] == ("LSTM", "per_task")
    assert "mha" not in policies
    assert "lstm" in {u.node for u in hat.plan.unknown}
    assert hat.plan.layer("mha.in_proj_weight").input_producers == []  # behind the opaque LSTM
    assert_input_index(hat, "fc", units(hat, "mha.out_proj"))


def test_embedding_roles() -> None:
    assert converted("embedding_only").hat.plan.layer("embed").role == "head"
    hat = converted("embedding_bag").hat
    assert hat.plan.layer("embed").role == "masked"
    assert hat.plan.layer("embed").input_index is None
    assert hat.plan.layer("head").role == "head"


def test_clamp_that_moves_zero_breaks_the_flow() -> None:
    hat = converted("clamp_activations").hat
    assert_input_index(hat, "fc2", units(hat, "fc1"))          # clamp(min=0): zero stays zero
    assert hat.plan.layer("fc3").input_producers == []         # clamp_min(0.1): zero becomes 0.1
    assert hat.plan.layer("fc4").input_producers == []         # Hardtanh(0.1, 1): likewise


def test_pooling_across_concatenated_tokens_mixes_them() -> None:
    hat = converted("token_concat_pool").hat
    fc = hat.plan.layer("fc")
    assert fc.input_producers == [] and bool((fc.input_index == ONES).all())


def test_unfold_repeats_channel_units_over_kernel_positions() -> None:
    hat = converted("unfold_patches").hat
    fc = hat.plan.layer("fc")
    assert fc.input_map == "repeat_interleave(9)"
    assert torch.equal(fc.input_index, units(hat, "conv").repeat_interleave(9)[None])


@pytest.mark.xfail(strict=True, reason="conv output/input channel axis is hard-coded to 1 (flow._MODULE_PRODUCERS, "
                                       "plan.flow_axis, validate.probe_flow): an unbatched (C, L) input makes the "
                                       "conv's units its length and the mask lands on the wrong axis")
def test_unbatched_conv1d() -> None:
    model, x = UnbatchedConv1d(), (torch.randn(3, 7),)
    hat = hatify.hatify(model, num_tasks=2, example_inputs=x)
    assert hat.plan.layer("conv1").units == 5
    assert_input_index(hat, "conv2", units(hat, "conv1"))
    assert hatify.validate(model, hat, x).passed


# ------------------------------------------------------------------------------------------ errors

def _mlp() -> tuple[nn.Module, tuple]:
    factory, make_inputs = ZOO["mlp"]
    return factory(), make_inputs()


def test_error_not_a_module() -> None:
    with pytest.raises(hatify.HatifyError, match="nn.Module"):
        hatify.hatify(lambda x: x, num_tasks=2, example_inputs=(torch.randn(2, 3),))


@pytest.mark.parametrize("num_tasks", [0, -1, True, "3", 2.0, None])
def test_error_bad_num_tasks(num_tasks) -> None:
    model, inputs = _mlp()
    with pytest.raises(hatify.HatifyError, match="num_tasks"):
        hatify.hatify(model, num_tasks=num_tasks, example_inputs=inputs)


@pytest.mark.parametrize("task_id, what", [
    (3, "out of range"), (-1, "out of range"), (1.0, "task_id"), (True, "task_id"), ("0", "task_id"),
    (torch.tensor([0, 1]), "ids"), (torch.zeros(4, 1, dtype=torch.long), "1-D"),
    (torch.tensor([0, 1, 2, 3]), "out of range"), (torch.tensor([0.0, 1.0, 0.0, 1.0]), "integers"),
])
def test_error_bad_task_id(task_id, what: str) -> None:
    c = converted("mlp")
    with pytest.raises(hatify.HatifyError, match=what):
        c.hat(*c.inputs, task_id=task_id)


def test_error_missing_task_id() -> None:
    c = converted("mlp")
    with pytest.raises(hatify.HatifyError, match="task_id"):
        c.hat(*c.inputs)


def test_error_missing_example_inputs() -> None:
    model, _ = _mlp()
    with pytest.raises(hatify.HatifyError, match="example_inputs"):
        hatify.hatify(model, num_tasks=2)


def test_error_root_control_flow() -> None:
    with pytest.raises(hatify.HatifyError, match="RootControlFlow") as info:
        hatify.hatify(RootControlFlow(), num_tasks=2, example_inputs=(torch.randn(2, 4),))
    assert "concrete_args" in str(info.value)


def test_error_too_many_example_inputs() -> None:
    model, inputs = _mlp()
    with pytest.raises(hatify.HatifyError, match="example_inputs"):
        hatify.hatify(model, num_tasks=2, example_inputs=inputs * 2)
