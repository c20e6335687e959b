"""HuggingFace transformers as they are, in CI: a representative part of benchmarks/hf_zoo.py (BERT, GPT-2,
Llama, T5, ViT from tiny configs, random weights) through the zoo's three checks with keyword inputs, sdpa and
eager attention, padded and unpadded masks; the converted model returns the model's own `ModelOutput`, and a
converted BERT saves and loads."""
import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import hatify
from soundness_models import two_tasks

transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "hf_zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "hf_zoo.py")
hf_zoo = importlib.util.module_from_spec(_spec)
sys.modules["hf_zoo"] = hf_zoo
_spec.loader.exec_module(hf_zoo)

# (zoo name, attention, padded mask, least share of parameters under HAT). An untied LM head (Llama) is a
# per-task head, which bounds the share; a tied one (GPT-2, T5, mBART) is one HAT layer with the embedding
# (`flow.ties`). T5's and mBART's outputs also include the encoder's last hidden state, which is no task output:
# the encoder's residual writers stay HAT layers.
REPRESENTATIVE = [
    ("bert", "sdpa", True, 0.95),
    ("bert", "eager", False, 0.95),
    ("gpt2", "sdpa", True, 0.99),
    ("gpt2", "eager", True, 0.99),
    ("llama", "sdpa", True, 0.9),
    ("llama", "eager", False, 0.9),
    ("t5", "eager", True, 0.99),
    ("mbart", "sdpa", True, 0.98),
    ("xlnet", "eager", True, 0.95),
    ("mixtral", "sdpa", True, 0.95),
    ("bart-cls", "eager", False, 0.95),
    ("vit", "sdpa", False, 0.95),
]


@pytest.mark.parametrize("name,attn,padded,share", REPRESENTATIVE,
                         ids=[f"{r[0]}-{r[1]}-{'padded' if r[2] else 'full'}" for r in REPRESENTATIVE])
def test_architecture_converts_validates_and_keeps_task0(name, attn, padded, share):
    row = hf_zoo.check(name, attn, padded)
    assert row["status"] == "pass", f"{name} ({attn}): {row['reason']}: {row['why']}"
    assert not row["opaque"], f"{name}: opaque submodules {row['opaque']}"
    assert row["hat_parameter_share"] >= share, f"{name}: only {row['hat_parameter_share']:.0%} under HAT"


def _bert():
    _, model_type, auto_class, kwargs, kind = next(e for e in hf_zoo.ZOO if e[0] == "bert")
    model = hf_zoo.build(model_type, auto_class, kwargs, "sdpa")
    return model, hf_zoo.inputs_for(model, kind, padded=True), (model_type, auto_class, kwargs)


def test_output_is_the_model_output_class_and_save_load_keeps_it():
    model, batch, (model_type, auto_class, kwargs) = _bert()
    hat = hatify.hatify(model, 2, example_inputs=batch)
    out = hat(**batch, task_id=0)
    assert type(out) is type(model(**batch)) and out.logits.shape == (2, hf_zoo.NUM_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.hat"
        hatify.save(hat, path)
        again = hatify.load(path, model=hf_zoo.build(model_type, auto_class, kwargs, "sdpa"))
        assert torch.equal(again(**batch, task_id=0).logits, out.logits)
        assert type(hat.extract(0)(**batch)) is type(out)


def test_a_kv_cache_output_is_refused_with_the_fix():
    config = transformers.AutoConfig.for_model("gpt2", **hf_zoo.SMALL)  # use_cache left on
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    batch = hf_zoo.inputs_for(model, "text", padded=False)
    with pytest.raises(hatify.HatifyError, match="use_cache=False"):
        hatify.hatify(model, 2, example_inputs=batch)
    hat = hatify.hatify(model, 2, example_inputs={**batch, "use_cache": False})
    assert hat(**batch, task_id=1).logits.shape == (2, hf_zoo.SEQ, hf_zoo.SMALL["vocab_size"])


def test_cli_converts_an_hf_directory_and_load_rebuilds_it_from_the_recipe(tmp_path, monkeypatch):
    from hatify.cli import main

    monkeypatch.chdir(tmp_path)
    model, batch, _ = _bert()
    model.save_pretrained(tmp_path / "my-bert")
    args = ["convert", "hf:./my-bert", "--hf-class", "AutoModelForSequenceClassification", "-o", "bert.hat",
            "--num-tasks", "2"]
    assert main(args) == 0
    hat = hatify.load(tmp_path / "bert.hat")  # no model=: the recipe holds the config
    batch = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}  # as BERT's tokenizer returns it
    with hatify.masks_open(hat):
        torch.testing.assert_close(hat(**batch, task_id=0).logits, model(**batch).logits)
    meta = hatify.io.read_metadata(tmp_path / "bert.hat")
    assert meta["source"]["kind"] == "hf"
    assert set(meta["example_keyword_inputs"]) == {"input_ids", "token_type_ids", "attention_mask"}


