"""HuggingFace zoo: transformers architectures as they are, called as users call them, three checks.

Each architecture is built from a tiny config (`AutoConfig.for_model(type, ...)` + `from_config`, random
weights, nothing downloaded), called with keyword inputs (`input_ids` + `attention_mask`, `pixel_values`,
`input_values`, ...) and checked, with sdpa and eager attention and, for text, with and without a padded
`attention_mask`:

1. convert   `hatify.hatify(model, num_tasks=2, example_inputs={...})` succeeds;
2. validate  `hatify.validate(...)` passes (open masks equal the original, probes sound, gradients);
3. protect   tasks 0 and 1 train a few steps with ONE AdamW(weight_decay=0.01) optimizer and task 0's
             eval outputs stay bit-identical (`torch.equal`).

The checks, their reason codes and the summary columns (with the known input maps: `known_maps`,
`known_share`, `unknown_inputs`) are timm_zoo's. Each architecture runs in its own subprocess with a timeout.
Results: benchmarks/results/hf_zoo.json and .md. `--known-only` refreshes just the known input maps
(`hatify.explain` on the same build and inputs in every setting, no validation or training).

    python benchmarks/hf_zoo.py                      # the whole zoo
    python benchmarks/hf_zoo.py --models bert,gpt2   # some architectures
    python benchmarks/hf_zoo.py --models hubert --merge   # rerun some, keep the other rows of hf_zoo.json
    python benchmarks/hf_zoo.py --known-only         # known input maps only, merged into hf_zoo.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import warnings
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm_zoo  # noqa: E402
from timm_zoo import NUM_CLASSES, REASONS, RESULTS, _Fail, _first_line, _summary, train_and_check  # noqa: E402

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
         "vocab_size": 96, "max_position_embeddings": 64}
SEQ2SEQ = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": 96,
           "max_position_embeddings": 64}
T5 = {"d_model": 64, "d_kv": 32, "d_ff": 128, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
      "vocab_size": 96}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
          "image_size": 32, "patch_size": 8, "num_labels": NUM_CLASSES}
SEQ, BATCH = 12, 2

# (name, model type, AutoModel class, config keyword arguments, inputs). Inputs: "text" (input_ids,
# attention_mask), "eos" (text ending in one end-of-sequence token), "seq2seq" (and decoder_input_ids), "image"
# (pixel_values), "audio" (input_values), "features" (input_features, decoder_input_ids: Whisper).
ZOO: list[tuple[str, str, str, dict, str]] = [
    ("bert", "bert", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("bert-mlm", "bert", "AutoModelForMaskedLM", SMALL, "text"),
    ("roberta", "roberta", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("distilbert", "distilbert", "AutoModelForSequenceClassification",
     {"dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128, "vocab_size": 96, "num_labels": NUM_CLASSES},
     "text"),
    ("albert", "albert", "AutoModelForSequenceClassification",
     {**SMALL, "embedding_size": 32, "num_labels": NUM_CLASSES}, "text"),
    ("electra", "electra", "AutoModelForSequenceClassification",
     {**SMALL, "embedding_size": 64, "num_labels": NUM_CLASSES}, "text"),
    ("deberta-v2", "deberta-v2", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("xlm-roberta", "xlm-roberta", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES},
     "text"),
    ("camembert", "camembert", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("mpnet", "mpnet", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("roformer", "roformer", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("ernie", "ernie", "AutoModelForSequenceClassification", {**SMALL, "num_labels": NUM_CLASSES}, "text"),
    ("modernbert", "modernbert", "AutoModelForSequenceClassification",
     {**SMALL, "num_labels": NUM_CLASSES, "global_attn_every_n_layers": 2, **TOKENS, "cls_token_id": 1,
      "sep_token_id": 2}, "text"),
    ("gpt2", "gpt2", "AutoModelForCausalLM", {**SMALL, "use_cache": False}, "text"),
    ("gpt2-cls", "gpt2", "AutoModelForSequenceClassification",
     {**SMALL, "num_labels": NUM_CLASSES, "pad_token_id": 0, "use_cache": False}, "text"),
    ("gpt-neo", "gpt_neo", "AutoModelForCausalLM",
     {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 96, "attention_types": [[["global",
      "local"], 1]], "max_position_embeddings": 64, "use_cache": False}, "text"),
    ("gptj", "gptj", "AutoModelForCausalLM",
     {"n_embd": 64, "n_layer": 2, "n_head": 2, "rotary_dim": 16, "vocab_size": 96, "use_cache": False}, "text"),
    ("gpt-neox", "gpt_neox", "AutoModelForCausalLM", {**SMALL, "use_cache": False}, "text"),
    ("opt", "opt", "AutoModelForCausalLM", {**SMALL, "ffn_dim": 128, "word_embed_proj_dim": 64,
                                            "use_cache": False}, "text"),
    ("bloom", "bloom", "AutoModelForCausalLM", {"hidden_size": 64, "n_layer": 2, "n_head": 2, "vocab_size": 96,
                                                "use_cache": False}, "text"),
    ("llama", "llama", "AutoModelForCausalLM", {**SMALL, "use_cache": False}, "text"),
    ("llama-cls", "llama", "AutoModelForSequenceClassification",
     {**SMALL, "num_labels": NUM_CLASSES, "pad_token_id": 0, "use_cache": False}, "text"),
    ("mistral", "mistral", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "use_cache": False}, "text"),
    ("qwen2", "qwen2", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "use_cache": False}, "text"),
    ("qwen3", "qwen3", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "head_dim": 32,
                                                "use_cache": False}, "text"),
    ("phi", "phi", "AutoModelForCausalLM", {**SMALL, "use_cache": False}, "text"),
    ("phi3", "phi3", "AutoModelForCausalLM", {**SMALL, **TOKENS, "use_cache": False}, "text"),
    ("gemma", "gemma", "AutoModelForCausalLM", {**SMALL, "head_dim": 32, "num_key_value_heads": 2,
                                                "use_cache": False}, "text"),
    ("gemma2", "gemma2", "AutoModelForCausalLM", {**SMALL, "head_dim": 32, "num_key_value_heads": 2,
                                                  "use_cache": False}, "text"),
    ("olmo", "olmo", "AutoModelForCausalLM", {**SMALL, "use_cache": False}, "text"),
    ("stablelm", "stablelm", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 2, "use_cache": False},
     "text"),
    ("mixtral", "mixtral", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "num_local_experts": 4,
                                                    "num_experts_per_tok": 2, "use_cache": False}, "text"),
    ("olmoe", "olmoe", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "num_experts": 4,
                                                "num_experts_per_tok": 2, "use_cache": False}, "text"),
    ("gpt-oss", "gpt_oss", "AutoModelForCausalLM", {**SMALL, "num_key_value_heads": 1, "num_local_experts": 4,
                                                    "num_experts_per_tok": 2, "head_dim": 32, "use_cache": False},
     "text"),
    ("xlnet", "xlnet", "AutoModelForSequenceClassification",
     {"d_model": 64, "n_layer": 2, "n_head": 2, "d_inner": 128, "vocab_size": 96, "num_labels": NUM_CLASSES}, "text"),
    ("falcon", "falcon", "AutoModelForCausalLM", {"hidden_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 2, "vocab_size": 96, "use_cache": False},
     "text"),
    ("t5", "t5", "AutoModelForSeq2SeqLM", {**T5, "use_cache": False}, "seq2seq"),
    ("t5-encoder", "t5", "T5EncoderModel", T5, "text"),
    ("bart", "bart", "AutoModelForSeq2SeqLM", {**SEQ2SEQ, "use_cache": False}, "seq2seq"),
    ("bart-cls", "bart", "AutoModelForSequenceClassification",
     {**SEQ2SEQ, **TOKENS, "num_labels": NUM_CLASSES, "use_cache": False}, "eos"),
    ("mbart", "mbart", "AutoModelForSeq2SeqLM", {**SEQ2SEQ, "use_cache": False}, "seq2seq"),
    ("pegasus", "pegasus", "AutoModelForSeq2SeqLM", {**SEQ2SEQ, "use_cache": False}, "seq2seq"),
    ("marian", "marian", "AutoModelForSeq2SeqLM", {**SEQ2SEQ, "use_cache": False, "pad_token_id": 0,
                                                   "decoder_start_token_id": 0}, "seq2seq"),
    ("vit", "vit", "AutoModelForImageClassification", VISION, "image"),
    ("deit", "deit", "DeiTForImageClassification", VISION, "image"),
    ("beit", "beit", "AutoModelForImageClassification", VISION, "image"),
    ("dinov2", "dinov2", "AutoModelForImageClassification", VISION, "image"),
    ("swin", "swin", "AutoModelForImageClassification",
     {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "image_size": 32, "patch_size": 4,
      "num_labels": NUM_CLASSES}, "image"),
    ("convnext", "convnext", "AutoModelForImageClassification",
     {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "image_size": 32, "num_labels": NUM_CLASSES},
     "image"),
    ("resnet", "resnet", "AutoModelForImageClassification",
     {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "image_size": 32, "num_labels": NUM_CLASSES},
     "image"),
    ("mobilevit", "mobilevit", "AutoModelForImageClassification",
     {"image_size": 32, "num_labels": NUM_CLASSES}, "image"),
    ("wav2vec2", "wav2vec2", "AutoModelForAudioClassification",
     {**SMALL, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_conv_pos_embeddings": 16,
      "num_conv_pos_embedding_groups": 2, "num_labels": NUM_CLASSES}, "audio"),
    ("hubert", "hubert", "AutoModelForAudioClassification",
     {**SMALL, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_conv_pos_embeddings": 16,
      "num_conv_pos_embedding_groups": 2, "num_labels": NUM_CLASSES}, "audio"),
    ("wavlm", "wavlm", "AutoModelForAudioClassification",
     {**SMALL, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_conv_pos_embeddings": 16,
      "num_conv_pos_embedding_groups": 2, "num_labels": NUM_CLASSES}, "audio"),
    ("whisper", "whisper", "AutoModelForSpeechSeq2Seq",
     {**SEQ2SEQ, **TOKENS, "decoder_start_token_id": 1, "num_mel_bins": 16, "max_source_positions": 16, "max_target_positions": 32, "use_cache": False},
     "features"),
]
ATTENTION = ("sdpa", "eager")


def build(model_type: str, auto_class: str, kwargs: dict, attn: str) -> torch.nn.Module:
    """A randomly initialised transformers model from a config by model type (nothing downloaded)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    cls = getattr(transformers, auto_class)
    if auto_class.startswith("Auto"):
        return cls.from_config(config, attn_implementation=attn).eval()
    config._attn_implementation = attn
    return cls(config).eval()


