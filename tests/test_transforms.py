"""Format transforms to canonical messages, their validation errors, and user transforms."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from datasets import Dataset

from post_training.data_sft.mixing import load_dataset_split
from post_training.data_sft.transforms import (
    TRANSFORMS,
    apply_transform,
    get_transform,
    register_transform,
)
from post_training.errors import DataError

from .conftest import assistant, system, user


def run(name: str, row: dict, **args) -> list[dict[str, str]]:
    return apply_transform(Dataset.from_list([row]), name, args)[0]["messages"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_drops_extra_keys_and_maps_roles() -> None:
    row = {
        "chat": [
            {"role": "developer", "content": "Be brief.", "name": "x"},
            user("hi"),
            assistant("hello"),
        ]
    }
    assert run("messages", row, field="chat", role_map={"developer": "system"}) == [
        system("Be brief."),
        user("hi"),
        assistant("hello"),
    ]


def test_sharegpt_maps_roles_with_overrides_and_system_field() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "bot", "value": "a2"},
        ],
        "sys": "Be nice.",
    }
    assert run("sharegpt", row, role_map={"bot": "assistant"}, system_field="sys") == [
        system("Be nice."),
        user("q1"),
        assistant("a1"),
        user("q2"),
        assistant("a2"),
    ]
    with pytest.raises(DataError, match=r"field 'conversations\[3\].from': unknown role 'bot'"):
        run("sharegpt", row)


def test_alpaca_with_and_without_input_and_system_prompt() -> None:
    with_input = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert run("alpaca", with_input) == [user("Translate.\n\nbonjour"), assistant("hello")]
    for empty in ({"input": ""}, {"input": None}, {}):
        row = {"instruction": "Say hi.", "output": "hi", **empty}
        assert run("alpaca", row) == [user("Say hi."), assistant("hi")]
    assert run("alpaca", with_input, system_prompt="You translate.")[0] == system("You translate.")


def test_alpaca_recognises_dolly_columns_on_real_rows() -> None:
    """databricks-dolly-15k (tests/fixtures/data/dolly_15k_first4.jsonl): instruction + context
    (when non-empty) -> user, response -> assistant; explicit fields still win."""
    path = Path(__file__).parent / "fixtures" / "data" / "dolly_15k_first4.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first = run("alpaca", rows[0])
    assert first == [
        user(rows[0]["instruction"] + "\n\n" + rows[0]["context"]),
        assistant(rows[0]["response"]),
    ]
    assert first[0]["content"].startswith("When did Virgin Australia start operating?\n\nVirgin")
    assert run("alpaca", rows[1]) == [
        user("Which is a species of fish? Tope or Rope"),
        assistant("Tope"),
    ]
    dolly_and_output = {**rows[1], "output": "Rope"}  # both layouts: Alpaca's columns first
    assert run("alpaca", dolly_and_output)[1] == assistant("Rope")
    explicit = run("alpaca", dolly_and_output, input_field="context", output_field="response")
    assert explicit[1] == assistant("Tope")
    with pytest.raises(DataError, match="field 'output': missing field"):
        run("alpaca", {"instruction": "Say hi.", "answer": "hi"})


def test_prompt_completion_plain_and_conversational() -> None:
    assert run("prompt_completion", {"prompt": "2+2=", "completion": "4"}) == [
        user("2+2="),
        assistant("4"),
    ]
    conversational = {
        "prompt": [system("Be exact."), user("2+2?")],
        "completion": [assistant("4")],
    }
    assert run("prompt_completion", conversational) == [
        system("Be exact."),
        user("2+2?"),
        assistant("4"),
    ]
    bad = {"prompt": [user("2+2?")], "completion": [user("4")]}
    with pytest.raises(DataError, match=r"completion\[0\].role': completion messages must be"):
        run("prompt_completion", bad)


def test_qa_auto_detects_fields_or_takes_them() -> None:
    assert run("qa", {"question": "q", "answer": "a"}) == [user("q"), assistant("a")]
    assert run("qa", {"input": "i", "output": "o"}) == [user("i"), assistant("o")]
    assert run("qa", {"prompt": "2+2?", "answer": "4"}) == [user("2+2?"), assistant("4")]
    assert run("qa", {"question": "q", "prompt": "p", "answer": "a"})[0] == user("q")
    assert run("qa", {"ask": "q", "say": "a"}, question_field="ask", answer_field="say") == [
        user("q"),
        assistant("a"),
    ]
    with pytest.raises(DataError, match="looked for question/answer or input/output"):
        run("qa", {"foo": "x"})


def test_text_is_one_text_message(tmp_path: Path) -> None:
    assert run("text", {"text": "Once upon a time."}) == [
        {"role": "text", "content": "Once upon a time."}
    ]
    doc = tmp_path / "doc.txt"
    doc.write_text("line one\nline two\n")
    ds, _ = load_dataset_split({"path": str(doc), "transform": "text"})
    assert ds[0]["messages"] == [{"role": "text", "content": "line one\nline two\n"}]


def test_keep_columns_from_row_or_transform_output_and_source() -> None:
    ds = Dataset.from_list([{"messages": [user("q"), assistant("a")], "answer": "a"}])
    out = apply_transform(ds, "messages", keep_columns=["answer", "task"], source="mine")
    assert out[0] == {
        "messages": [user("q"), assistant("a")],
        "source": "mine",
        "answer": "a",
        "task": None,
    }


def test_missing_field_names_file_line_field_and_fields_present(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "a", "input": "", "output": "b"},
            {"instruction": "c", "input": "d", "outptu": "e"},
        ],
    )
    with pytest.raises(DataError) as err:
        load_dataset_split({"path": str(path), "transform": "alpaca"}, where="dataset.train")
    text = str(err.value)
    assert f"{path}:2" in text
    assert "field 'output': missing field" in text
    assert "fields present: instruction, input, outptu" in text
    assert "dataset.train" in text


def test_row_index_named_for_a_saved_dataset(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    Dataset.from_list([{"messages": [user("q"), assistant("a")]}, {"messages": None}]).save_to_disk(
        str(saved)
    )
    with pytest.raises(DataError, match=r"saved\[train\] row 2: field 'messages': missing field"):
        load_dataset_split({"path": str(saved)})  # the second row: 1-based
    with pytest.raises(DataError, match=r"^mem row 2: field 'messages': missing field"):
        apply_transform(
            Dataset.from_list([{"messages": [user("q"), assistant("a")]}, {}]), where="mem"
        )


def test_qa_missing_answer_column_names_the_answer_field(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question\nadd 1+2\n")
    with pytest.raises(DataError) as err:
        load_dataset_split({"path": str(path), "transform": "qa"}, where="dataset.train")
    assert str(err.value).endswith(
        f": {path}:2: field 'answer': missing field (paired with 'question') (transform 'qa'; "
        "fields present: question; the data has no column 'answer')"
    )
    # Rows of one file share one schema: each row's own pair is found, a half pair named.
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"question": "q", "answer": "a"}, {"input": "i", "output": "o"}, {"input": "j"}],
    )
    with pytest.raises(DataError) as err:
        load_dataset_split({"path": str(path), "transform": "qa"})
    assert f"{path}:3: field 'output': missing field (paired with 'input')" in str(err.value)
    assert str(err.value).endswith("(transform 'qa'; fields present: input)")
    write_jsonl(path, [{"question": "q", "answer": "a"}, {"input": "i", "output": "o"}])
    ds, _ = load_dataset_split({"path": str(path), "transform": "qa"})
    assert [r["messages"][1]["content"] for r in ds] == ["a", "o"]


@pytest.mark.parametrize(
    "messages,message",
    [
        ([user("q"), {"role": "assistant", "content": 3}], "field 'messages[1].content' is a num"),
        ([user("q"), {"role": "bot", "content": "a"}], "field 'messages[1].role': unknown role"),
        ([user("q")], "no assistant message to train on"),
        ([{"role": "text", "content": "a"}, user("b")], "'text' message must be the only"),
    ],
)
def test_bad_messages_name_row_and_field(tmp_path: Path, messages: list, message: str) -> None:
    good = {"messages": [user("q"), assistant("a")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError) as err:
        load_dataset_split({"path": str(path)})
    assert f"{path}:2" in str(err.value)
    assert message in str(err.value)


def test_unknown_transform_lists_the_available_ones() -> None:
    with pytest.raises(DataError) as err:
        get_transform("alpacca")
    for name in ("alpaca", "messages", "prompt_completion", "qa", "sharegpt", "text"):
        assert name in str(err.value)


def test_register_transform_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_transform("alpaca")(lambda row: row)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_transforms.py").write_text(
        textwrap.dedent(
            """
            from post_training.data_sft.transforms import register_transform


            @register_transform("test_upper_qa")
            def upper_qa(row, suffix=""):
                return {"messages": [
                    {"role": "user", "content": row["q"].upper()},
                    {"role": "assistant", "content": row["a"] + suffix},
                ]}


            def reversed_qa(row):
                return {"messages": [
                    {"role": "user", "content": row["a"]},
                    {"role": "assistant", "content": row["q"]},
                ], "task": "reversed"}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_transforms"