def test_cli_hf_model_type_with_named_input_shapes(tmp_path, monkeypatch):
    from hatify.cli import main

    monkeypatch.chdir(tmp_path)
    source = "hf:gpt2,n_embd=32,n_layer=1,n_head=2,vocab_size=50"
    assert main(["convert", source, "--hf-class", "AutoModelForCausalLM", "-o", "gpt2.hat", "--num-tasks", "2",
                 "--input-shape", "input_ids=2,8:int64"]) == 0
    meta = hatify.io.read_metadata(tmp_path / "gpt2.hat")
    assert meta["example_keyword_inputs"] == {"input_ids": {"shape": [2, 8], "dtype": "int64"}}
    assert meta["example_constants"] == {"use_cache": False}
    hat = hatify.load(tmp_path / "gpt2.hat")
    ids = torch.randint(0, 50, (3, 8))
    assert hat(input_ids=ids, task_id=1).logits.shape == (3, 8, 50)
    assert main(["convert", "hf:./missing-dir", "-o", "x.hat", "--num-tasks", "2"]) == 2
    assert main(["convert", "timm:resnet18", "--hf-class", "AutoModel", "-o", "x.hat", "--num-tasks", "2"]) == 2


@pytest.mark.parametrize("model_type,expected", [
    ("bert", ["input_ids", "token_type_ids", "attention_mask"]),   # BertTokenizer returns token types
    ("roberta", ["input_ids", "attention_mask"]),                  # the forward takes them, the tokenizer returns none
    ("distilbert", ["input_ids", "attention_mask"]),               # the forward does not take them
])
def test_hf_model_type_example_inputs_are_what_its_tokenizer_returns(model_type, expected):
    from hatify.hf_source import example_inputs, load

    model, _ = load(model_type, {"num_hidden_layers": 1} if model_type != "distilbert" else {"n_layers": 1}, None)
    assert [k for k in example_inputs(model).kwargs if k != "use_cache"] == expected


def test_hf_unknown_model_types_and_hub_names_get_one_short_line():
    from hatify.hf_source import load

    for target, hint in [("bertt", "(did you mean hf:bert, "), ("bert-base-uncased", "(did you mean hf:bert?)"),
                         ("google/vit-base-patch16-224", "no such directory (did you mean hf:vit?)")]:
        with pytest.raises(hatify.HatifyError) as caught:
            load(target, {}, None)
        message = str(caught.value)
        assert hint in message and "hub names are not downloaded" in message and "save_pretrained" in message
        assert len(message) < 300 and "\n" not in message, message
def _seq2seq(name):
    _, model_type, auto_class, kwargs, kind = next(e for e in hf_zoo.ZOO if e[0] == name)
    model = hf_zoo.build(model_type, auto_class, kwargs, "eager")
    return model, hf_zoo.inputs_for(model, kind, padded=True)


def test_an_auxiliary_output_makes_no_heads_and_stays_bit_identical():
    """mBART returns `encoder_last_hidden_state` next to `logits`: the encoder's residual writers are HAT layers,
    and so is the LM head, tied to the shared embedding (one layer, `flow.ties`: no head at all), and after task 1
    trains on both outputs, task 0's logits AND its encoder state are bit-identical (the auxiliary output is gated,
    not unprotected)."""
    model, batch = _seq2seq("mbart")
    hat = hatify.hatify(model, 2, example_inputs=batch)
    roles = {layer.name: layer.role for layer in hat.plan.layers}
    assert "lm_head" not in roles and [name for name, role in roles.items() if role == "head"] == []
    assert any(site.tied for site in hat.plan.layer("model.shared").sites)
    assert roles["model.encoder.layers.0.fc2"] == roles["model.encoder.layers.0.self_attn.out_proj"] == "masked"
    assert hat.report.validation["passed"] and hat.report.summary["hat_parameter_share"] > 0.95
    after, again, other = two_tasks(
        hat, lambda t, scale: hat(**batch, task_id=t, mask_scale=scale),
        lambda out: out.logits.square().mean() + out.encoder_last_hidden_state.square().mean(), 4,
        torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01))
    assert torch.equal(again.logits, after.logits)
    assert torch.equal(again.encoder_last_hidden_state, after.encoder_last_hidden_state)
    assert not torch.equal(other.encoder_last_hidden_state, after.encoder_last_hidden_state)


