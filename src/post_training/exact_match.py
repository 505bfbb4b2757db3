"""Exact-match accuracy of greedy generations on a dataset's eval split: the scoring behind
``python -m post_training.evaluate`` and the end-of-training evaluation of the train entrypoints.

Prompts are the conversation up to the last assistant turn, rendered with the checkpoint's own
chat template; the prediction is compared with the row's answer field (default: the content of
the last assistant turn) after stripping whitespace. Results, overall and per task, are printed
and written as JSON next to the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from post_training.data_sft.training_data import read_eval_rows
from post_training.errors import ConfigError
from post_training.modeling.loading import torch_dtype, whole_under_zero3
from post_training.utils.atomic import atomic_write_json
from post_training.utils.progress import ItemProgress
from post_training.utils.tracking import MetricsLogger

log = logging.getLogger(__name__)


def _expected(row: dict[str, Any], dataset_cfg: dict[str, Any]) -> str:
    field = dataset_cfg.get("answer_field")
    if field and field in row:
        return str(row[field])
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant")


def _prompt(row: dict[str, Any], dataset_cfg: dict[str, Any]) -> list[dict[str, str]]:
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


@torch.no_grad()
def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    dataset_cfg: dict[str, Any],
    max_new_tokens: int = 16,
    batch_size: int = 200,
) -> dict[str, Any]:
    """Greedy-decode every prompt and score exact match, overall and per ``task_field``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits: dict[str, list[int]] = defaultdict(list)
    samples = []
    progress = ItemProgress("exact match", len(rows), "examples")
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    _prompt(r, dataset_cfg), tokenize=False, add_generation_prompt=True
                )
                for r in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=False,  # a whole model on one process, even in a ZeRO-3 launch
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for row, ids in zip(chunk, new, strict=True):
                prediction = tokenizer.decode(ids, skip_special_tokens=True).strip()
                expected = _expected(row, dataset_cfg).strip()
                hit = int(prediction == expected)
                hits["all"].append(hit)
                task_field = dataset_cfg.get("task_field")
                if task_field and task_field in row:
                    hits[f"task/{row[task_field]}"].append(hit)
                if len(samples) < 8:
                    samples.append({"expected": expected, "prediction": prediction})
            progress.update(len(chunk))
        progress.finish()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    result: dict[str, Any] = {
        "num_examples": len(hits["all"]),
        "max_new_tokens": max_new_tokens,
        "accuracy": sum(hits["all"]) / max(len(hits["all"]), 1),
        "per_task": {k[5:]: sum(v) / len(v) for k, v in sorted(hits.items()) if k != "all"},
        "samples": samples,
    }
    return result


def default_output_file(model_path: Path, dataset_name: str) -> Path:
    return Path(model_path) / f"eval-{dataset_name}.json"


def write_result(result: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, result)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in result["per_task"].items())
    print(
        f"Exact-match accuracy {result['accuracy']:.3f} on {result['num_examples']} examples"
        + (f" ({summary})" if summary else "")
        + f"; written to {path}",
        flush=True,
    )


def evaluate_checkpoint(
    model_path: Path,
    dataset_cfg: dict[str, Any],
    max_examples: int | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 200,
    dtype: str = "float32",
    output_file: Path | None = None,
) -> dict[str, Any]:
    """Load a saved checkpoint, score it on the eval split, write the JSON next to it."""
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"model_path {model_path}: no config.json (not a model checkpoint)")
    rows = read_eval_rows(dataset_cfg, max_examples)
    if not rows:
        raise ConfigError(f"dataset {dataset_cfg['name']}: no eval split to evaluate on")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with whole_under_zero3():  # the main process alone, after a ZeRO-3 run: no zero.Init
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype(dtype), use_safetensors=True
        )
    if torch.cuda.is_available():
        model = model.cuda()
    result = generation_accuracy(model, tokenizer, rows, dataset_cfg, max_new_tokens, batch_size)
    result.update(model_path=str(model_path), dataset=dataset_cfg["name"])
    write_result(result, output_file or default_output_file(model_path, dataset_cfg["name"]))
    return result


def evaluate_final_model(
    model_path: Path,
    dataset_cfg: dict[str, Any],
    evaluation: dict[str, Any],
    dtype: str,
    metrics: MetricsLogger,
    step: int,
    start: tuple[Path, Path] | None = None,
) -> None:
    """End of training: score the saved final model (``evaluation.max_examples``,
    ``max_new_tokens``, ``batch_size``) and log ``eval_accuracy`` (and per task) at ``step``.

    ``start = (start model dir, run dir)``: also the model training began from
    (:func:`start_accuracy`), logged as ``eval_accuracy_start`` / ``eval_accuracy_gain`` and
    printed beside the final one, so a run that made its model worse says so."""
    options = (
        evaluation["max_examples"],
        int(evaluation["max_new_tokens"]),
        int(evaluation["batch_size"]),
        dtype,
    )
    result = evaluate_checkpoint(model_path, dataset_cfg, *options)
    values = {"eval_accuracy": result["accuracy"]} | {
        f"eval_accuracy/{k}": v for k, v in result["per_task"].items()
    }
    if start is not None:
        before = start_accuracy(start[0], start[1], dataset_cfg, result["num_examples"], *options)
        gain = result["accuracy"] - before["accuracy"]
        values |= {"eval_accuracy_start": before["accuracy"], "eval_accuracy_gain": gain}
        print(
            f"Exact-match accuracy {result['accuracy']:.3f} after training, "
            f"{before['accuracy']:.3f} at the start ({start[0]}): "
            f"{'+' if gain >= 0 else ''}{gain:.3f}"
            + ("" if gain > 0 else " (training did not improve it)"),
            flush=True,
        )
    metrics.log(values, step)


def start_accuracy(
    start_model: Path,
    run_dir: Path,
    dataset_cfg: dict[str, Any],
    num_examples: int,
    max_examples: int | None,
    max_new_tokens: int,
    batch_size: int,
    dtype: str,
) -> dict[str, Any]:
    """The exact match of the model a run started from: the start checkpoint's own
    ``eval-<dataset>.json`` when it scored the same ``num_examples`` (those the final model was
    just scored on) with the same ``max_new_tokens`` (e.g. written by the SFT run that saved
    it), else scored now and written to the run dir as ``eval-start-<dataset>.json`` (never into
    the start checkpoint)."""
    import json

    saved = default_output_file(start_model, dataset_cfg["name"])
    if saved.is_file():
        try:
            result = json.loads(saved.read_text())
        except (OSError, ValueError):
            result = {}
        if (
            result.get("num_examples") == num_examples
            and result.get("max_new_tokens") == max_new_tokens
        ):
            return result
    return evaluate_checkpoint(
        start_model,
        dataset_cfg,
        max_examples,
        max_new_tokens,
        batch_size,
        dtype,
        output_file=Path(run_dir) / f"eval-start-{dataset_cfg['name']}.json",
    )
