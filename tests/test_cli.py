"""The command line end to end in subprocesses, and hatify.save / hatify.load round trips in Python.

Every command starts a fresh interpreter (importing torch and timm takes seconds), so the subprocess
runs are started together once per module and the tests read their results."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cli_factories
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hatify
from hatify.cli import main
from hatify.sources import SourceSpec, config_with, parse_source

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")]))}
CNN = "cli_factories:small_cnn"
CNN_SHAPE = "2,3,16,16"
CONVERT_CNN = ["--num-tasks", "2", "--input-shape", CNN_SHAPE, "-o", "out.hat"]

# name -> the commands run one after another in that run's own empty directory; {inputs} is replaced
# by the directory holding the prepared input files.
GOOD = {
    "timm": [["convert", "timm:resnet18,num_classes=10", "-o", "out.hat", "--num-tasks", "2",
              "--input-shape", "2,3,32,32", "--report-json", "report.json", "--report-md", "report.md"],
             ["report", "out.hat"], ["report", "out.hat", "--json"]],
    "factory": [["convert", f"{CNN},width=6", "--num-tasks", "3", "--input-shape", CNN_SHAPE, "-o", "out.hat",
                 "--set", "s_max=200", "--set", "loose_params=freeze"]],
    "pickle": [["convert", "{inputs}/whole.pt", "--trust-pickle", *CONVERT_CNN]],
    "state_dict_pt": [["convert", "{inputs}/weights.pt", "--arch", CNN, *CONVERT_CNN]],
    "state_dict_safetensors": [["convert", "{inputs}/weights.safetensors", "--arch", CNN, *CONVERT_CNN]],
    "explain_timm": [["explain", "timm:resnet18", "--input-shape", "2,3,32,32"]],
    "explain_json": [["explain", "cli_factories:with_opaque", "--input-shape", "2,4", "--json"]],
    "strict": [["convert", "cli_factories:with_opaque", "--num-tasks", "2", "--input-shape", "2,4", "-o", "out.hat",
                "--strict", "--report-json", "report.json"]],
    "validation_fails": [["convert", "cli_factories:noisy", "--num-tasks", "2", "--input-shape", "2,4", "-o",
                          "out.hat"]],
    "debug": [["convert", CNN, *CONVERT_CNN, "--set", "nope=1", "--debug"]],
}
# name -> (command, a fragment of the one-line reason)
BAD = {
    "unknown_timm_name": (["convert", "timm:resnet_18", "-o", "out.hat", "--num-tasks", "2"], "unknown timm model"),
    "missing_file": (["convert", "{inputs}/missing.pt", *CONVERT_CNN], "no such file"),
    "corrupt_file": (["convert", "{inputs}/garbage.pt", *CONVERT_CNN], "corrupt"),
    "truncated_pt": (["convert", "{inputs}/truncated.pt", "--arch", CNN, *CONVERT_CNN], "truncated"),
    "truncated_safetensors": (["convert", "{inputs}/truncated.safetensors", "--arch", CNN, *CONVERT_CNN],
                              "truncated"),
    "truncated_hat": (["report", "{inputs}/truncated.hat"], "truncated"),
    "pickle_untrusted": (["convert", "{inputs}/whole.pt", *CONVERT_CNN], "--trust-pickle"),
    "state_dict_without_arch": (["convert", "{inputs}/weights.pt", *CONVERT_CNN], "--arch"),
    "zero_tasks": (["convert", CNN, "-o", "out.hat", "--num-tasks", "0", "--input-shape", CNN_SHAPE], "--num-tasks"),
    "malformed_input_shape": (["convert", CNN, "-o", "out.hat", "--num-tasks", "2", "--input-shape", "2,3,x,16"],
                              "--input-shape"),
    "unknown_set_key": (["convert", CNN, *CONVERT_CNN, "--set", "nope=1"], "unknown key"),
    "wrong_input_shape": (["convert", CNN, "-o", "out.hat", "--num-tasks", "2", "--input-shape", "2,1,16,16"],
                          "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)) on inputs float32[2, 1, "
                          "16, 16] failed"),
    "hf_typo": (["convert", "hf:bertt", "-o", "out.hat", "--num-tasks", "2"], "did you mean hf:bert,"),
    "hf_hub_name": (["convert", "hf:bert-base-uncased", "-o", "out.hat", "--num-tasks", "2"],
                    "(did you mean hf:bert?); hub names are not downloaded"),
    "report_folder": (["report", "{inputs}"], "is a directory"),
}


def trained_cnn() -> torch.nn.Module:
    """small_cnn with weights and statistics unlike its factory's, so a test sees where weights came from."""
    model = cli_factories.small_cnn()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand(tensor.shape, generator=gen))
    return model.eval()


