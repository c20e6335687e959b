"""Lightning integration with the real package: 5 tasks of split digits, one `Trainer.fit` per task."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
import hatify  # noqa: E402
from hatify.integrations.lightning import HATCallback  # noqa: E402
from hatify.metrics import summarize  # noqa: E402
from test_split_digits import accuracy, split_digits  # noqa: E402


class DigitsModule(L.LightningModule):
    """The user's side: call hat with the callback's task id and mask scale, add the regulariser."""

    def __init__(self, hat: hatify.HATModel) -> None:
        super().__init__()
        self.hat = hat
        self.cb: HATCallback | None = None
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.scales.append(self.cb.mask_scale)
        out = self.hat(x, task_id=self.cb.task_id, mask_scale=self.cb.mask_scale)
        return F.cross_entropy(out, y) + self.hat.regularization()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def trainer(cb: HATCallback, epochs: int, accumulate: int = 1) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accumulate_grad_batches=accumulate)


def test_lightning_split_digits_acc_and_bit_identical():
    tasks = split_digits()
    net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 2))
    hat = hatify.hatify(net, num_tasks=5, example_inputs=(torch.zeros(2, 64),))
    module = DigitsModule(hat)
    probe = tasks[0][1][0][:32]
    finished, acc = {}, []
    for t, ((xtr, ytr), _) in enumerate(tasks):
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(t))
        module.cb, module.scales = HATCallback(hat, t), []
        accumulate = 2 if t == 1 else 1   # task 1: two micro-batches per optimizer step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(module.cb, epochs=8, accumulate=accumulate).fit(module, loader)
        eval_mode = [w for w in caught if "in eval mode at the start of training" in str(w.message)]
        assert bool(eval_mode) == (t > 0)  # the finished tasks' BatchNorm copies (documented in the module)
        # the callback gave end_task the training data: statistics re-estimated (one pass), no warning
        assert not [w for w in caught if issubclass(w.category, hatify.HatifyWarning)]
        bn = hat.net.get_submodule("1").copies[t]
        assert int(bn.num_batches_tracked) == len(loader)  # a cumulative average over one pass, not 8 epochs
        steps = math.ceil(len(loader) / accumulate)
        epoch = module.scales[:len(loader)]
        assert epoch[0] == hat.mask_scale(0, steps) and epoch[-1] == hat.plan.config.s_max
        assert epoch == [hat.mask_scale(b // accumulate, steps) for b in range(len(loader))]
        assert hat.trained_tasks == list(range(t + 1)) and hat.current_task is None
        hat.eval()
        with torch.no_grad():
            for j, out in finished.items():
                assert torch.equal(hat(probe, task_id=j), out), f"task {j} changed while training task {t}"
            finished[t] = hat(probe, task_id=t)
        acc.append([accuracy(hat, xte, yte, j) for j, (_, (xte, yte)) in enumerate(tasks)])
    metrics = summarize(acc)
    print("accuracy matrix", acc, metrics)
    assert metrics["bwt"] == 0.0
    assert metrics["acc"] > 0.9


def test_callback_refuses_a_model_outside_the_module():
    hat = hatify.hatify(nn.Sequential(nn.Linear(64, 2)), num_tasks=2, example_inputs=(torch.zeros(2, 64),))
    other = DigitsModule(hatify.hatify(nn.Sequential(nn.Linear(64, 2)), num_tasks=2,
                                       example_inputs=(torch.zeros(2, 64),)))
    other.cb = HATCallback(hat, 0)
    loader = DataLoader(TensorDataset(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(hatify.HatifyError, match="not a submodule of DigitsModule"):
        trainer(other.cb, epochs=1).fit(other, loader)
    with pytest.raises(hatify.HatifyError, match="HATCallback needs a model converted by hatify"):
        HATCallback(nn.Linear(2, 2), 0)


def test_callback_records_task_inference_statistics_from_the_training_data():
    tasks = split_digits()[:2]
    hat = hatify.hatify(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)), num_tasks=2,
                        example_inputs=(torch.zeros(2, 64),))
    module = DigitsModule(hat)
    for t, ((xtr, ytr), _) in enumerate(tasks):
        module.cb = HATCallback(hat, t, observe=True, keep=3)
        trainer(module.cb, epochs=1).fit(module, DataLoader(TensorDataset(xtr, ytr), batch_size=64))
        assert int(hat.task_stats.get(t, "class_counts").sum()) == len(ytr)   # every training sample seen
        assert hat.task_stats.get(t, "buffer_labels").bincount().tolist() == [3, 3]
    x = torch.cat([test[0] for _, test in tasks])
    assert hat.infer_task(x).probs.shape == (len(x), 2)
