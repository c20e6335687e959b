"""Task inference (class-incremental use): statistics recorded at end_task(data=...), infer_task and
task_id="infer" on a hand-written MLP, a timm model and a transformers model with keyword inputs; the
statistics travel with state_dict / hatify.save, forget_task drops them, task outputs never change."""
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatify
from hatify import HatifyError
from hatify.batches import iterate_batches
from hatify.taskinf import DEFAULT_METHOD, SCORES, TaskPrediction

CENTRES = [torch.tensor([3.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -3.0, 0.0]), torch.tensor([0.0, 3.0, 0, 3])]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def task_data(t: int, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t: a cloud around its own centre, class = sign of a task-specific coordinate."""
    gen = torch.Generator().manual_seed(100 * t + seed)
    x = CENTRES[t] + torch.randn(n, 4, generator=gen)
    return x, (x[:, (t + 1) % 4] > CENTRES[t][(t + 1) % 4]).long()


def train_task(hat, t: int, steps: int = 60) -> None:
    x, y = task_data(t)
    opt = torch.optim.Adam([p for p in hat.parameters() if p.requires_grad], lr=0.02)
    hat.train()
    hat.begin_task(t)
    for b in range(steps):
        loss = F.cross_entropy(hat(x, task_id=t, mask_scale=hat.mask_scale(b, steps)), y) + hat.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()


def batches(t: int) -> list:
    x, y = task_data(t)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    hat = hatify.hatify(mlp(), 4, example_inputs=(torch.randn(2, 4),))
    for t in range(3):
        train_task(hat, t)
        hat.end_task(data=batches(t), keep=4)
    return hat.eval()


def test_infer_task_predicts_the_task_and_returns_that_tasks_outputs(trained):
    hat = trained
    tests = [task_data(t, 40, seed=1) for t in range(3)]
    x = torch.cat([d[0] for d in tests])
    owner = torch.arange(3).repeat_interleave(40)
    pred = hat.infer_task(x)
    assert isinstance(pred, TaskPrediction) and pred.tasks == [0, 1, 2]
    assert pred.task.shape == (120,) and pred.classes.shape == (120,) and pred.probs.shape == (120, 3)
    assert torch.allclose(pred.probs.sum(1), torch.ones(120))
    assert pred.class_probs.shape == (120, 6) and torch.allclose(pred.class_probs.sum(1), torch.ones(120))
    blocks = pred.class_probs.view(120, 3, 2)
    assert torch.allclose(blocks.sum(2), pred.probs)   # P(task | x) is the sum over its classes
    assert torch.equal(blocks[torch.arange(120), pred.task].argmax(1), pred.classes)
    assert float((pred.task == owner).float().mean()) > 0.9   # the clouds are far apart
    per_sample = torch.stack([hat(x[i:i + 1], task_id=int(pred.task[i]))[0] for i in range(len(x))])
    assert torch.allclose(pred.outputs, per_sample, atol=1e-6)
    assert torch.equal(pred.classes, pred.outputs.argmax(1))
    assert torch.equal(hat(x, task_id="infer"), pred.outputs)
    for name in SCORES:  # every score runs and gives a task per sample
        assert hat.infer_task(x, method=name).task.shape == (120,)


def test_all_tasks_run_as_one_batch_that_equals_per_task_forwards(trained):
    from hatify.taskinf.forward import run_tasks

    x = torch.randn(7, 4)
    run = run_tasks(trained, (x,), {}, [0, 1, 2])
    for i in range(3):
        assert torch.equal(run.logits[i], trained(x, task_id=i))
    assert run.features.shape == (3, 7, 32)


def test_task_outputs_are_bit_identical_before_and_after_observe():
    hat = hatify.hatify(mlp(), 2, example_inputs=(torch.randn(2, 4),))
    train_task(hat, 0, steps=10)
    hat.end_task()
    x = torch.randn(9, 4)
    hat.eval()
    before = hat(x, task_id=0)
    state = {k: v.clone() for k, v in hat.state_dict().items()}
    hat.train()
    hat.observe(0, batches(0), keep=3)
    assert hat.training   # the mode is restored
    hat.eval()
    assert torch.equal(hat(x, task_id=0), before)
    assert all(torch.equal(v, hat.state_dict()[k]) for k, v in state.items())
    assert hat.task_stats.get(0, "buffer_labels").bincount().tolist() == [3, 3]


def test_statistics_round_trip_through_save_and_load_and_forget_task_drops_them(trained):
    x = torch.randn(11, 4) * 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.hat"
        hatify.save(trained, path)
        again = hatify.load(path, model=mlp())
    assert again.task_stats.tasks() == [0, 1, 2]
    for name in ("max_logit", DEFAULT_METHOD, "knn"):
        a, b = trained.infer_task(x, method=name), again.infer_task(x, method=name)
        assert torch.equal(a.task, b.task) and torch.allclose(a.probs, b.probs)
    again.forget_task(1)
    assert again.task_stats.tasks() == [0, 2]
    assert not any(name.startswith("t1_") for name in again.task_stats.state_dict())
    assert set(again.infer_task(x).task.tolist()) <= {0, 2}
    assert trained.task_stats.tasks() == [0, 1, 2]


def test_bad_inputs_are_one_line_errors(trained):
    fresh = hatify.hatify(mlp(), 2, example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    with pytest.raises(HatifyError, match="observed tasks"):
        fresh.infer_task(x)
    with pytest.raises(HatifyError, match="not a finished task"):
        fresh.observe(0, batches(0))
    with pytest.raises(HatifyError, match="unknown task-inference method"):
        trained.infer_task(x, method="entropy-ish")
    with pytest.raises(HatifyError, match="only task name"):
        trained(x, task_id="guess")
    with pytest.raises(HatifyError, match="no mask_scale"):
        trained(x, task_id="infer", mask_scale=4.0)
    with pytest.raises(HatifyError, match="no such field"):
        trained.infer_task(x, logits="scores")
    with pytest.raises(HatifyError, match="keep must be"):
        trained.observe(0, batches(0), keep=-1)
    with pytest.raises(HatifyError, match="within-task classes"):
        trained.observe(0, [(x, torch.tensor([0, 5, 1]))])
    with pytest.raises(HatifyError, match="iterable of batches"):
        trained.observe(0, torch.randn(4, 4))
    with pytest.raises(HatifyError, match=r"\(inputs, labels\)"):
        list(iterate_batches([x]))
    hat = hatify.hatify(mlp(), 2, example_inputs=(torch.randn(2, 4),))
    train_task(hat, 0, steps=2)
    with pytest.raises(HatifyError, match="give data="):
        hat.end_task(keep=3)
    assert hat.current_task == 0   # refused before anything was frozen
    hat.end_task(data=batches(0))
    with pytest.raises(HatifyError, match="keep=n"):
        hat.infer_task(x, method="knn")
    assert trained.task_stats.tasks() == [0, 1, 2]


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.body(x).relu()
        return {"features": h, "scores": self.head(h)}


def test_the_logits_output_is_named_when_it_is_not_the_tensor_or_a_logits_field():
    hat = hatify.hatify(TwoOutputs(), 2, example_inputs=(torch.randn(2, 4),))
    train_task_dict = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    hat.begin_task(0)
    with pytest.warns(hatify.HatifyWarning, match="logits="):  # the task ends; no statistics without the name
        hat.end_task(data=train_task_dict)
    assert hat.trained_tasks == [0]
    with pytest.raises(HatifyError, match="logits="):
        hat.observe(0, train_task_dict)
    hat.observe(0, train_task_dict, logits="scores")
    pred = hat.infer_task(torch.randn(5, 4), logits="scores", method="max_logit")
    assert set(pred.outputs) == {"features", "scores"} and pred.outputs["scores"].shape == (5, 2)


def test_torchvision_model_with_batchnorm():
    """torchvision's mobilenet_v3_small (BatchNorm, in-place hardswish): end_task(data) re-estimates the task's
    statistics and records the task-inference ones; the inferred outputs are the chosen task's."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=2)
    hat = hatify.hatify(model, 2, example_inputs=(torch.randn(2, 3, 32, 32),))
    data = [[(torch.randn(6, 3, 32, 32) + 2 * t, torch.tensor([0, 1] * 3))] for t in range(2)]
    for t in range(2):
        hat.train()
        hat.begin_task(t)
        hat(data[t][0][0], task_id=t, mask_scale=hat.mask_scale(0, 1))
        hat.end_task(data=data[t])
    hat.eval()
    x = torch.cat([data[0][0][0][:3], data[1][0][0][:3]])
    pred = hat.infer_task(x)
    assert pred.probs.shape == (6, 2) and torch.allclose(pred.probs.sum(1), torch.ones(6))
    with torch.no_grad():
        for i in range(6):
            torch.testing.assert_close(pred.outputs[i], hat(x[i:i + 1], task_id=int(pred.task[i]))[0],
                                       rtol=1e-5, atol=1e-5)


def test_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", num_classes=2)
    x = torch.randn(2, 3, 32, 32)
    hat = hatify.hatify(model, 2, example_inputs=(x,))
    data = [(torch.randn(6, 3, 32, 32) + t, torch.tensor([0, 1] * 3)) for t in range(2)]
    for t in range(2):
        hat.begin_task(t)
        hat.end_task(data=[data[t]])
    hat.eval()
    pred = hat.infer_task(data[0][0])
    assert pred.probs.shape == (6, 2)
    for i in range(6):
        assert torch.allclose(pred.outputs[i], hat(data[0][0][i:i + 1], task_id=int(pred.task[i]))[0], atol=1e-5)


def test_transformers_model_with_keyword_inputs_and_a_logits_field():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 40, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    hat = hatify.hatify(model, 2, example_inputs=batch)
    for t in range(2):
        hat.begin_task(t)
        hat.end_task(data=[{**batch, "labels": torch.tensor([0, 1, 0, 1])}], keep=1)
    pred = hat.infer_task(**batch)
    assert type(pred.outputs) is type(model(**batch)) and pred.outputs.logits.shape == (4, 2)
    assert torch.equal(hat(**batch, task_id="infer").logits, pred.outputs.logits)
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        assert torch.allclose(pred.outputs.logits[i], hat(**one, task_id=int(pred.task[i])).logits[0], atol=1e-5)
    assert hat.task_stats.buffer(1)[1].keys() == {"input_ids", "attention_mask"}
    hat.infer_task(**batch, method="knn")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_per_sample_path_runs_a_mixed_batch_in_one_pass_with_each_row_under_its_own_masks(kind):
    from hatify import per_sample

    if kind == "mlp":
        model, x = mlp(), torch.randn(9, 4)
    else:
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 16, 3))
        x = torch.randn(9, 1, 4, 4)
    hat = hatify.hatify(model, 3, example_inputs=(x[:2],))
    for t in range(3):
        hat.begin_task(t)
        with torch.no_grad():
            hat.masks.embedding(t).copy_(torch.randn(hat.masks.units))   # distinct masks per task
        hat.end_task()
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1])
    calls = []
    hat.net.get_submodule("0").register_forward_hook(lambda *a: calls.append(1))
    hat.eval()
    with torch.no_grad():
        one_pass = per_sample.run(hat.net, (x,), {}, ids)
        assert len(calls) == 1   # one pass for three tasks
        for t in range(3):
            assert torch.allclose(one_pass[ids == t], hat(x[ids == t], task_id=t), atol=1e-6)
        calls.clear()
        assert torch.allclose(hat(x, task_id=ids), one_pass, atol=1e-6)
        assert len(calls) == 3   # on the CPU a mixed batch runs each task's rows together (measured faster)


def test_the_per_sample_path_refuses_what_it_cannot_batch():
    from hatify import per_sample

    class SequenceFirst(nn.Module):   # (length, batch, features): the batch is not the first axis
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.proj(x.transpose(0, 1)).mean(0))

    hat = hatify.hatify(SequenceFirst(), 2, example_inputs=(torch.randn(2, 5, 4),)).eval()
    with pytest.raises(per_sample.Unsupported, match="first axis"):
        per_sample.run(hat.net, (torch.randn(3, 5, 4),), {}, torch.tensor([0, 1, 0]))
