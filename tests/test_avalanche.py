"""Avalanche integration with the real package: split digits as a task-incremental Avalanche benchmark.

Both routes run with `eval_every=1`: a periodic evaluation draws DataLoader seeds from the global RNG, which
changes the later shuffles, so identical results need identical evaluation schedules.

One module for all Avalanche tests: importing `avalanche.training` costs seconds, paid once.
"""
import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")
from avalanche.benchmarks import nc_benchmark, split_online_stream, with_task_labels  # noqa: E402
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import hatify  # noqa: E402
from hatify.integrations.avalanche import HAT, HATMultiTaskModule, HATPlugin  # noqa: E402

EPOCHS = 6


def split_digits_benchmark():
    """load_digits as Avalanche's split benchmark: 5 experiences of 2 classes, task labels 0..4, classes 0/1."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.7 * len(y))

    def dataset(xs, ys):
        data = TensorDataset(xs, ys)
        data.targets = ys.tolist()
        return data
    return nc_benchmark(dataset(x[:cut], y[:cut]), dataset(x[cut:], y[cut:]), n_experiences=5, task_labels=True,
                        class_ids_from_zero_in_each_exp=True, fixed_class_order=list(range(10)), seed=0)


def new_hat(num_tasks=5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    return hatify.hatify(net, num_tasks=num_tasks, example_inputs=(torch.zeros(2, 64),))


def evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                            forgetting_metrics(experience=True, stream=True), loggers=[])


def run_stream(make_strategy, bm):
    """Train experience by experience; after each, check every finished task's outputs are bit-identical to
    what they were right after it finished. Returns (accuracy matrix, last metrics, the hat model)."""
    hat = new_hat()
    strategy = make_strategy(hat, torch.optim.AdamW(hat.parameters(), lr=1e-2, weight_decay=0.01))
    probe = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    finished, matrix, metrics = {}, [], {}
    for experience in bm.train_stream:
        strategy.train(experience)
        metrics = strategy.eval(bm.test_stream)
        matrix.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(5)])
        hat.eval()
        with torch.no_grad():
            for t, out in finished.items():
                assert torch.equal(hat(probe, task_id=t), out), f"task {t} changed after experience " \
                                                                 f"{experience.current_experience}"
            finished[experience.task_label] = hat(probe, task_id=experience.task_label)
    assert hat.trained_tasks == [0, 1, 2, 3, 4]
    return matrix, metrics, hat


def test_plugin_and_strategy_same_results_zero_forgetting_bit_identical():
    bm = split_digits_benchmark()
    via_plugin, metrics, hat = run_stream(
        lambda hat, opt: Naive(model=HATMultiTaskModule(hat), optimizer=opt, train_mb_size=32,
                               train_epochs=EPOCHS, eval_mb_size=256, plugins=[HATPlugin()], evaluator=evaluator(),
                               eval_every=1), bm)
    via_strategy, metrics2, _ = run_stream(
        lambda hat, opt: HAT(model=hat, optimizer=opt, train_mb_size=32, train_epochs=EPOCHS, eval_mb_size=256,
                             evaluator=evaluator(), eval_every=1), bm)
    print("accuracy matrix", via_plugin)
    assert via_plugin == via_strategy
    for m in (metrics, metrics2):
        assert m["StreamForgetting/eval_phase/test_stream"] == 0.0
        assert all(v == 0.0 for k, v in m.items() if k.startswith("ExperienceForgetting"))
        assert m["Top1_Acc_Stream/eval_phase/test_stream/Task004"] > 0  # the key names the metrics we read
    for j in range(4):  # Avalanche's forgetting above, and the matrix: nothing moves after a task is done
        assert all(via_plugin[i][j] == via_plugin[j][j] for i in range(j, 5))
    assert sum(via_plugin[-1]) / 5 > 0.95

    # a mixed-task evaluation minibatch equals per-task evaluation of the same samples
    module = HATMultiTaskModule(hat).eval()
    xs, ts = zip(*[(exp.dataset[i][0], exp.task_label) for exp in bm.test_stream for i in range(0, 30, 3)])
    x, t = torch.stack(xs), torch.tensor(ts)
    mix = torch.randperm(len(t), generator=torch.Generator().manual_seed(2))
    x, t = x[mix], t[mix]
    with torch.no_grad():
        mixed = module(x, t)
        for task in range(5):
            assert torch.equal(mixed[t == task], module(x[t == task], task))
        assert set(module(x, None)) == {0, 1, 2, 3, 4}


def test_online_stream_one_task_per_origin_experience():
    bm = split_digits_benchmark()
    hat = new_hat()
    strategy = HAT(model=hat, optimizer=torch.optim.AdamW(hat.parameters(), lr=1e-2), train_mb_size=32,
                   evaluator=evaluator())
    ocl = split_online_stream(list(bm.train_stream)[:2], experience_size=64, access_task_boundaries=True)
    seen = []
    for sub in ocl:
        strategy.train(sub)
        seen.append((hat.current_task, tuple(hat.trained_tasks)))
    # the task stays open across its sub-experiences and ends with the last one
    assert seen[0] == (0, ())
    assert seen[-1] == (None, (0, 1))
    assert (None, (0,)) in seen and (1, (0,)) in seen


def test_errors_name_the_problem():
    bm = split_digits_benchmark()
    exps = list(bm.train_stream)
    hat = new_hat(num_tasks=2)
    strategy = HAT(model=hat, optimizer=torch.optim.SGD(hat.parameters(), lr=0.1), train_mb_size=32,
                   evaluator=evaluator())
    with pytest.raises(hatify.HatifyError, match="task label 2 .* num_tasks=2"):
        strategy.train(exps[2])
    two_tasks = with_task_labels(benchmark_from_datasets(train=[exps[0].dataset.concat(exps[1].dataset)]))
    with pytest.raises(hatify.HatifyError, match=r"task labels \[0, 1\]"):
        strategy.train(two_tasks.train_stream[0])
    naive = Naive(model=hat, optimizer=torch.optim.SGD(hat.parameters(), lr=0.1), plugins=[HATPlugin()],
                  evaluator=evaluator())
    with pytest.raises(hatify.HatifyError, match="HATMultiTaskModule"):
        naive.train(exps[0])


def test_class_incremental_evaluation_through_task_inference():
    """Train 3 tasks with task labels, evaluate on a class-incremental stream (global labels, no task labels)."""
    bm = split_digits_benchmark()
    hat = new_hat(num_tasks=3)
    strategy = HAT(model=HATMultiTaskModule(hat, infer_task=True), optimizer=torch.optim.AdamW(hat.parameters(),
                   lr=1e-2), train_mb_size=32, train_epochs=EPOCHS, eval_mb_size=256, evaluator=evaluator(),
                   plugins=[HATPlugin(observe=True, keep=2)])
    for experience in list(bm.train_stream)[:3]:
        strategy.train(experience)
    assert hat.task_stats.tasks() == [0, 1, 2]
    assert hat.task_stats.get(2, "buffer_labels").bincount().tolist() == [2, 2]
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[digits.target < 6] / 16.0
    y = torch.tensor(digits.target)[digits.target < 6]
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    cil = nc_benchmark(data, data, n_experiences=1, task_labels=False, fixed_class_order=list(range(6)), seed=0)
    metrics = strategy.eval(cil.test_stream)
    accuracy = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    expected = float((hat.infer_task(x).class_probs.argmax(1) == y).float().mean())
    assert abs(accuracy - expected) < 1e-6
    assert accuracy > 0.8   # chance is 1/6