def _prepare_inputs(inputs: Path) -> None:
    model = trained_cnn()
    torch.save(model, inputs / "whole.pt")
    torch.save(model.state_dict(), inputs / "weights.pt")
    save_file(model.state_dict(), inputs / "weights.safetensors")
    (inputs / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    for name in ("weights.pt", "weights.safetensors"):
        data = (inputs / name).read_bytes()
        (inputs / name.replace("weights", "truncated")).write_bytes(data[: len(data) // 2])
    hat = hatify.hatify(cli_factories.small_cnn(), 2, (torch.randn(2, 3, 16, 16),))
    hatify.save(hat, inputs / "truncated.hat")
    data = (inputs / "truncated.hat").read_bytes()
    (inputs / "truncated.hat").write_bytes(data[: len(data) - 64])


def _run(argvs: list[list[str]], cwd: Path, inputs: Path) -> list[subprocess.CompletedProcess]:
    cwd.mkdir()
    return [subprocess.run([sys.executable, "-m", "hatify.cli", *(a.replace("{inputs}", str(inputs)) for a in argv)],
                           cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300) for argv in argvs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[subprocess.CompletedProcess]]]:
    root = tmp_path_factory.mktemp("cli")
    inputs = root / "inputs"
    inputs.mkdir()
    _prepare_inputs(inputs)
    jobs = {**GOOD, **{name: [argv] for name, (argv, _) in BAD.items()}}
    with ThreadPoolExecutor(max_workers=3) as pool:  # the longest chain first
        futures = {name: pool.submit(_run, argvs, root / name, inputs) for name, argvs in jobs.items()}
        return {name: (root / name, future.result()) for name, future in futures.items()}


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _open_output(hat: hatify.HATModel, x: torch.Tensor, task: int = 0) -> torch.Tensor:
    with torch.no_grad(), hatify.masks_open(hat):
        return hat.eval()(x, task_id=task)


def test_convert_timm_with_reports(runs):
    where, (convert, report, report_json) = runs["timm"]
    _ok(convert)
    assert "layer4.1.conv2" in convert.stdout and "validation passed" in convert.stdout
    assert _files(where) == {"out.hat", "report.json", "report.md"}
    data = json.loads((where / "report.json").read_text())
    assert set(data) == {"model", "summary", "plan", "validation"}
    assert data["model"] == "ResNet" and data["summary"]["hat_layers"] == 20 and data["summary"]["heads"] == 1
    assert data["summary"]["gates"] == data["summary"]["folded_gates"] == 20  # every mask follows a BatchNorm
    assert data["validation"]["passed"] is True and data["plan"]["num_tasks"] == 2
    markdown = (where / "report.md").read_text()
    assert markdown.startswith("# hatify: ResNet") and "| layer4.1.conv2 | Conv2d | converted |" in markdown

    assert "timm:resnet18,num_classes=10" in _ok(report).stdout and "layer4.1.conv2" in report.stdout
    meta = json.loads(_ok(report_json).stdout)
    assert meta["source"] == {"kind": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}}
    assert meta["num_tasks"] == 2 and meta["trained_tasks"] == []
    assert meta["example_inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert meta["report"] == data

    hat = hatify.load(where / "out.hat")   # rebuilt from the timm name alone
    assert hat.trained_tasks == [] and hat.report.validation["passed"] is True
    assert hat(torch.randn(2, 3, 32, 32), task_id=1).shape == (2, 10)


def test_convert_factory_with_config_overrides(runs):
    where, (convert,) = runs["factory"]
    _ok(convert)
    assert _files(where) == {"out.hat"}
    hat = hatify.load(where / "out.hat")
    assert hat.num_tasks == 3 and hat.plan.config.s_max == 200.0 and hat.plan.config.loose_params == "freeze"
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(_open_output(hat, x), cli_factories.small_cnn(width=6).eval()(x))


def test_convert_pickled_module_needs_model_to_load(runs):
    where, (convert,) = runs["pickle"]
    _ok(convert)
    with pytest.raises(hatify.HatifyError, match="model="):
        hatify.load(where / "out.hat")
    hat = hatify.load(where / "out.hat", model=cli_factories.small_cnn())   # the file's weights, not these
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(_open_output(hat, x), trained_cnn()(x))


@pytest.mark.parametrize("name", ["state_dict_pt", "state_dict_safetensors"])
def test_convert_state_dict_with_arch(runs, name):
    where, (convert,) = runs[name]
    _ok(convert)
    hat = hatify.load(where / "out.hat")
    assert hat.source == {"kind": "factory", "target": CNN, "kwargs": {}}
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(_open_output(hat, x), trained_cnn()(x))


def test_explain_writes_nothing(runs):
    where, (table,) = runs["explain_timm"]
    assert "layer4.1.conv2" in _ok(table).stdout and "planned in" in table.stdout
    where_json, (as_json,) = runs["explain_json"]
    data = json.loads(_ok(as_json).stdout)
    assert data["summary"]["opaque_modules"] == ["middle"] and data["summary"]["converted_parameters"] is None
    assert data["summary"]["folded_gates"] is None
    assert data["validation"] is None
    assert _files(where) == _files(where_json) == set()


def test_strict_fails_on_unconverted_modules(runs):
    where, (result,) = runs["strict"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--strict" in result.stderr and "middle" in result.stderr and "out.hat not written" in result.stderr
    assert _files(where) == {"report.json"}
    assert json.loads((where / "report.json").read_text())["summary"]["opaque_modules"] == ["middle"]


def test_failed_validation_exits_1_and_writes_nothing(runs):
    where, (result,) = runs["validation_fails"]
    assert result.returncode == 1 and "validation failed" in result.stderr and "Traceback" not in result.stderr
    assert "validation FAILED" in result.stdout
    assert _files(where) == set()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_with_one_line(runs, name):
    where, (result,) = runs[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hatify: error: "), result.stderr
    assert BAD[name][1] in lines[0] and len(lines[0]) < 400, lines[0]
    assert _files(where) == set()


def test_debug_shows_the_traceback(runs):
    where, (result,) = runs["debug"]
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hatify: error: --set nope: unknown key")
    assert _files(where) == set()


# ------------------------------------------------------------------------------ parsers, in process
def test_source_syntax():
    assert parse_source("timm:vit_tiny_patch16_224,num_classes=10,img_size=(96,96),pretrained=false") == SourceSpec(
        "timm", "vit_tiny_patch16_224", {"num_classes": 10, "img_size": (96, 96), "pretrained": False})
    assert parse_source("my_pkg.models:build_net,width=64,act=gelu,scale=0.5") == SourceSpec(
        "factory", "my_pkg.models:build_net", {"width": 64, "act": "gelu", "scale": 0.5})
    assert parse_source(__file__).kind == "file"
    for bad, reason in [("resnet18", "not one of"), ("missing/model.pt", "no such file"), ("timm:", "timm:NAME"),
                        ("pkg:fn,3", "key=value")]:
        with pytest.raises(hatify.HatifyError, match=reason):
            parse_source(bad)
    with pytest.raises(hatify.HatifyError, match="not one of"):
        parse_source(__file__, "--arch", files=False)
    for bare, hint in [("resnet18", "hf:MODEL_TYPE, package.module:factory or an existing model file; did you mean "
                                    "timm:resnet18?"), ("bert", "did you mean hf:bert?")]:
        with pytest.raises(hatify.HatifyError, match=hint.replace("?", r"\?")):
            parse_source(bare)


def test_config_overrides_take_the_field_types():
    config = config_with(["s_max=200", "heads=fc,head", "schedule=cosine", "seed=3", "concrete_args={'x': 1}"])
    assert config == hatify.HATConfig(s_max=200.0, heads=("fc", "head"), schedule="cosine", seed=3,
                                      concrete_args={"x": 1})
    assert config_with(["heads=none"]).heads == "none"
    for bad, reason in [("seed=1.5", "integer"), ("c=yes", "number"), ("concrete_args=3", "dict"),
                        ("s_max", "key=value"), ("nope=1", "unknown key"), ("schedule=weekly", "schedule")]:
        with pytest.raises(hatify.HatifyError, match=reason):
            config_with([bad])


# ------------------------------------------------------------------------------ Python round trips
def _train(hat: hatify.HATModel, tasks: range, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> None:
    opt = torch.optim.SGD(hat.parameters(), lr=0.05, momentum=0.9)
    for t in tasks:
        hat.train()
        hat.begin_task(t)
        for b in range(steps):
            s = hat.mask_scale(b, steps)
            loss = F.cross_entropy(hat(x, task_id=t, mask_scale=s), y) + hat.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hat.end_task()


def test_round_trip_keeps_trained_tasks_bit_identical(tmp_path):
    source = {"kind": "factory", "target": "cli_factories:loose_param_net", "kwargs": {}}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    hat = hatify.hatify(cli_factories.loose_param_net(), 3, (x,), source=source)
    _train(hat, range(2), x, y)
    hat.eval()
    with torch.no_grad():
        before = {t: hat(x, task_id=t) for t in range(3)}

    hatify.save(hat, tmp_path / "model.hat")
    loaded = hatify.load(tmp_path / "model.hat")   # rebuilt by the factory the recipe names
    assert loaded.trained_tasks == [0, 1]
    assert {n for n, _ in loaded.named_parameters()} == {n for n, _ in hat.named_parameters()}
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(loaded.eval()(x, task_id=t), before[t]), t

    # Protection came back too: training the next task leaves the finished ones bit-identical.
    _train(loaded, range(2, 3), x, y)
    assert loaded.trained_tasks == [0, 1, 2]
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(loaded.eval()(x, task_id=t), before[t]), t


def test_round_trip_with_shared_storage(tmp_path):
    x = torch.randn(4, 6)
    hat = hatify.hatify(cli_factories.tied(), 2, (x,))
    state = hat.state_dict()
    assert any(a is not b and a.data_ptr() == b.data_ptr() for a in state.values() for b in state.values())
    hatify.save(hat, tmp_path / "tied.hat")
    loaded = hatify.load(tmp_path / "tied.hat", model=cli_factories.tied())
    with torch.no_grad():
        assert torch.equal(loaded(x, task_id=1), hat.eval()(x, task_id=1))


def test_load_errors(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    hat = hatify.hatify(cli_factories.small_cnn(), 2, (x,))
    hatify.save(hat, tmp_path / "plain.hat")
    with pytest.raises(hatify.HatifyError, match="no such file"):
        hatify.load(tmp_path / "missing.hat")
    with pytest.raises(hatify.HatifyError, match="is a directory: give the path of a file written by hatify.save"):
        hatify.load(tmp_path)
    with pytest.raises(hatify.HatifyError, match="model="):   # no recipe was given to hatify()
        hatify.load(tmp_path / "plain.hat")
    with pytest.raises(hatify.HatifyError, match="do not fit|mask units"):
        hatify.load(tmp_path / "plain.hat", model=cli_factories.small_cnn(width=4))
    data = (tmp_path / "plain.hat").read_bytes()
    (tmp_path / "cut.hat").write_bytes(data[: len(data) // 2])
    with pytest.raises(hatify.HatifyError, match="truncated"):
        hatify.load(tmp_path / "cut.hat", model=cli_factories.small_cnn())


def test_failed_save_leaves_nothing_behind(tmp_path):
    hat = hatify.hatify(cli_factories.small_cnn(), 2, (torch.randn(2, 3, 16, 16),))
    (tmp_path / "taken").mkdir()
    with pytest.raises(hatify.HatifyError, match="cannot write"):
        hatify.save(hat, tmp_path / "taken")
    with pytest.raises(hatify.HatifyError, match="does not exist"):
        hatify.save(hat, tmp_path / "nowhere" / "model.hat")
    assert _files(tmp_path) == {"taken"} and _files(tmp_path / "taken") == set()


def test_validate_accepts_a_batch_of_one():
    model, x = cli_factories.small_cnn(), torch.randn(1, 3, 1, 1)
    hat = hatify.hatify(model, 2, (x,))
    assert hatify.validate(model, hat, (x,)).passed


def test_report_prints_capacity_and_plots_it(tmp_path, capsys):
    source = {"kind": "factory", "target": "cli_factories:loose_param_net", "kwargs": {}}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    hat = hatify.hatify(cli_factories.loose_param_net(), 3, (x,), source=source)
    _train(hat, range(2), x, y)
    hatify.save(hat, tmp_path / "model.hat")
    png = tmp_path / "capacity.png"
    assert main(["report", str(tmp_path / "model.hat"), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "capacity: units used per task" in printed and "task 1" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    untrained = hatify.hatify(cli_factories.loose_param_net(), 3, (x,), source=source)
    hatify.save(untrained, tmp_path / "fresh.hat")
    assert main(["report", str(tmp_path / "fresh.hat"), "--plot", str(tmp_path / "none.png")]) == 2
    assert not (tmp_path / "none.png").exists()
    printed = capsys.readouterr()
    assert printed.out == ""  # refused before printing anything
    assert printed.err.strip().splitlines() == [f"hatify: error: --plot: {tmp_path / 'fresh.hat'} has no trained task, "
                                                "so no capacity to plot (train a task: begin_task, end_task, then "
                                                "hatify.save)"]


@pytest.mark.parametrize("tasks", [3, 12, 40])
def test_capacity_heatmap_labels_do_not_overlap(tasks):
    pytest.importorskip("matplotlib")
    from hatify.capacity import capacity_figure

    names = [f"model.encoder.layer.{i}.attention.output.dense{j}" for i in range(12) for j in (1, 2)] + ["fc"]
    capacity = {name: {"units": 64, "used": {t: (t * 7 + i) % 64 for t in range(tasks)}, "free": 3}
                for i, name in enumerate(names)}
    fig = capacity_figure(capacity)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for labels in (fig.axes[0].get_xticklabels(), fig.axes[0].get_yticklabels()):
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert len(boxes) in (tasks + 1, len(capacity))
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), [label.get_text() for label in labels]
    assert [label.get_text() for label in fig.axes[0].get_xticklabels()][-2:] == [str(tasks - 1), "free"]



# ------------------------------------------------------------------------------ the report on a terminal
class _NoRule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(torch.special.erfcx(self.fc1(x))).relu())  # erfcx: an op without a mask rule


def test_report_fits_the_terminal_and_every_fallback_row_says_why(monkeypatch):
    import timm
    from rich.console import Console

    hat = hatify.hatify(timm.create_model("resnet18", num_classes=4), 2, (torch.randn(2, 3, 32, 32),), validate=False)
    report, rows = hat.report, hat.report.rows()
    for layer, row in zip(report.plan["layers"], rows):
        if layer["role"] == "masked" and not layer["input_producers"]:  # "ones (no mask known)": a reason follows
            assert row[-1].startswith("ones: ") and len(row[-1]) > len("ones: ") + 10, row
    assert rows[0][-1] == "ones: made from the model input"  # conv1
    for width in (80, 100, 200):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        console.print(report)
        lines = console.export_text().splitlines()
        assert max(map(len, lines)) <= width
        assert all(any(row[0] in line.split() for line in lines) for row in rows)  # names never break
        assert len(lines) < 3 * len(rows)
    monkeypatch.setenv("COLUMNS", "80")
    assert max(map(len, str(report).splitlines())) <= 80
    monkeypatch.setenv("COLUMNS", "200")
    assert "input from" in str(report)  # wide enough for one column per field

    norule = hatify.hatify(_NoRule(), 2, (torch.randn(2, 4),))
    assert norule.plan.layer("fc2").input_map == "ones (no mask known)"
    assert re.fullmatch(r"special_erfcx \(test_cli.py:\d+\): no mask rule", norule.plan.layer("fc2").reason)
    assert norule.report.summary["unmasked_inputs"] == ["fc2"] and "no input mask" in str(norule.report)
