"""Fingerprints of the plans hatify makes, to show a change that speeds conversion up leaves every plan as it was.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plan_fingerprint.py before.json     # on the old tree
    PYTHONPATH=$PWD .venv/bin/python benchmarks/plan_fingerprint.py after.json      # on the new tree
    .venv/bin/python benchmarks/plan_fingerprint.py --compare before.json after.json

Per model (timm CNNs and transformers, torchvision, transformers BERT, Llama and GPT-2 from configs with random
weights, a torchvision detector): the plan (`plan.to_dict()`), each layer's input index, the gates and re-masks, the
report summary (its timing aside), the generated code, every state tensor, an output, and every node's source line.
`--compare` prints what differs and exits 1 if anything does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings

import timm
import torch
import torchvision
import transformers

import hatify
from hatify.errors import source_line


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def models():
    for name in ["resnet18", "resnet50", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
                 "swin_tiny_patch4_window7_224", "levit_128s"]:
        size = 224 if name.startswith(("swin", "vit", "levit")) else 64
        yield f"timm:{name}", lambda n=name: timm.create_model(n, num_classes=4), lambda s=size: (
            torch.randn(2, 3, s, s),)
    small = lambda: (torch.randn(2, 3, 64, 64),)  # noqa: E731
    yield "torchvision:mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=4), small
    yield "torchvision:swin_t", lambda: torchvision.models.swin_t(num_classes=4), small
    text = lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 16, dtype=torch.long)}  # noqa: E731
    yield "hf:bert", lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3)), text
    yield "hf:llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False)), text
    yield "hf:gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, use_cache=False, bos_token_id=0, eos_token_id=0)), \
        lambda: {"input_ids": _ids()}
    yield "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", \
        lambda: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3), lambda: ([torch.rand(3, 64, 64), torch.rand(3, 64, 64)],)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return f"{hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]}{tuple(t.shape)}{t.dtype}"


def fingerprint(hat: hatify.HATModel, inputs) -> dict:
    plan = hat.plan
    summary = {k: v for k, v in hat.report.summary.items() if k != "conversion_seconds"}
    output = hat(**inputs, task_id=1) if isinstance(inputs, dict) else hat(*inputs, task_id=1)
    return {"plan": json.dumps(plan.to_dict(), sort_keys=True, default=str),
            "input_index": {layer.name: None if layer.input_index is None else _digest(layer.input_index)
                            for layer in plan.layers},
            "gates": {k: _digest(v) for k, v in plan.gates.items()},
            "remask": {k: _digest(v) for k, v in plan.remask.items()},
            "summary": json.dumps(summary, sort_keys=True, default=str),
            "code": hashlib.sha256(hat.net.code.encode()).hexdigest(),
            "lines": [[node.name, source_line(node)] for node in hat.net.graph.nodes],
            "state": {k: _digest(v) for k, v in hat.state_dict().items()},
            "output": [_digest(t) for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]}


def compare(before: dict, after: dict) -> int:
    differences = 0
    for model in sorted(set(before) | set(after)):
        for key in sorted(set(before.get(model, {})) | set(after.get(model, {}))):
            if before.get(model, {}).get(key) != after.get(model, {}).get(key):
                differences += 1
                print(f"differs: {model} {key}")
    print(f"{len(before)} models, {differences} differences")
    return int(differences > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="the JSON file to write")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*(json.load(open(path)) for path in args.compare))
    if not args.out:
        parser.error("give OUT or --compare BEFORE AFTER")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    found = {}
    for name, build, make_inputs in models():
        torch.manual_seed(0)
        model, inputs = build().eval(), make_inputs()
        hat = hatify.hatify(model, 3, inputs, validate=False)
        torch.manual_seed(1)
        found[name] = fingerprint(hat, inputs)
        print(name, len(hat.plan.layers), "layers", flush=True)
    with open(args.out, "w") as f:
        json.dump(found, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
