"""Reading chat data with precise errors; exact prompt / completion masks from the template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.messages import DataError, read_jsonl_messages
from post_training.data_sft.tokenize import IGNORE_INDEX, tokenize_chat, tokenize_rows
from post_training.utils.config import asset_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


def test_multi_turn_masks_cover_each_assistant_turn_and_its_end_token(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 1+2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "sort 321"},
        {"role": "assistant", "content": "123"},
    ]
    ex = tokenize_chat(messages, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ex["input_ids"])
    completion = [t for t, c in zip(tokens, ex["completion_mask"], strict=True) if c]
    assert completion == ["3", "<|end|>", "1", "2", "3", "<|end|>"]
    prompt = "".join(t for t, p in zip(tokens, ex["prompt_mask"], strict=True) if p)
    assert prompt == (
        "<|bos|><|system|>Be brief.<|end|><|user|>add 1+2<|end|><|assistant|>"
        "<|user|>sort 321<|end|><|assistant|>"
    )
    assert all(p + c == 1 for p, c in zip(ex["prompt_mask"], ex["completion_mask"], strict=True))
    for label, token_id, c in zip(
        ex["labels"], ex["input_ids"], ex["completion_mask"], strict=True
    ):
        assert label == (token_id if c else IGNORE_INDEX)
    # EOS (end of turn) is learned and differs from the padding id.
    assert tokenizer.eos_token_id in [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_collate_pads_right_and_never_trains_on_padding(tokenizer) -> None:
    short = tokenize_chat(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenizer
    )
    long = tokenize_chat(
        [{"role": "user", "content": "reverse abcdef"}, {"role": "assistant", "content": "fedcba"}],
        tokenizer,
    )
    batch = pad_collate([short, long], tokenizer.pad_token_id)
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["completion_mask"][0, n:] == 0).all()


def test_too_long_examples_are_dropped_and_counted(tokenizer, caplog) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y"}]}
        for n in (2, 50)
    ]
    kept = tokenize_rows(rows, tokenizer, max_seq_length=20, source="mem")
    assert len(kept) == 1
    assert "dropped 1 of 2" in caplog.text


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            "data.jsonl:2: field 'messages[1].role' must be one of",
        ),
        (
            '{"messages": [{"role": "user", "content": 3}]}',
            "data.jsonl:2: field 'messages[0].content'",
        ),
        ('{"text": "hi"}', "data.jsonl:2: missing field 'messages'"),
        (
            '{"messages": [{"role": "user", "content": "a"}]}',
            "data.jsonl:2: field 'messages' has no assistant",
        ),
        ("{not json", "data.jsonl:2: invalid JSON"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl_messages(path)
    assert message in str(err.value)
