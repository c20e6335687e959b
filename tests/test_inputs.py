"""Keyword inputs and models as they are written: a model called with keyword inputs converts and is called the
same way, with its output structure; the tracing mechanisms transformers models need (decorated forwards,
traced dtypes and sizes, modules made in forward, weights stored (in, out), unused parameter reads,
attributes set while tracing) work on plain torch models."""
import functools
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify


class Out(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


def keep_signature(fn):
    @functools.wraps(fn)  # like transformers' decorators: the wrapper takes *args, **kwargs
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    return wrapper


class Tagger(nn.Module):
    """Keyword inputs, a padding mask with finfo(dtype).min, positions sliced from a buffer by a traced length,
    torch.tensor of a traced int, torch._check on a traced value, an activation made inside forward."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(32, dim)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    @keep_signature
    def forward(self, input_ids, attention_mask=None, return_hidden: bool = True, **kwargs):
        batch, length = input_ids.shape
        torch._check(length <= self.position_ids.shape[1])
        h = self.embed(input_ids) + self.pos(self.position_ids[:, :length])
        scores = h @ h.transpose(1, 2) / torch.tensor(length).float().sqrt()
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        h = torch.softmax(scores, -1) @ h
        h = nn.GELU()(self.mix(h))
        logits = self.head(h.mean(1))
        return Out(logits, h) if return_hidden else {"logits": logits}


def _batch(n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": torch.randint(0, 20, (n, 6), generator=gen), "attention_mask": mask}


def test_keyword_inputs_convert_and_call_like_the_original():
    model, batch = Tagger().eval(), _batch()
    hat = hatify.hatify(model, num_tasks=3, example_inputs=batch)
    assert not hat.plan.opaque and {"embed", "pos"} <= {layer.name for layer in hat.plan.masked_layers}
    assert hatify.validate(model, hat, batch).passed
    out = hat(**batch, task_id=1)
    assert type(out) is Out
    with hatify.masks_open(hat):
        torch.testing.assert_close(hat(**batch, task_id=0).logits, model(**batch).logits)
    # positional and keyword inputs mixed, as the original takes them
    both = hatify.hatify(model, 3, example_inputs=((batch["input_ids"],), {"attention_mask": batch["attention_mask"]}))
    assert type(both(batch["input_ids"], attention_mask=batch["attention_mask"], task_id=0)) is Out
    # a different length still runs: the slice and the scale follow the traced length
    short = {k: v[:, :5] for k, v in batch.items()}
    assert hat(**short, task_id=0).logits.shape == (4, 3)


def test_constant_keyword_inputs_are_fixed_and_checked():
    model, batch = Tagger().eval(), _batch()
    hat = hatify.hatify(model, 2, example_inputs={**batch, "return_hidden": False})
    assert set(hat(**batch, task_id=0)) == {"logits"}
    assert set(hat(**batch, return_hidden=False, task_id=0)) == {"logits"}
    with pytest.raises(hatify.HatifyError, match="return_hidden"):
        hat(**batch, return_hidden=True, task_id=0)
    with pytest.raises(hatify.HatifyError, match="unexpected keyword input 'token_type_ids'"):
        hat(**batch, token_type_ids=batch["input_ids"], task_id=0)
    with pytest.raises(hatify.HatifyError, match="missing input 'attention_mask'"):
        hat(input_ids=batch["input_ids"], task_id=0)


def test_keyword_model_trains_mixed_batches_saves_and_extracts():
    model, batch = Tagger().eval(), _batch()
    hat = hatify.hatify(model, 3, example_inputs=batch)
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01)
    y = torch.tensor([0, 1, 2, 0])
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(3):
            loss = F.cross_entropy(hat(**batch, task_id=t, mask_scale=hat.mask_scale(b, 3)).logits, y)
            opt.zero_grad()
            (loss + hat.regularization()).backward()
            opt.step()
        hat.end_task()
        if t == 0:
            hat.eval()
            after0 = hat(**batch, task_id=0)
    hat.eval()
    assert torch.equal(hat(**batch, task_id=0).logits, after0.logits)
    ids = torch.tensor([0, 1, 1, 0])
    mixed = hat(**batch, task_id=ids)
    assert type(mixed) is Out
    for t in (0, 1):
        torch.testing.assert_close(mixed.logits[ids == t], hat(**batch, task_id=t).logits[ids == t])
    task1 = hat.extract(1)
    out = task1(**batch)
    assert type(out) is Out and torch.allclose(out.logits, hat(**batch, task_id=1).logits, atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tagger.hat"
        hatify.save(hat, path)
        meta = hatify.io.read_metadata(path)
        assert set(meta["example_keyword_inputs"]) == {"input_ids", "attention_mask"}
        again = hatify.load(path, model=Tagger())
        assert torch.equal(again(**batch, task_id=0).logits, hat(**batch, task_id=0).logits)


class TransposedLinear(nn.Module):
    """A linear layer stored (in, out) and applied with addmm (GPT-2's Conv1D), or with matmul."""

    def __init__(self, n_in: int, n_out: int, op: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.op = op

    def forward(self, x):
        if self.op == "addmm":
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        return x @ self.weight + self.bias


class StoredInOut(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.a, self.b = TransposedLinear(8, 16, op), TransposedLinear(16, 16, op)
        self.out = nn.Linear(16, 2)
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        h = F.relu(self.a(x))
        if isinstance(self.unused.weight, torch.Tensor):  # a read the trace leaves unused
            h = h.to(self.unused.weight.dtype)
        return self.out(F.relu(self.b(h)))


@pytest.mark.parametrize("op", ["addmm", "matmul"])
def test_weights_stored_in_out_are_hat_layers_and_protected(op):
    model, x = StoredInOut(op).eval(), torch.randn(4, 3, 8)
    hat = hatify.hatify(model, 2, example_inputs=(x,))
    kinds = {layer.name: (layer.kind, layer.role) for layer in hat.plan.layers}
    assert kinds["a"] == ("linear_t", "masked") and kinds["b"] == ("linear_t", "masked")
    assert not hat.plan.params, "no parameter may fall back to per-task copies"
    assert hatify.validate(model, hat, (x,)).passed
    opt = torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.1)
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(4):
            loss = hat(x, task_id=t, mask_scale=hat.mask_scale(b, 4)).square().mean() + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        if t == 0:
            hat.eval()
            after0 = hat(x, task_id=0)
    hat.eval()
    assert torch.equal(hat(x, task_id=0), after0)


class Anchors(nn.Module):
    """Sets an attribute to traced values, then fails: the module becomes opaque and its attribute is back."""

    def __init__(self) -> None:
        super().__init__()
        self.cells = [torch.ones(2)]

    def forward(self, x):
        self.cells = [c.to(x.device) for c in self.cells]
        if x.sum() > 0:  # a branch on tensor data: untraceable
            return x * self.cells[0].sum()
        return x


class WithAnchors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.anchors = Anchors()

    def forward(self, x):
        return self.anchors(self.fc(x))


def test_attributes_set_to_traced_values_are_restored_after_a_failed_subtrace():
    model, x = WithAnchors().eval(), torch.randn(2, 4)
    hat = hatify.hatify(model, 2, example_inputs=(x,))
    assert "anchors" in hat.plan.opaque
    assert all(isinstance(c, torch.Tensor) for c in hat.net.anchors.cells)
    with hatify.masks_open(hat):
        torch.testing.assert_close(hat(x, task_id=0), WithAnchors.forward(model, x))


def test_bad_keyword_example_inputs_are_refused():
    with pytest.raises(hatify.HatifyError, match="identifier"):
        hatify.hatify(Tagger(), 2, example_inputs={"input ids": torch.zeros(2, 6, dtype=torch.long)})
    with pytest.raises(hatify.HatifyError, match="example_inputs must be"):
        hatify.hatify(Tagger(), 2, example_inputs="input_ids")


def test_example_inputs_of_the_wrong_shape_give_one_line_naming_op_shapes_and_fix():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for x, expected in [(torch.randn(2, 3, 9, 9), "Linear(in_features=144, out_features=2, bias=True) on inputs "
                                                  "float32[2, 196] failed: RuntimeError: mat1 and mat2"),
                        (torch.randn(2, 1, 8, 8), "Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1)) on inputs "
                                                  "float32[2, 1, 8, 8] failed")]:
        with pytest.raises(hatify.HatifyError) as caught:
            hatify.hatify(net, 2, example_inputs=(x,))
        message = str(caught.value)
        assert len(message.splitlines()) == 1 and len(message) < 400, message
        assert expected in message and "check that example_inputs have the shapes" in message
