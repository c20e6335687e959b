"""HF `Trainer` integration with the real package: 5 tasks of split digits, one `Trainer.train()` per task."""
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

import hatify  # noqa: E402
from hatify.integrations.transformers import HATTaskModel, HATTrainerCallback  # noqa: E402
from hatify.metrics import summarize  # noqa: E402
from test_split_digits import split_digits  # noqa: E402


class DigitsNet(nn.Module):
    """A model called with keyword inputs, as HF models are: `net(pixels=..., mask=...)`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 2)

    def forward(self, pixels, scale):
        return self.head(self.body(pixels * scale))


class Digits(Dataset):
    """Dict samples with an extra key the model does not take (the Trainer must drop it)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "scale": torch.ones(1), "labels": self.y[i], "sample_id": i}


def new_hat():
    torch.manual_seed(0)
    # traced from positional examples; the converted model takes the same inputs by name (hat(pixels=..., ...))
    return hatify.hatify(DigitsNet(), num_tasks=5, example_inputs=(torch.zeros(2, 64), torch.ones(2, 1)))


def args(tmp_path, batch=32, accumulate=1, epochs=8):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             per_device_eval_batch_size=256, gradient_accumulation_steps=accumulate,
                             num_train_epochs=epochs, learning_rate=1e-2, weight_decay=0.01,
                             lr_scheduler_type="constant", use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)


def accuracy(trainer, data):
    prediction = trainer.predict(data)
    return float((torch.tensor(prediction.predictions).argmax(1) == data.y).float().mean())


def test_hf_trainer_split_digits_acc_and_bit_identical(tmp_path):
    tasks = split_digits()
    hat = new_hat()
    probe = {"pixels": tasks[0][1][0][:32], "scale": torch.ones(32, 1)}
    finished, acc = {}, []
    for t, ((xtr, ytr), _) in enumerate(tasks):
        trainer = Trainer(model=HATTaskModel(hat, task_id=t), args=args(tmp_path), train_dataset=Digits(xtr, ytr),
                          callbacks=[HATTrainerCallback()])
        trainer.train()
        assert hat.trained_tasks == list(range(t + 1)) and hat.current_task is None
        hat.eval()
        with torch.no_grad():
            for j, out in finished.items():
                assert torch.equal(hat(**probe, task_id=j), out), f"task {j} changed while training task {t}"
            finished[t] = hat(**probe, task_id=t)
        acc.append([accuracy(Trainer(model=HATTaskModel(hat, task_id=j), args=args(tmp_path)), Digits(xte, yte))
                    for j, (_, (xte, yte)) in enumerate(tasks)])
    metrics = summarize(acc)
    print("accuracy matrix", acc, metrics)
    assert metrics["bwt"] == 0.0
    assert metrics["acc"] > 0.9


class RecordScales(HATTaskModel):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.scales = []

    def forward(self, *inputs, **kw_inputs):
        if self.training:
            self.scales.append(self.mask_scale)
        return super().forward(*inputs, **kw_inputs)


def test_gradient_accumulation_follows_the_optimizer_step(tmp_path):
    """Batch 32 in one step and batch 16 accumulated over two steps: the same mask scales per optimizer step
    and, up to float rounding, the same trained model (loss and regulariser averaged over the micro-batches)."""
    (xtr, ytr), _ = split_digits()[0]
    xtr, ytr = xtr[:224], ytr[:224]   # 7 full steps of 32: no short last step
    trained = []
    for batch, accumulate in ((32, 1), (16, 2)):
        hat = new_hat()
        task = RecordScales(hat, task_id=0)
        Trainer(model=task, args=args(tmp_path, batch, accumulate, epochs=2), train_dataset=Digits(xtr, ytr),
                callbacks=[HATTrainerCallback()]).train()
        steps = [task.scales[i] for i in range(0, len(task.scales), accumulate)]
        assert task.scales == [s for s in steps for _ in range(accumulate)]
        assert steps == [hat.mask_scale(b, 7) for b in range(7)] * 2
        trained.append(hat.state_dict())
    for name, value in trained[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_errors(tmp_path):
    hat = new_hat()
    with pytest.raises(hatify.HatifyError, match="out of range"):
        HATTaskModel(hat, task_id=5)
    data = Digits(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))
    plain = Trainer(model=DigitsNet(), args=args(tmp_path), train_dataset=data, callbacks=[HATTrainerCallback()])
    with pytest.raises(hatify.HatifyError, match="HATTaskModel"):
        plain.train()


def test_callback_records_task_inference_statistics_from_the_training_data(tmp_path):
    hat = new_hat()
    (xtr, ytr), _ = split_digits()[0]
    Trainer(model=HATTaskModel(hat, 0), args=args(tmp_path, batch=64, epochs=1), train_dataset=Digits(xtr, ytr),
            callbacks=[HATTrainerCallback(observe=True, keep=2)]).train()
    assert hat.task_stats.tasks() == [0]
    assert int(hat.task_stats.get(0, "class_counts").sum()) == len(ytr)
    kept = hat.task_stats.buffer(0)
    assert set(kept[1]) == {"pixels", "scale"} and kept[2].bincount().tolist() == [2, 2]
    assert hat.infer_task(pixels=xtr[:5], scale=torch.ones(5, 1)).task.tolist() == [0] * 5
