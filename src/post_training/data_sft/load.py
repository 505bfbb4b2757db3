"""Load the train / eval splits named by a ``dataset/*.yaml`` config and tokenize them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from post_training.data_sft.messages import read_jsonl_messages
from post_training.data_sft.tokenize import tokenize_rows


@dataclass
class SFTData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]


def read_split(dataset_cfg: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """Validated rows of ``train`` or ``eval``, truncated to ``max_<split>_examples`` if set."""
    rows = read_jsonl_messages(dataset_cfg[f"{split}_path"], dataset_cfg["messages_field"])
    limit = dataset_cfg.get(f"max_{split}_examples")
    return rows[:limit] if limit else rows


def load_sft_data(
    dataset_cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> SFTData:
    train_rows = read_split(dataset_cfg, "train")
    eval_rows = read_split(dataset_cfg, "eval") if dataset_cfg.get("eval_path") else []
    field = dataset_cfg["messages_field"]
    return SFTData(
        train_rows=train_rows,
        eval_rows=eval_rows,
        train=tokenize_rows(
            train_rows, tokenizer, max_seq_length, field, dataset_cfg["train_path"]
        ),
        eval=(
            tokenize_rows(eval_rows, tokenizer, max_seq_length, field, dataset_cfg["eval_path"])
            if eval_rows
            else []
        ),
    )
