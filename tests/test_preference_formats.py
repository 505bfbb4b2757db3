"""Preference layouts on real rows (HH-RLHF, UltraFeedback-binarized, LLaMA-Factory ShareGPT pairs,
Orca columns, content blocks) to canonical pairs; user transforms named from the config; 1-based
rows in errors; ``data.truncation`` for over-long pairs. Fixtures: tests/fixtures/data/README.md."""

from __future__ import annotations

import json
import lzma
import re
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from post_training.data_preference.encode import (
    PairReport,
    describe_reports,
    encode_pairs,
    load_preference_data,
)
from post_training.data_preference.pairs import load_preference_pairs, validate_pair
from post_training.data_preference.transforms import (
    PREFERENCE_TRANSFORMS,
    as_messages,
    hh_rlhf,
    preference,
    register_preference_transform,
)
from post_training.data_sft.dataset_config import check_dataset_config
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.errors import DataError
from post_training.utils.config import asset_path

from .conftest import assistant, system, user

DATA = Path(__file__).parent / "fixtures" / "data"
LIMIT = 384  # model.max_seq_length of the truncation tests; the prompt limit is LIMIT - 1


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


@pytest.fixture(scope="module")
def hh_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hh") / "harmless-base-test.jsonl"
    with lzma.open(DATA / "hh_rlhf_harmless_base_test_first300.jsonl.xz") as handle:
        path.write_bytes(handle.read())
    return path


@pytest.fixture(scope="module")
def hh_rows(hh_path: Path) -> list[dict]:
    return [json.loads(line) for line in hh_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hh_pairs(hh_rows: list[dict]) -> list[dict]:
    """The canonical pairs of the 299 rows with a non-empty chosen reply (line 87's is empty)."""
    return [validate_pair(hh_rlhf(r), None) for i, r in enumerate(hh_rows) if i != 86]


# --- HH-RLHF ----------------------------------------------------------------------------------


def _hh_text(messages: list[dict[str, str]]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_hh_rlhf_transcripts_become_multi_turn_pairs(hh_path: Path, hh_rows: list[dict]) -> None:
    source = load_preference_pairs({"path": str(hh_path), "max_examples": 86}, "dataset.train")
    first = source.pairs[0]
    assert first["prompt"] == [
        user("what are some pranks with a pen i can do?"),
        assistant("Are you looking for practical joke ideas?"),
        user("yep"),
        first["prompt"][3],
        user("okay some of these do not have anything to do with pens"),
    ]
    assert first["prompt"][3]["role"] == "assistant"
    assert first["prompt"][3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert first["chosen"] == [
        assistant(
            "No, sorry!  All of these involve a pen, the point is that you can get funny results "
            "by doing pranks with pens."
        )
    ]
    for pair, row in zip(source.pairs, hh_rows, strict=False):
        # The pair is the transcript: prompt + reply give back each string (up to whitespace).
        for side in ("chosen", "rejected"):
            assert _squash(_hh_text(pair["prompt"] + pair[side])) == _squash(row[side])
        assert validate_pair(hh_rlhf(row), None) == pair  # the named transform: the same pair


def test_hh_rlhf_empty_reply_is_dropped_and_counted(hh_path: Path, hh_rows: list[dict]) -> None:
    """Real line 87 has an empty chosen reply: that pair is dropped and counted, the run goes on,
    and the other pairs keep their own lines in errors (pair 86 is line 88)."""
    source = load_preference_pairs({"path": str(hh_path)}, "dataset.train")
    assert source.dropped == {"empty_chosen": 1}
    assert len(source.pairs) == len(hh_rows) - 1
    assert source.locate(85) == f"{hh_path}:86" and source.locate(86) == f"{hh_path}:88"
    assert source.pairs[86] == validate_pair(hh_rlhf(hh_rows[87]), None)


def test_hh_rlhf_strings_that_do_not_share_the_prompt_are_an_error(
    tmp_path: Path, hh_rows: list[dict]
) -> None:
    mixed = {"chosen": hh_rows[0]["chosen"], "rejected": hh_rows[1]["rejected"]}
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_rows[2], mixed])
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(path)}, "dataset.train")
    message = str(err.value)
    assert message.startswith(
        f"dataset.train: {path}:2: field 'rejected': does not share the prompt"
    )
    assert "differ at turn 1" in message and "\n" not in message


