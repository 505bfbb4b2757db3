"""Preference pairs: canonical rows, row-precise errors, and one padding-free forward per pair
that scores chosen and rejected exactly as two separate forwards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from post_training.data_preference.encode import PairReport, encode_pairs
from post_training.data_preference.pairs import (
    load_preference_pairs,
    load_preference_rows,
    validate_pair,
)
from post_training.data_preference.transforms import preference, tiny_task_pairs
from post_training.data_sft.collate import pad_collate
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions, tokenize_chat
from post_training.errors import DataError
from post_training.modeling.loading import load_model
from post_training.trainers.preference import pair_statistics
from post_training.trainers.sft import sft_forward
from post_training.utils.config import asset_path

USER = {"role": "user", "content": "add 1+2"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


def _write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_explicit_and_implicit_prompts_give_the_same_pair() -> None:
    explicit = preference({"prompt": "add 1+2", "chosen": "3", "rejected": "4"})
    implicit = preference(
        {
            "chosen": [USER, {"role": "assistant", "content": "3"}],
            "rejected": [USER, {"role": "assistant", "content": "4"}],
        }
    )
    assert (
        explicit
        == implicit
        == {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": "3"}],
            "rejected": [{"role": "assistant", "content": "4"}],
        }
    )


def test_tiny_task_pairs_are_wrong_deterministically() -> None:
    lines = Path(asset_path("tiny-tasks/eval.jsonl")).read_text().splitlines()[:200]
    rows = [json.loads(line) for line in lines]
    for row in rows:
        pair = tiny_task_pairs(row)
        assert pair["chosen"][0]["content"] == row["messages"][-1]["content"]
        assert pair["rejected"][0]["content"] != pair["chosen"][0]["content"]
        assert pair == tiny_task_pairs(row)  # same seed, same pair
    assert any(tiny_task_pairs(r, seed=1) != tiny_task_pairs(r) for r in rows)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "q", "rejected": "b"}, "pairs.jsonl:2: field 'chosen': missing field"),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "ref_rewards": [0.1]},
            "pairs.jsonl:2: field 'ref_rewards' has 1 values, expected 2",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_reward": math.nan},
            "pairs.jsonl:2: field 'chosen_reward' is nan",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "ref_rewards": [0.0, math.inf]},
            "pairs.jsonl:2: field 'ref_rewards' is inf",
        ),
    ],
)
def test_bad_pairs_name_file_row_and_field(tmp_path: Path, row: dict, message: str) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "ref_rewards": [0.0, 1.0]}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError) as err:
        load_preference_rows({"path": path}, "dataset.train")
    assert "pairs.jsonl" in str(err.value) and message in str(err.value)


def test_pair_files_with_bytes_that_are_not_utf8_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq,\xe9,b\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError) as err:
        load_preference_rows({"path": str(path)}, "dataset.train")
    assert str(err.value) == (
        f"dataset.train: {path}:3: not UTF-8 text (byte 0xe9 at column 3); "
        "re-encode the file as UTF-8"
    )


def test_a_pair_missing_a_field_lists_the_fields_it_has() -> None:
    with pytest.raises(DataError) as err:  # e.g. a user transform that returns no 'rejected'
        validate_pair({"prompt": "q", "chosen": "a", "chosen_reward": 1.0}, None)
    assert str(err.value) == (
        "field 'rejected': missing field (the pair's fields present: prompt, chosen, chosen_reward)"
    )


def test_pairs_with_an_empty_reply_are_dropped_and_counted(tmp_path: Path) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    rows = [good, {**good, "chosen": "  "}, {**good, "rejected": ""}, {**good, "chosen": "c"}]
    source = load_preference_pairs({"path": _write(tmp_path, rows)}, "dataset.train")
    assert source.dropped == {"empty_chosen": 1, "empty_rejected": 1}
    assert [p["chosen"][0]["content"] for p in source.pairs] == ["a", "c"]
    assert source.locate(1).endswith("pairs.jsonl:4")  # errors still name the row's own line
    with pytest.raises(DataError, match=r"no preference pairs \(dropped: \{'empty_chosen': 1\}\)"):
        load_preference_pairs({"path": _write(tmp_path, [{**good, "chosen": ""}])}, "dataset.train")


def test_quantile_rewards_from_reference_rewards(tmp_path: Path) -> None:
    row = {
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
        "chosen_reward": 0.5,
        "rejected_reward": 0.1,
        "ref_rewards": [0.0, 0.1, 0.5, 0.9],
    }
    (pair,) = load_preference_rows({"path": _write(tmp_path, [row])}, "d")
    assert pair["chosen_quantile_reward"] == 0.75  # 0.0, 0.1, 0.5 are <= 0.5 (ties count)
    assert pair["rejected_quantile_reward"] == 0.5


def test_prompt_longer_than_the_limit_is_dropped_or_truncated(tokenizer) -> None:
    rows = [preference({"prompt": "x" * n, "chosen": "a", "rejected": "b"}) for n in (3, 40)]
    report = PairReport()
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(64))  # data.truncation=drop
    (kept,) = encode_pairs(rows, encoder, "pairs", max_prompt_length=20, report=report)
    assert kept["row_index"] == 0 and dict(report.dropped) == {"prompt_too_long": 1}
    report = PairReport()
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(64, truncation="truncate"))
    _, cut = encode_pairs(rows, encoder, "pairs", max_prompt_length=20, report=report)
    n = int((cut["position_ids"] == 0).nonzero()[0][1])
    assert (
        tokenizer.decode(cut["input_ids"][:n])
        == "<|bos|>" + "x" * 17 + "<|end|><|assistant|>a<|end|>"
    )
    assert dict(report.truncated_by) == {"prompt_too_long": 1}


def test_one_forward_per_pair_equals_two_separate_forwards(tokenizer) -> None:
    cfg = {
        "model_name_or_path": str(asset_path("tiny-llama")),
        "init_from_config": True,
        "init_seed": 5,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
    }
    model = load_model(cfg, tokenizer).eval()
    system = {"role": "system", "content": "be brief"}
    rows = [
        preference({"prompt": "add 12+30", "chosen": "42", "rejected": "41"}),
        preference(
            {
                "prompt": [
                    system,
                    USER,
                    {"role": "assistant", "content": "3"},
                    {"role": "user", "content": "sort 321"},
                ],
                "chosen": "123",
                "rejected": "a much longer wrong answer",
            }
        ),
    ]
    encoder = ChatEncoder(tokenizer, None, TokenizeOptions(128))
    pairs = encode_pairs(rows, encoder, "pairs", max_prompt_length=127)
    # Only the replies are completion tokens (not the prompt's earlier assistant turn).
    second = pairs[1]
    trained = tokenizer.decode(second["input_ids"][second["completion_mask"] == 1])
    assert trained == "123<|end|>a much longer wrong answer<|end|>"
    with torch.no_grad():
        batch = pad_collate(pairs, tokenizer.pad_token_id)
        stats = pair_statistics(sft_forward(model, batch, chunk_size=16), batch)
        for i, row in enumerate(rows):
            for side in ("chosen", "rejected"):
                alone = tokenize_chat(row["prompt"] + row[side], tokenizer)
                prompt_text = encoder.render_prompt(row["prompt"])
                n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
                alone["completion_mask"][:n_prompt] = 0  # earlier assistant turns are prompt
                out = sft_forward(model, pad_collate([alone], tokenizer.pad_token_id))
                expected = (out["logps"] * out["completion"]).sum()
                torch.testing.assert_close(
                    stats[f"{side}_logps"][i], expected, atol=1e-5, rtol=1e-5
                )
                assert stats[f"{side}_lengths"][i] == out["completion"].sum()