def test_user_transform_registered_from_a_module(tmp_path: Path, user_module: str) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hi", "a": "yo"}])
    spec = {
        "path": str(path),
        "transform": "test_upper_qa",
        "transform_module": user_module,
        "transform_args": {"suffix": "!"},
    }
    ds, _ = load_dataset_split(spec)
    assert ds[0]["messages"] == [user("HI"), assistant("yo!")]
    assert "test_upper_qa" in TRANSFORMS
    # Rows share one schema: a key missing from a row reads as None.
    write_jsonl(path, [{"q": "hi", "a": "yo"}, {"question": "x"}])
    with pytest.raises(DataError) as err:
        load_dataset_split(spec)
    assert "qa.jsonl:2: transform 'test_upper_qa' failed with AttributeError" in str(err.value)
    assert "(fields present: question)" in str(err.value)


def test_user_transform_by_import_path(tmp_path: Path, user_module: str) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hi", "a": "yo"}])
    spec = {"path": str(path), "transform": f"{user_module}:reversed_qa", "keep_columns": ["task"]}
    ds, _ = load_dataset_split(spec)
    assert ds[0]["messages"] == [user("yo"), assistant("hi")]
    assert ds[0]["task"] == "reversed"
    with pytest.raises(DataError, match="has no function 'nope'"):
        load_dataset_split({**spec, "transform": f"{user_module}:nope"})