def test_hh_rlhf_prompt_transcript_with_reply_strings(hh_rows: list[dict]) -> None:
    """The ``prompt`` + reply form (prompt transcript ending in ``Assistant:``) gives the same
    pair as the full transcripts."""
    pair = validate_pair(hh_rlhf(hh_rows[3]), None)
    prompt_text = _hh_text(pair["prompt"]) + "\n\nAssistant:"
    row = {
        "prompt": prompt_text,
        "chosen": " " + pair["chosen"][0]["content"],
        "rejected": " " + pair["rejected"][0]["content"],
    }
    assert validate_pair(preference(row), None) == pair


# --- UltraFeedback-binarized ------------------------------------------------------------------


@pytest.fixture
def ultrafeedback(tmp_path: Path) -> tuple[Path, dict]:
    row = json.loads((DATA / "ultrafeedback_binarized_train_prefs_row0.json").read_text())
    return write_jsonl(tmp_path / "ultrafeedback.jsonl", [row]), row


def test_ultrafeedback_prompt_is_taken_from_the_conversations(ultrafeedback) -> None:
    path, row = ultrafeedback
    (pair,) = load_preference_pairs({"path": str(path)}, "dataset.train").pairs
    assert pair == {
        "prompt": [user("how can i develop a habit of drawing daily")],
        "chosen": [assistant(row["chosen"][1]["content"])],
        "rejected": [assistant(row["rejected"][1]["content"])],
    }
    # prompt_field: null (take the prompt from the conversations) gives the same pair.
    explicit = {"path": str(path), "transform_args": {"prompt_field": None}}
    assert load_preference_pairs(explicit, "d").pairs == [pair]


def test_conversations_not_starting_with_the_prompt_are_an_error(ultrafeedback, tmp_path) -> None:
    _, row = ultrafeedback
    path = write_jsonl(tmp_path / "uf.jsonl", [{**row, "prompt": "how can i paint daily"}])
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(path)}, "dataset.train")
    assert str(err.value).startswith(
        f"dataset.train: {path}:1: field 'chosen': is a whole conversation that does not start "
        "with the 'prompt' text"
    )
    assert "prompt_field: null" in str(err.value)


# --- LLaMA-Factory ShareGPT pairs -------------------------------------------------------------

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def test_llamafactory_sharegpt_pairs(tmp_path: Path) -> None:
    path = DATA / "llamafactory_dpo_en_demo_first6.json"
    raw = json.loads(path.read_text())
    pairs = load_preference_pairs({"path": str(path)}, "dataset.train").pairs
    named = load_preference_pairs({"path": str(path), "transform": "sharegpt_pairs"}, "d").pairs
    assert pairs == named and len(pairs) == 6
    for pair, row in zip(pairs, raw, strict=True):
        assert pair["prompt"] == [
            {"role": ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]
        ]
        assert pair["chosen"] == [assistant(row["chosen"]["value"])]
        assert pair["rejected"] == [assistant(row["rejected"]["value"])]
    assert pairs[1]["prompt"][0]["role"] == "system"  # a system turn first
    assert [m["role"] for m in pairs[4]["prompt"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]  # multi-turn: earlier assistant turns are prompt


def test_sharegpt_pair_with_an_unknown_role_names_row_and_field(tmp_path: Path) -> None:
    raw = json.loads((DATA / "llamafactory_dpo_en_demo_first6.json").read_text())
    bad = {**raw[1], "chosen": {"from": "bot", "value": raw[1]["chosen"]["value"]}}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([raw[0], bad]))
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(path)}, "dataset.train")
    assert str(err.value).startswith(
        f"dataset.train: {path} row 2: field 'chosen.from': unknown role 'bot'"
    )


# --- Orca columns -----------------------------------------------------------------------------


def test_orca_pairs(tmp_path: Path) -> None:
    path = DATA / "orca_dpo_pairs_first2.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = load_preference_pairs({"path": str(path)}, "dataset.train").pairs
    assert pairs == load_preference_pairs({"path": str(path), "transform": "orca_pairs"}, "d").pairs
    assert raw[0]["system"] == ""  # no system message for an empty system
    assert pairs[0]["prompt"] == [user(raw[0]["question"])]
    assert pairs[1]["prompt"] == [system(raw[1]["system"]), user(raw[1]["question"])]
    for pair, row in zip(pairs, raw, strict=True):
        assert pair["chosen"] == [assistant(row["chosen"])]
        assert pair["rejected"] == [assistant(row["rejected"])]