def test_task_outputs_name_the_outputs_heads_reach():
    """`task_outputs="all"` gives every returned tensor heads (the encoder's residual writers, and the shared
    embedding with its tied LM head: one copy per task of the tied weight); a name the model does not return is
    refused with the outputs it has."""
    model, batch = _seq2seq("mbart")
    plan = hatify.explain(model, 2, batch, hatify.HATConfig(task_outputs="all"))
    heads = {layer.name for layer in plan.layers if layer.role == "head"}
    assert {"model.shared", "model.encoder.layers.0.fc2"} <= heads
    plan = hatify.explain(model, 2, batch, hatify.HATConfig(task_outputs=("encoder_last_hidden_state",)))
    heads = {layer.name for layer in plan.layers if layer.role == "head"}
    assert "model.encoder.layers.0.fc2" in heads and "model.decoder.layers.0.fc2" not in heads
    with pytest.raises(hatify.HatifyError, match="task_outputs names hidden.*its outputs: logits, encoder_last"):
        hatify.explain(model, 2, batch, hatify.HATConfig(task_outputs=("hidden",)))


def test_bart_classifier_converts_as_it_is_and_keeps_its_own_checks():
    """BartForSequenceClassification checks its eos tokens with `torch_compilable_check` on traced values and
    selects the eos rows with a boolean mask: it converts as it is, and the checks stay run-time checks."""
    _, model_type, auto_class, kwargs, kind = next(e for e in hf_zoo.ZOO if e[0] == "bart-cls")
    model = hf_zoo.build(model_type, auto_class, kwargs, "eager")
    batch = hf_zoo.inputs_for(model, kind, padded=False)
    hat = hatify.hatify(model, 2, example_inputs=batch)
    assert not hat.plan.opaque and hat.report.summary["hat_parameter_share"] > 0.95
    uneven = dict(batch, input_ids=batch["input_ids"].clone())
    uneven["input_ids"][0, 3] = model.config.eos_token_id   # row 0 has two eos tokens, row 1 one
    with pytest.raises(Exception, match="same number of <eos> tokens"):
        model(**uneven)
    with pytest.raises(AssertionError, match="same number of <eos> tokens"):
        hat(**uneven, task_id=0)
    with pytest.raises(AssertionError, match="same number of <eos> tokens"):
        hat.extract(0)(**uneven)
    with torch.no_grad():
        assert torch.equal(hat.extract(0)(**batch).logits, hat.eval()(**batch, task_id=0).logits)
    with pytest.raises(hatify.HatifyError, match="example inputs fail the model's own check: All examples"):
        hatify.hatify(model, 2, example_inputs=uneven)


def test_task_outputs_survive_save_load_and_the_command_line_setting(tmp_path):
    from hatify.sources import config_with

    assert config_with(["task_outputs=logits,loss"]).task_outputs == ("logits", "loss")
    assert config_with(["task_outputs=all"]).task_outputs == "all"
    model, batch = _seq2seq("mbart")
    hat = hatify.hatify(model, 2, example_inputs=batch, config=hatify.HATConfig(task_outputs=("logits",)))
    hatify.save(hat, tmp_path / "mbart.hat")
    again = hatify.load(tmp_path / "mbart.hat", model=_seq2seq("mbart")[0])
    assert again.plan.config.task_outputs == ("logits",)
    assert [layer.role for layer in again.plan.layers] == [layer.role for layer in hat.plan.layers]
    with torch.no_grad():
        assert torch.equal(again(**batch, task_id=1).logits, hat.eval()(**batch, task_id=1).logits)


@pytest.mark.parametrize("name", ["hubert", "wavlm"])
def test_positional_conv_under_weight_norm_is_a_hat_layer_and_keeps_task0(name, tmp_path):
    """HuBERT/WavLM's positional conv is a grouped Conv1d under weight_norm over its kernel axis (dim=2): a HAT layer
    whose norm each task holds (`parametrized.HeldNorm`); called with a keyword batch, task 0's logits stay
    bit-identical after task 1, and save/load keeps both tasks."""
    _, model_type, auto_class, kwargs, kind = next(e for e in hf_zoo.ZOO if e[0] == name)
    build = lambda: hf_zoo.build(model_type, auto_class, kwargs, "eager")
    model = build()
    batch = hf_zoo.inputs_for(model, kind, padded=False)
    hat = hatify.hatify(model, 2, example_inputs=batch)
    roles = {layer.name: layer.role for layer in hat.plan.layers}
    assert roles[f"{name}.encoder.pos_conv_embed.conv"] == "masked"
    assert hat.report.validation["passed"] and hat.report.summary["hat_parameter_share"] > 0.95
    labels = torch.tensor([0, 1])
    after, again, other = (out.logits for out in two_tasks(
        hat, lambda t, scale: hat(**batch, task_id=t, mask_scale=scale),
        lambda out: torch.nn.functional.cross_entropy(out.logits, labels), 4,
        torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)))
    assert torch.equal(again, after) and not torch.equal(other, after)
    hatify.save(hat, tmp_path / f"{name}.hat")
    loaded = hatify.load(tmp_path / f"{name}.hat", model=build())
    with torch.no_grad():
        assert torch.equal(loaded(**batch, task_id=0).logits, again)
        assert torch.equal(loaded(**batch, task_id=1).logits, other)
