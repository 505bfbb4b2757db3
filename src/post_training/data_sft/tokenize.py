"""Chat templating and tokenization with exact prompt / completion masks.

Boundaries come from the template itself: for each assistant turn ``i`` the conversation up to
``i`` is rendered with the generation prompt, and the conversation including turn ``i`` without
it; the token ids between the two are that turn's completion (its content and end-of-turn token).
Every rendering must be a token-id prefix of the next, else the template is not prefix-stable and
masks could be wrong, so we refuse the example rather than guess.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from post_training.data_sft.messages import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(
    messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str = "example"
) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` (-100 off completions), ``prompt_mask``, ``completion_mask``."""
    messages = list(messages)
    input_ids = _encode(tokenizer, messages, generation=False)
    completion = [0] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message")
        start_ids = _encode(tokenizer, messages[:i], generation=True)
        end_ids = _encode(tokenizer, messages[: i + 1], generation=False)
        if end_ids[: len(start_ids)] != start_ids or input_ids[: len(end_ids)] != end_ids:
            raise DataError(
                f"{where}: the chat template is not prefix-stable at message {i}; "
                "cannot derive exact completion masks"
            )
        for pos in range(len(start_ids), len(end_ids)):
            completion[pos] = 1
    labels = [t if c else IGNORE_INDEX for t, c in zip(input_ids, completion, strict=True)]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_mask": [1 - c for c in completion],
        "completion_mask": completion,
    }


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    messages_field: str = "messages",
    source: str = "dataset",
) -> list[dict[str, list[int]]]:
    """Tokenize every row; rows longer than ``max_seq_length`` are dropped and counted."""
    out: list[dict[str, list[int]]] = []
    too_long = 0
    for index, row in enumerate(rows):
        example = tokenize_chat(row[messages_field], tokenizer, where=f"{source}: row {index}")
        if len(example["input_ids"]) > max_seq_length:
            too_long += 1
            continue
        out.append(example)
    if too_long:
        log.warning(
            "%s: dropped %d of %d examples longer than max_seq_length=%d",
            source,
            too_long,
            len(rows),
            max_seq_length,
        )
    if not out:
        raise DataError(f"{source}: no example fits max_seq_length={max_seq_length}")
    return out