# --- Content blocks ---------------------------------------------------------------------------


def test_content_blocks_are_joined_and_an_image_block_is_one_clear_error(
    tmp_path: Path, tokenizer
) -> None:
    path = DATA / "rlaif_v_formatted_blog_sample.jsonl"
    row = json.loads(path.read_text())
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(path)}, "dataset.train")
    message = str(err.value)
    assert message.startswith(
        f"dataset.train: {path}:1: field 'prompt[0].content[0]': a content block of type 'image'"
    )
    assert "\n" not in message
    # The same row without its image block: text blocks joined, and it tokenizes (no TypeError
    # inside the chat template).
    text_only = {
        **row,
        "prompt": [{**row["prompt"][0], "content": row["prompt"][0]["content"][1:]}],
    }
    text_path = write_jsonl(tmp_path / "rlaif.jsonl", [text_only])
    (pair,) = load_preference_pairs({"path": str(text_path)}, "d").pairs
    assert pair == {
        "prompt": [user("What should this catcher be using?")],
        "chosen": [assistant("The catcher in the image should be using a baseball glove...")],
        "rejected": [assistant("The catcher, identified by the number...")],
    }
    assert as_messages(row["chosen"], "chosen", "assistant") == pair["chosen"]
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(256))
    (encoded,) = encode_pairs([pair], encoder, "d", 255)
    trained = tokenizer.decode(encoded["input_ids"][encoded["completion_mask"] == 1])
    assert trained == (
        "The catcher in the image should be using a baseball glove...<|end|>"
        "The catcher, identified by the number...<|end|>"
    )


