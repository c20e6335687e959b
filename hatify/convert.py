"""The pipeline: capture -> shapes -> mask flow -> plan -> rewrite -> report. `explain` stops at the plan."""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

from torch import nn

from .capture import capture
from .config import HATConfig
from .errors import HatifyError, ValidationFailed
from .inputs import Inputs
from .flow import analyse, find_producers
from .model import HATModel
from .naming import graph_names
from .nested import nest
from .plan import Plan, make_plan
from .rewrite import rewrite
from .rules import MODULE_LEAVES, register_timm_rules
from .shapes import ensure_specs, infer_example_inputs


def _check(model: Any, num_tasks: Any, example_inputs: Any, config: Any) -> tuple:
    if not isinstance(model, nn.Module):
        raise HatifyError(f"hatify needs an nn.Module, got {type(model).__name__}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise HatifyError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    config = config or HATConfig()
    if not isinstance(config, HATConfig):
        raise HatifyError(f"config must be a hatify.HATConfig, got {type(config).__name__}")
    return model, num_tasks, Inputs.of(infer_example_inputs(model) if example_inputs is None else example_inputs), \
        config


def explain(model: nn.Module, num_tasks: int, example_inputs: Any = None, config: HATConfig | None = None) -> Plan:
    """Everything up to the plan, no rewrite: what hatify would do with `model`.

    Example:
        >>> plan = explain(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 2, (torch.randn(2, 4),))
        >>> [(layer.name, layer.role) for layer in plan.layers]
        [('0', 'masked'), ('2', 'head')]
    """
    model, num_tasks, example_inputs, config = _check(model, num_tasks, example_inputs, config)
    return _plan(model, num_tasks, example_inputs, config)[1]


def _plan(model, num_tasks, example_inputs, config):
    register_timm_rules()
    cap = capture(model, config, set(MODULE_LEAVES), example_inputs)
    ensure_specs(cap.graph_module, example_inputs.flat)
    named = config  # the module names the config gives, as the graph holds them (hatify.naming)
    if cap.renamed and (config.include or config.exclude or isinstance(config.heads, (tuple, list))):
        named = dataclasses.replace(config, **graph_names({"heads": config.heads, "include": config.include,
                                                           "exclude": config.exclude}, cap.renamed))
    flow = analyse(cap.graph_module, find_producers(cap.graph_module, named), named)
    plan = make_plan(cap, flow, num_tasks, named)
    plan.config = config
    nest(cap, plan, num_tasks, example_inputs, config, _plan)  # (submodules that opaque code calls: planned alike)
    return cap, plan


def hatify(model: nn.Module, num_tasks: int, example_inputs: Any = None, config: HATConfig | None = None,
           source: dict | None = None, validate: bool = True) -> HATModel:
    """Convert any `nn.Module` into a HAT model with `num_tasks` tasks. The original is not modified.
    `example_inputs` is how the model is called: a tuple of positional inputs, a dict of keyword inputs
    (`{"input_ids": ids, "attention_mask": mask}`, then `hat(**batch, task_id=t)`), or `(args, kwargs)`.

    With `validate` (the default) the conversion is checked on the example inputs (`hatify.validate`: open masks
    equal the original, the mask-flow probe finds no unit predicted zero that is not, every parameter that learns
    in the original learns in the conversion); the figures go into `hat.report.validation`, and a failure raises
    `HatifyError` with the report attached as `error.report`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> hat = hatify(net, num_tasks=5, example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> hat(torch.randn(4, 3, 8, 8), task_id=2).shape
        torch.Size([4, 10])
    """
    from .report import Report

    start = time.perf_counter()
    model, num_tasks, example_inputs, config = _check(model, num_tasks, example_inputs, config)
    was_training = model.training
    cap, plan = _plan(model, num_tasks, example_inputs, config)
    hat = HATModel(rewrite(cap, plan), plan, source)
    hat.train(was_training)
    hat.report = Report.build(hat, seconds=time.perf_counter() - start)
    if hat.report.summary["shared_trainable"]:
        warnings.warn(f"HATConfig.unselected='shared': {len(hat.report.summary['shared_trainable'])} modules/"
                      f"parameters train for every task without protection; old tasks will forget "
                      f"(report.summary['shared_trainable'])", stacklevel=2)
    if validate:
        _validate(model, hat, example_inputs)
    return hat


def _validate(model: nn.Module, hat: HATModel, example_inputs: tuple) -> None:
    from .validate import validate

    start = time.perf_counter()
    result = validate(model, hat, example_inputs)
    hat.report.validation = {**result.to_dict(), "seconds": round(time.perf_counter() - start, 4)}
    if not result.passed:
        raise ValidationFailed(
            f"the conversion of {type(model).__name__} failed validation: {'; '.join(result.messages)}. Its "
            "finished tasks might not stay intact; see error.report (plan and figures) and error.result, and pass "
            "validate=False to inspect the converted model anyway", hat.report, result)