# --- Content blocks (tests/fixtures/data/README.md) -------------------------------------------

LLAVA = Path(__file__).parent / "fixtures" / "data" / "llava_instruct_mix_vsft_messages.jsonl"


def test_text_content_blocks_are_joined(tmp_path: Path) -> None:
    """A real HF-style row without its image block: each message's text blocks joined, and the
    conversation templates and tokenizes (it used to fail inside the Jinja template)."""
    from transformers import AutoTokenizer

    from post_training.data_sft.tokenize import tokenize_chat
    from post_training.utils.config import asset_path

    row = json.loads(LLAVA.read_text())
    first = row["messages"][0]
    text_only = {"messages": [{**first, "content": first["content"][:1]}, *row["messages"][1:]]}
    ds, _ = load_dataset_split({"path": str(write_jsonl(tmp_path / "llava.jsonl", [text_only]))})
    messages = ds[0]["messages"]
    assert messages[:4] == [
        user("Who wrote this book?\n"),
        assistant("Donna Eden"),
        user("What is the title of this book?"),
        assistant("The Energies of Love: Using Energy Medicine to Keep Your Relationship Thriving"),
    ]
    assert messages[-1] == assistant("Yes") and len(messages) == 8
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    example = tokenize_chat(messages, tokenizer)
    assert tokenizer.decode(example["input_ids"][example["completion_mask"] == 1]).startswith(
        "Donna Eden<|end|>"
    )
    # Several blocks in one message are concatenated; "value" holds the text in some exports.
    two = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Who wrote "}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Donna Eden"}]},
        ]
    }
    two["messages"][0]["content"].append({"type": "text", "text": "this book?"})
    assert run("messages", two) == [user("Who wrote this book?"), assistant("Donna Eden")]


def test_string_and_block_contents_mixed_in_one_file_are_one_clear_line(tmp_path: Path) -> None:
    """Arrow stores a column with one type: a file mixing string and list contents stops at
    loading, naming the line and the field (a limitation of the Arrow-backed readers)."""
    row = json.loads(LLAVA.read_text())
    mixed = {"messages": [user("Who wrote this book?"), *row["messages"][1:]]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [mixed])
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages\[1\].content' is a list"):
        load_dataset_split({"path": str(path)})


def test_an_image_content_block_is_one_line_naming_file_row_field_and_type() -> None:
    with pytest.raises(DataError) as err:
        load_dataset_split({"path": str(LLAVA)}, where="dataset.train")
    message = str(err.value)
    assert f"{LLAVA}:1: field 'messages[0].content[1]': a content block of type 'image'" in message
    assert message.startswith("dataset.train") and "\n" not in message
