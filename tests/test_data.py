"""Reading chat data with precise errors; padded batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.messages import read_jsonl_messages
from post_training.data_sft.tokenize import tokenize_chat
from post_training.errors import DataError
from post_training.losses.constants import IGNORE_INDEX
from post_training.utils.config import asset_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


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


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path: Path) -> None:
    good = (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    )
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b'"a"', b'"\xff"') + b"\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xff at column 44\)"):
        read_jsonl_messages(path)