def inputs_for(model: torch.nn.Module, kind: str, padded: bool) -> dict:
    """Keyword inputs the way users call the model; a padded batch has its second row's tail masked."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", 96)
    ids = lambda n: torch.randint(2, vocab, (BATCH, n), generator=gen)
    if kind == "image":
        return {"pixel_values": torch.randn(BATCH, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)}
    if kind == "audio":
        return {"input_values": torch.randn(BATCH, 400, generator=gen)}
    if kind == "features":
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(BATCH, cfg.num_mel_bins, frames, generator=gen),
                "decoder_input_ids": ids(6)}
    if kind == "eos":  # one end-of-sequence token per row, last (BART's classifier reads its hidden state)
        batch = {"input_ids": torch.randint(3, vocab, (BATCH, SEQ), generator=gen),
                 "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
        batch["input_ids"][:, -1] = cfg.eos_token_id
        return batch
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[1, SEQ - 4:] = 0
    batch = {"input_ids": ids(SEQ), "attention_mask": mask}
    if kind == "seq2seq":
        batch["decoder_input_ids"] = ids(6)
    return batch


def check(name: str, attn: str, padded: bool) -> dict:
    """Build, convert, validate and train one architecture in one setting; a result row."""
    import hatify

    _, model_type, auto_class, kwargs, kind = next(entry for entry in ZOO if entry[0] == name)
    row: dict = {"model": name, "class": auto_class, "attn": attn, "padded": padded, "status": "fail",
                 "reason": "", "why": ""}
    try:
        try:
            model = build(model_type, auto_class, kwargs, attn)
            batch = inputs_for(model, kind, padded)
            with torch.no_grad():
                model(**batch)
        except Exception as exc:
            if "does not support an attention implementation" in str(exc):  # the architecture has no such attention
                row.update(status="skip", reason="unsupported", why=f"{auto_class} has no {attn} attention")
                return row
            raise _Fail("create_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        row.update(inputs=sorted(batch), params=sum(p.numel() for p in model.parameters()))
        start = time.perf_counter()
        try:
            hat = hatify.hatify(model, num_tasks=2, example_inputs=batch)
        except Exception as exc:
            raise _Fail("convert_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        row["convert_s"] = round(time.perf_counter() - start, 3)
        row.update(_summary(hat))
        row["hat_parameter_share"] = row.pop("hat_share")
        try:
            result = hatify.validate(model, hat, batch)
        except Exception as exc:
            raise _Fail("validate_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        row["max_abs_diff"] = result.largest_difference
        if not result.passed:
            code = "open_mismatch" if any(m.startswith("output") for m in result.messages) else \
                "probe_violation" if result.probe_violations else "missing_gradient"
            raise _Fail(code, "; ".join(result.messages)[:200])
        try:
            kept = train_and_check(hat, batch)
        except Exception as exc:
            raise _Fail("train_error", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if not kept:
            raise _Fail("forgot_task0", REASONS["forgot_task0"])
        row["status"] = "pass"
    except _Fail as fail:
        row["reason"], row["why"] = fail.code, fail.why
    return row


def known_of_model(name: str) -> dict:
    """timm_zoo's `known_only` in every setting of `name` (the builds and inputs of the full run)."""
    _, model_type, auto_class, kwargs, kind = next(entry for entry in ZOO if entry[0] == name)
    found = []
    for attn, padded in settings(name):
        entry: dict = {"attn": attn, "padded": padded}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(model_type, auto_class, kwargs, attn)
            entry.update(timm_zoo.known_only(model, inputs_for(model, kind, padded)))
        except Exception as exc:  # the full run skips or fails this setting on its own
            entry["known_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        found.append(entry)
    return {"settings": found}


def settings(name: str) -> list[tuple[str, bool]]:
    kind = next(entry[4] for entry in ZOO if entry[0] == name)
    pads = (True, False) if kind in ("text", "seq2seq") else (False,)
    return [(attn, padded) for attn in ATTENTION for padded in pads]


def _worker(name: str, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    rows = [check(name, attn, padded) for attn, padded in settings(name)]
    Path(out_path).write_text(json.dumps(rows))


def run_model(name: str, timeout: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out_path = tmp.name
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--out", out_path], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        text = Path(out_path).read_text() if Path(out_path).stat().st_size else ""
        if text:
            rows = json.loads(text)
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            rows = [{"model": name, "status": "fail", "reason": "crashed",
                     "why": f"exit {proc.returncode}: {tail[-1][:200] if tail else ''}"}]
    except subprocess.TimeoutExpired:
        rows = [{"model": name, "status": "fail", "reason": "timeout", "why": f"no result within {timeout:.0f} s"}]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    for row in rows:
        row["seconds"] = round((time.perf_counter() - start) / len(rows), 1)
    return rows


COLUMNS = ("model", "class", "attn", "padded", "status", "reason", "hat_layers", "hat_parameter_share", "known",
           "fallback_params", "convert_s", "why")


def _cell(row: dict, key: str) -> str:
    if key == "known":
        return timm_zoo._cell(row, key)
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if key == "hat_parameter_share":
        return f"{100 * value:.1f}%"
    return str(value)


def write_results(rows: list[dict], known_run: dict | None = None) -> None:
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    passed = sum(r["status"] == "pass" for r in rows)
    architectures = sorted({r["model"] for r in rows})
    clean = [a for a in architectures if all(r["status"] == "pass" for r in rows if r["model"] == a)]
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "passed": passed,
            "total": len(rows), "architectures": len(architectures), "architectures_passing": len(clean)}
    if known_run:
        meta["known_run"] = known_run
    (RESULTS / "hf_zoo.json").write_text(json.dumps({**meta, "reasons": REASONS, "rows": rows}, indent=1))
    lines = ["# hatify x HuggingFace transformers zoo", "",
             f"transformers {meta['transformers']}, torch {meta['torch']}; {passed} / {len(rows)} settings pass all "
             f"three checks (convert, validate, task 0 bit-identical after task 1 with one AdamW(weight_decay=0.01)); "
             f"{len(clean)} / {len(architectures)} architectures pass in every setting. `known`: masked layers whose "
             f"input map is known, of those with input units (a layer fed by the model input counts as unknown).", "",
             timm_zoo.share_line(rows, "hat_parameter_share", lambda r: f"{r['model']}, {r['attn']}, padded "
                                 f"{r['padded']}"), "", *timm_zoo.provenance(meta, "hf_zoo.py"),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c).replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Reason codes", ""] + [f"- `{code}`: {why}" for code, why in REASONS.items()]
    (RESULTS / "hf_zoo.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per architecture (all settings)")
    parser.add_argument("--known-only", action="store_true",
                        help="only the known input maps (hatify.explain), merged into hf_zoo.json")
    parser.add_argument("--merge", action="store_true", help="update the rows of an existing hf_zoo.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--known-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.out)
        return 0
    if args.known_worker:
        timm_zoo.known_worker(args.known_worker.split(","), args.out, known_of_model)
        return 0
    names = [entry[0] for entry in ZOO]
    chosen = args.models.split(",") if args.models else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"unknown models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.known_only:
        return main_known(chosen, args.timeout)
    rows = []
    for name in chosen:
        for row in run_model(name, args.timeout):
            rows.append(row)
            mark = "pass" if row["status"] == "pass" else f"FAIL {row['reason']}: {row['why'][:150]}"
            share = row.get("hat_parameter_share")
            print(f"{name:14s} {row.get('attn', '-'):6s} padded={row.get('padded', '-')!s:5s} "
                  f"share={'-' if share is None else f'{share:.3f}'} {mark}", flush=True)
    known_run = None
    if args.merge and (RESULTS / "hf_zoo.json").exists():
        previous = json.loads((RESULTS / "hf_zoo.json").read_text())
        kept = [r for r in previous["rows"] if r["model"] not in chosen and r["model"] in names]
        rows = sorted(kept + rows, key=lambda r: names.index(r["model"]))  # stable: settings keep their order
        known_run = previous.get("known_run")  # the rows kept from before still hold its known columns
    write_results(rows, known_run)
    print(f"{sum(r['status'] == 'pass' for r in rows)} / {len(rows)} settings pass")
    return 0


def main_known(chosen: list[str], timeout: float) -> int:
    """`--known-only`: the known columns of `chosen` architectures in every setting, merged into hf_zoo.json."""
    path = RESULTS / "hf_zoo.json"
    if not path.exists():
        print("--known-only merges into hf_zoo.json: run the full zoo first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    values = timm_zoo.run_known(__file__, chosen, timeout)
    run = {**timm_zoo.known_run("hf_zoo.py"), "seconds": round(time.perf_counter() - start)}
    rows = json.loads(path.read_text())["rows"]
    for row in rows:
        if row["model"] not in values:
            continue
        value = values[row["model"]]
        setting = next((e for e in value.get("settings", []) if (e["attn"], e["padded"]) == (row.get("attn"),
                                                                                          row.get("padded"))), value)
        if row["status"] == "skip" and "known_error" in setting:  # the setting does not exist: nothing to measure
            setting = None
        timm_zoo.merge_known(row, setting and {k: v for k, v in setting.items() if k not in ("attn", "padded")})
    write_results(rows, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