# --- User transforms --------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_preference_transforms.py").write_text(
        textwrap.dedent(
            """
            from post_training.data_preference.transforms import register_preference_transform


            @register_preference_transform("test_orca_upper")
            def orca_upper(row, suffix=""):
                return {
                    "prompt": row["question"].upper(),
                    "chosen": row["chosen"] + suffix,
                    "rejected": row["rejected"],
                }


            def swapped(row):
                return {"prompt": row["question"], "chosen": row["rejected"],
                        "rejected": row["chosen"], "chosen_reward": 0.0}


            def broken(row):
                return {"prompt": row["nope"]}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_preference_transforms"


def _config(train: dict, truncation: str = "drop", max_seq_length: int = 4096) -> dict:
    return {
        "model": {"chat_template": None, "max_seq_length": max_seq_length, "special_tokens": {}},
        "data": {"truncation": truncation, "non_alternating_roles": "merge"},
        "training_args": {"max_prompt_length": None},
        "dataset": {"name": "t", "train": train, "eval": None, "max_train_examples": None},
    }


def test_user_transform_module_named_from_the_config(user_module: str, tokenizer) -> None:
    path = DATA / "orca_dpo_pairs_first2.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    spec = {
        "path": str(path),
        "transform": "test_orca_upper",
        "transform_module": user_module,
        "transform_args": {"suffix": "!"},
    }
    check_dataset_config({"train": spec, "eval": None})  # the config's keys validate
    train, _, reports = load_preference_data(_config(spec), tokenizer)
    assert len(train) == 2 and reports["train"]["kept"] == 2
    assert "test_orca_upper" in PREFERENCE_TRANSFORMS
    (pair,) = load_preference_pairs({**spec, "max_examples": 1}, "d").pairs
    assert pair["prompt"] == [user(raw[0]["question"].upper())]
    assert pair["chosen"] == [assistant(raw[0]["chosen"] + "!")]
    # package.module:function, no decorator needed
    by_path = {"path": str(path), "transform": f"{user_module}:swapped"}
    pairs = load_preference_pairs(by_path, "d").pairs
    assert pairs[1]["chosen"] == [assistant(raw[1]["rejected"])]
    assert pairs[1]["chosen_reward"] == 0.0


def test_user_transform_errors_name_file_line_and_transform(user_module: str) -> None:
    path = DATA / "orca_dpo_pairs_first2.jsonl"
    with pytest.raises(DataError) as err:
        load_preference_pairs(
            {"path": str(path), "transform": f"{user_module}:broken"}, "dataset.train"
        )
    assert str(err.value).startswith(
        f"dataset.train: {path}:1: transform '{user_module}:broken' failed with KeyError: 'nope' "
        "(fields present: system, question, chosen, rejected)"
    )
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(path), "transform": "nope"}, "dataset.train")
    assert str(err.value).startswith("dataset.train.transform: unknown preference transform 'nope'")
    for name in ("hh_rlhf", "orca_pairs", "preference", "sharegpt_pairs", "tiny_task_pairs"):
        assert name in str(err.value)
    with pytest.raises(DataError, match="has no function 'missing'"):
        load_preference_pairs({"path": str(path), "transform": f"{user_module}:missing"}, "d")
    with pytest.raises(DataError, match="transform_module 'not_a_module_xyz' cannot be imported"):
        load_preference_pairs({"path": str(path), "transform_module": "not_a_module_xyz"}, "d")


def test_register_preference_transform_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="preference transform 'hh_rlhf' is already registered"):
        register_preference_transform("hh_rlhf")(lambda row: row)


# --- 1-based rows -----------------------------------------------------------------------------


def test_rows_are_one_based_for_parquet_and_json_lists(tmp_path: Path, ultrafeedback) -> None:
    _, row = ultrafeedback
    bad = {**row, "rejected": None}
    parquet = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist([row, bad]), parquet)
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(parquet)}, "dataset.train")
    assert str(err.value).startswith(f"dataset.train: {parquet} row 2: field 'rejected': missing")
    as_json = tmp_path / "uf.json"
    as_json.write_text(json.dumps([row, row, bad]))
    with pytest.raises(DataError) as err:
        load_preference_pairs({"path": str(as_json)}, "dataset.train")
    assert str(err.value).startswith(f"dataset.train: {as_json} row 3: field 'rejected': missing")


def test_a_column_missing_in_some_rows_names_the_file_line(tmp_path: Path, tokenizer) -> None:
    rows = [
        json.loads(line) for line in (DATA / "orca_dpo_pairs_first2.jsonl").read_text().splitlines()
    ]
    path = write_jsonl(tmp_path / "orca.jsonl", [{**rows[0], "ref_chosen_logps": -3.5}, rows[1]])
    with pytest.raises(DataError) as err:
        load_preference_data(_config({"path": str(path)}), tokenizer)
    assert (
        str(err.value)
        == f"dataset.train: {path}:2 has no 'ref_chosen_logps' while other rows have it"
    )


# --- Truncation -------------------------------------------------------------------------------


def _expected_reasons(pairs: list[dict], tokenizer, prompt_limit: int, limit: int) -> dict:
    """Drop reasons computed from the rendered texts alone (char-level tokenizer: one token per
    character or special token, so lengths add up exactly)."""

    def length(messages: list[dict], generation: bool) -> int:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    reasons: dict[str, int] = {}
    for pair in pairs:
        prompt = length(pair["prompt"], True)
        sides = [length(pair["prompt"] + pair[s], False) for s in ("chosen", "rejected")]
        reason = (
            "prompt_too_long"
            if prompt > prompt_limit
            else "too_long"
            if max(sides) > limit
            else None
        )
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _sides(pair: dict) -> tuple[dict, dict]:
    n = int(np.flatnonzero(pair["position_ids"] == 0)[1])
    return (
        {k: pair[k][:n] for k in ("input_ids", "completion_mask")},
        {k: pair[k][n:] for k in ("input_ids", "completion_mask")},
    )


def _prompt_ids(side: dict) -> np.ndarray:
    return side["input_ids"][: int(np.argmax(side["completion_mask"] == 1))]


def test_over_long_pairs_are_dropped_and_counted(hh_pairs: list[dict], tokenizer) -> None:
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(LIMIT, truncation="drop"))
    report = PairReport()
    pairs = encode_pairs(hh_pairs, encoder, "hh", LIMIT - 1, report)  # no error: a count
    expected = _expected_reasons(hh_pairs, tokenizer, LIMIT - 1, LIMIT)
    assert dict(report.dropped) == expected
    assert expected["prompt_too_long"] > 50 and expected["too_long"] > 20  # real lengths
    assert report.total == 299 and report.kept == len(pairs) == 299 - sum(expected.values())
    for pair in pairs:
        for side in _sides(pair):
            assert len(side["input_ids"]) <= LIMIT and len(_prompt_ids(side)) <= LIMIT - 1
    summary = report.summary("train")
    assert f"kept {len(pairs)} of 299 pairs" in summary
    assert f"prompt_too_long: {expected['prompt_too_long']}" in summary


def _check_truncated(original: list[dict], pairs: list[dict], bos_id: int, limit: int) -> int:
    """Every side within the limits, BOS kept, the prompt a tail of the original prompt shared by
    both sides, the reply intact when it fits. Returns how many pairs had their prompt cut."""
    cut = 0
    for before, after in zip(original, pairs, strict=True):
        sides_before, sides_after = _sides(before), _sides(after)
        prompts = [_prompt_ids(s) for s in sides_after]
        assert len(prompts[0]) == len(prompts[1])
        for old, new, prompt in zip(sides_before, sides_after, prompts, strict=True):
            assert len(new["input_ids"]) <= limit and len(prompt) <= limit - 1
            assert new["input_ids"][0] == bos_id == old["input_ids"][0]
            old_prompt = _prompt_ids(old)
            np.testing.assert_array_equal(
                prompt[1:], old_prompt[len(old_prompt) - len(prompt) + 1 :]
            )
            reply_old = old["input_ids"][len(old_prompt) :]
            reply_new = new["input_ids"][len(prompt) :]
            np.testing.assert_array_equal(reply_new, reply_old[: len(reply_new)])
            assert new["completion_mask"][len(prompt) :].all()
        cut += int(len(prompts[0]) < len(_prompt_ids(sides_before[0])))
    return cut


def test_over_long_pairs_are_truncated_keeping_the_prompt_tail(
    hh_pairs: list[dict], tokenizer
) -> None:
    unlimited = ChatEncoder(tokenizer, None, TokenizeOptions(1 << 20))
    original = encode_pairs(hh_pairs, unlimited, "hh", 1 << 20)
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(LIMIT, truncation="truncate"))
    report = PairReport()
    pairs = encode_pairs(hh_pairs, encoder, "hh", LIMIT - 1, report)
    expected = _expected_reasons(hh_pairs, tokenizer, LIMIT - 1, LIMIT)
    assert len(pairs) == report.kept == 299 and not report.dropped
    assert dict(report.truncated_by) == expected and report.truncated == sum(expected.values())
    cut = _check_truncated(original, pairs, tokenizer.bos_token_id, LIMIT)
    assert cut >= expected["prompt_too_long"]
    untouched = [
        i
        for i, p in enumerate(original)
        if all(len(s["input_ids"]) <= LIMIT and len(_prompt_ids(s)) < LIMIT for s in _sides(p))
    ]
    for i in untouched:
        np.testing.assert_array_equal(pairs[i]["input_ids"], original[i]["input_ids"])


def test_truncation_with_a_real_bpe_tokenizer(hh_pairs: list[dict]) -> None:
    real_tokenizers = pytest.importorskip("tests.real_tokenizers")
    try:
        tokenizer = real_tokenizers.load_real_tokenizer("llama-3.1")
    except (FileNotFoundError, KeyError) as err:
        pytest.skip(f"no llama-3.1 tokenizer fixture: {err}")
    drop = PairReport()
    encode_pairs(
        hh_pairs, ChatEncoder(tokenizer, None, TokenizeOptions(LIMIT)), "hh", LIMIT - 1, drop
    )
    assert drop.dropped["prompt_too_long"] > 0 and drop.dropped["too_long"] > 0
    original = encode_pairs(
        hh_pairs, ChatEncoder(tokenizer, None, TokenizeOptions(1 << 20)), "hh", 1 << 20
    )
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(LIMIT, truncation="truncate"))
    report = PairReport()
    pairs = encode_pairs(hh_pairs, encoder, "hh", LIMIT - 1, report)
    assert report.kept == 299 and dict(report.truncated_by) == dict(drop.dropped)
    _check_truncated(original, pairs, tokenizer.bos_token_id, LIMIT)  # <|begin_of_text|> kept


def test_data_truncation_from_the_config(hh_path: Path, tokenizer) -> None:
    spec = {"path": str(hh_path), "max_examples": 86}
    _, _, dropped = load_preference_data(_config(spec, "drop", LIMIT), tokenizer)
    train, _, truncated = load_preference_data(_config(spec, "truncate", LIMIT), tokenizer)
    assert len(train) == truncated["train"]["kept"] == 86
    assert truncated["train"]["truncated_by"] == dropped["train"]["dropped"]
    assert dropped["train"]["kept"] == 86 - sum(dropped["train"]["dropped"].values())
    text = describe_reports(truncated)
    assert text.startswith(
        f"train pairs: 86 of 86 kept, {truncated['train']['truncated']} truncated"
    )
