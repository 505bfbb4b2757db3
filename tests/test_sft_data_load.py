"""The SFT data of a run: config → sources → template + masks → filters → cache → [pack]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from post_training.data_sft import training_data
from post_training.data_sft.tokenize import ChatEncoder
from post_training.data_sft.training_data import load_sft_data, read_eval_rows
from post_training.errors import DataError
from post_training.modeling.loading import load_tokenizer
from post_training.utils.config import CONFIGS_DIR, register_resolvers


def _config(tmp_path: Path, **model_overrides) -> dict:
    register_resolvers()
    model = OmegaConf.load(CONFIGS_DIR / "model" / "tiny.yaml")
    dataset = OmegaConf.load(CONFIGS_DIR / "dataset" / "tiny-tasks.yaml")
    cfg = OmegaConf.create({"model": model, "dataset": dataset})
    cfg.dataset.max_train_examples = 300
    cfg.dataset.max_eval_examples = 40
    for key, value in model_overrides.items():
        cfg.model[key] = value
    cfg.data = {"truncation": "drop", "non_alternating_roles": "merge", "cache": True}
    cfg.data.cache_dir = str(tmp_path / "cache")
    return OmegaConf.to_container(cfg, resolve=True)


def test_second_load_hits_the_cache_and_key_follows_the_inputs(tmp_path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    tokenizer = load_tokenizer(cfg["model"])
    first = load_sft_data(cfg, tokenizer)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert len(first.train) == 300 and len(first.eval) == 40 and len(first.eval_rows) == 40

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(ChatEncoder, "encode", no_tokenizing)
    second = load_sft_data(cfg, tokenizer)
    assert [e["input_ids"].tolist() for e in second.train] == [
        e["input_ids"].tolist() for e in first.train
    ]
    assert [e["completion_mask"].tolist() for e in second.train] == [
        e["completion_mask"].tolist() for e in first.train
    ]
    assert second.eval_rows == first.eval_rows
    # Another template, max length or dataset size is another cache entry.
    for changed in (
        _config(tmp_path, chat_template="chatml"),
        _config(tmp_path, max_seq_length=64),
    ):
        key = training_data.cache_key(changed, tokenizer)
        assert key != training_data.cache_key(cfg, tokenizer)
    smaller = dict(cfg, dataset=dict(cfg["dataset"], max_train_examples=100))
    assert training_data.cache_key(smaller, tokenizer) != training_data.cache_key(cfg, tokenizer)


def test_cache_key_follows_the_source_files(tmp_path) -> None:
    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(row) + "\n")
    cfg = _config(tmp_path)
    cfg["dataset"]["train"] = {"path": str(data), "transform": "messages"}
    cfg["dataset"]["eval"] = None
    tokenizer = load_tokenizer(cfg["model"])
    key = training_data.cache_key(cfg, tokenizer)
    data.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert training_data.cache_key(cfg, tokenizer) != key
    assert len(load_sft_data(cfg, tokenizer).train) == 2


def test_packing_keeps_every_example_once(tmp_path) -> None:
    cfg = _config(tmp_path)
    tokenizer = load_tokenizer(cfg["model"])
    plain = load_sft_data(cfg, tokenizer)
    packed = load_sft_data(cfg, tokenizer, packing=True)
    assert len(packed.train) < len(plain.train) / 2
    assert sum(len(p["input_ids"]) for p in packed.train) == sum(
        len(e["input_ids"]) for e in plain.train
    )
    assert sum(int((p["position_ids"] == 0).sum()) for p in packed.train) == len(plain.train)
    assert all(len(p["input_ids"]) <= cfg["model"]["max_seq_length"] for p in packed.train)
    assert packed.reports["packing"]["efficiency"] > 0.9
    # Completion tokens are those of the documents, minus none (a document never starts with one).
    assert sum(int(p["completion_mask"].sum()) for p in packed.train) == sum(
        int(e["completion_mask"].sum()) for e in plain.train
    )


def test_nothing_left_after_filtering_is_an_error_before_training(tmp_path) -> None:
    cfg = _config(tmp_path, max_seq_length=8)
    tokenizer = load_tokenizer(cfg["model"])
    with pytest.raises(DataError, match=r"no training example left after filtering.*too_long"):
        load_sft_data(cfg, tokenizer)


def test_eval_rows_keep_answer_and_task(tmp_path) -> None:
    rows = read_eval_rows(_config(tmp_path)["dataset"])
    assert len(rows) == 40
    assert {"messages", "answer", "task", "source"} <= set(rows[0])


def test_inspect_shows_every_stage_and_token_stats(tmp_path) -> None:
    from tests.conftest import run_entrypoint

    out = run_entrypoint(
        "data_sft.inspect", ["num_samples=2", "dataset.max_train_examples=50"], tmp_path
    ).stdout
    for stage in ("--- raw ---", "--- messages ---", "--- templated text ---", "--- tokens:"):
        assert out.count(stage) == 2
    assert "<|assistant|>[[" in out and "<|end|>]]" in out  # the trained part is marked

    out = run_entrypoint(
        "data_sft.inspect",
        ["mode=token_stats", "dataset.max_train_examples=500", "model.max_seq_length=40"],
        tmp_path,
    ).stdout
    assert "tiny-tasks/train:" in out and "generation ratio" in out and "packing at 40" in out
    (stats_file,) = tmp_path.rglob("token_stats.json")
    stats = json.loads(stats_file.read_text())
    assert stats["examples"] + sum(stats["filters"]["dropped"].values()) == 500
    assert stats["filters"]["dropped"]["too_long"] > 0
    assert set(stats["prompt_length"]) == {"p50", "p90", "p99", "p100"}
    assert 0.5 < stats["packing"]["efficiency"] <= 1.0
    assert (stats_file.parent / "token_stats.png").stat().st_size > 1000


def test_rows_with_an_empty_user_or_assistant_turn_are_dropped_and_counted(
    tmp_path, caplog
) -> None:
    def chat(question: str, reply: str, system: str | None = None) -> dict:
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return {
            "messages": ([{"role": "system", "content": system}] if system is not None else [])
            + turns
        }

    rows = [
        chat("add 1+2", "3"),
        chat("", "4"),  # empty user turn
        chat("add 2+2", " \n"),  # whitespace-only reply
        chat("add 3+3", "6", system=""),  # an empty system prompt is no turn to learn: kept
        chat("add 4+4", "8"),
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path)
    cfg["dataset"]["train"] = {"path": str(data), "transform": "messages"}
    cfg["dataset"]["eval"] = {"path": str(data), "transform": "messages"}
    tokenizer = load_tokenizer(cfg["model"])
    with caplog.at_level("INFO", logger="post_training.data_sft.training_data"):
        loaded = load_sft_data(cfg, tokenizer)
    for split in ("train", "eval"):
        report = loaded.reports[split]
        assert report["dropped"] == {"empty_user_turn": 1, "empty_assistant_turn": 1}
        assert report["total"] == 5 and report["kept"] == 3
    assert "dropped: empty_assistant_turn: 1, empty_user_turn: 1" in caplog.text
    assert len(loaded.train) == len(loaded.eval) == 3
    replies = [r["messages"][-1]["content"] for r in loaded.eval_rows]
    assert replies == ["3", "6", "8"]  # the dropped rows are absent
