"""Tied embedding and LM head (GPT-2, BERT's MLM, T5, mBART): one HAT layer for both reads of the tied weight
(`flow.ties`), not a per-task copy of the head. A finished task's hidden columns are frozen for every token row:
those its embedding units used and those the head's input used; old tasks stay bit-identical, the tie is kept."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify

VOCAB, HIDDEN = 20, 16


class TiedModule(nn.Module):
    """The head is a Linear module holding the embedding's parameter (`head.weight = emb.weight`)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + F.relu(self.fc(h)))


class TiedRead(TiedModule):
    """The head reads the embedding's weight by name (`F.linear(h, self.emb.weight)`), with a bias of its own."""

    def forward(self, ids):
        h = self.emb(ids)
        return F.linear(h + F.relu(self.fc(h)), self.emb.weight, self.head.bias)


def _train(hat, ids, steps=6):
    """Tasks 0 and 1 with one AdamW; task 0's logits right after it and at the end, task 1's at the end, and the
    tied weight at the end of task 0."""
    opt = torch.optim.AdamW(hat.parameters(), lr=3e-2, weight_decay=0.1)
    target = torch.roll(ids, 1, dims=1)
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        for b in range(steps):
            logits = hat(ids, task_id=t, mask_scale=hat.mask_scale(b, steps))
            loss = F.cross_entropy(logits.transpose(1, 2), (target + t) % VOCAB) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()
        hat.eval()
        if t == 0:
            with torch.no_grad():
                after, weight = hat(ids, task_id=0), hat.net.emb.weight.detach().clone()
    with torch.no_grad():
        return after, hat(ids, task_id=0), hat(ids, task_id=1), weight


def _build(kind):
    torch.manual_seed(0)
    return kind()


@pytest.mark.parametrize("kind", [TiedModule, TiedRead])
def test_tied_embedding_and_head_are_one_hat_layer_and_old_tasks_stay_bit_identical(kind, tmp_path):
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(0))
    hat = hatify.hatify(_build(kind), 2, example_inputs=(ids,))
    assert {layer.name: layer.role for layer in hat.plan.layers} == {"emb": "masked", "fc": "masked"}
    tied = hat.plan.layer("emb")
    assert [site.tied for site in tied.sites] == [False, True] and tied.input_units == HIDDEN
    assert tied.input_producers == ["emb", "fc"] and hat.report.validation["passed"]
    assert {p.name: p.policy for p in hat.plan.params} == {"head.bias": "per_task"}
    after, again, other, weight = _train(hat, ids)
    assert torch.equal(after, again) and not torch.equal(after, other)
    moved = hat.net.emb.weight.detach() != weight
    assert moved.any() and not moved.all()  # task 1 trained the free columns, for every token alike
    assert torch.equal(moved.all(0), moved.any(0))
    if kind is TiedModule:  # still tied (TiedRead's graph reads one name, so never had two)
        assert hat.net.head.weight is hat.net.emb.parametrizations.weight.original
    hatify.save(hat, tmp_path / "tied.hat")
    loaded = hatify.load(tmp_path / "tied.hat", model=_build(kind))
    with torch.no_grad():
        assert torch.equal(loaded(ids, task_id=0), again) and torch.equal(loaded(ids, task_id=1), other)


def test_the_head_inputs_columns_are_what_keeps_task_0(monkeypatch):
    """Protecting only the embedding's own used columns is not enough: the head also reads the columns the other
    residual writer (fc) used, which task 1 would then move."""
    from hatify import model as hat_model

    protection = hat_model.weight_protection
    monkeypatch.setattr(hat_model, "weight_protection", lambda layer, out, inp, shape: protection(
        layer, out, None if layer.kind == "embedding" else inp, shape))
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(0))
    after, again, _, _ = _train(hatify.hatify(_build(TiedModule), 2, example_inputs=(ids,)), ids)
    assert not torch.equal(after, again)
