"""Tests of the embedded tiny default: the tiny-tasks dataset and the tiny-llama files."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import post_training  # noqa: F401
except ImportError:  # pragma: no cover - package not installed, run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import AutoConfig, AutoTokenizer

from post_training.data_sft import tiny_tasks
from post_training.modeling import tiny_model

DATA_DIR = tiny_tasks.DEFAULT_OUTPUT_DIR
MODEL_DIR = tiny_model.DEFAULT_OUTPUT_DIR


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return {name: tiny_tasks.read_jsonl(DATA_DIR / f"{name}.jsonl") for name in tiny_tasks.SPLITS}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_dataset_regenerates_identically(tmp_path: Path) -> None:
    tiny_tasks.main(["--output-dir", str(tmp_path)])
    assert _files(tmp_path) == _files(DATA_DIR)


def test_model_files_regenerate_identically(tmp_path: Path) -> None:
    tiny_model.main(["--output-dir", str(tmp_path)])
    committed = _files(MODEL_DIR)
    assert "config.json" in committed and "tokenizer.json" in committed
    assert _files(tmp_path) == committed


def test_generation_is_deterministic_and_seeded() -> None:
    a = tiny_tasks.generate_splits(seed=1, n_train=40, n_eval=8)
    assert a == tiny_tasks.generate_splits(seed=1, n_train=40, n_eval=8)
    assert a != tiny_tasks.generate_splits(seed=2, n_train=40, n_eval=8)
    assert [len(a["train"]), len(a["eval"])] == [40, 8]


def test_split_shapes(splits: dict[str, list[dict[str, Any]]]) -> None:
    for examples in splits.values():
        for example in examples:
            messages = example["messages"]
            assert messages[-1]["role"] == "assistant"
            assert messages[-1]["content"] == example["answer"]
            assert messages[-2]["role"] == "user"
            assert example["task"] in tiny_tasks.TASKS
            assert set("".join(m["content"] for m in messages)) <= set(tiny_tasks.ALPHABET)


def test_eval_prompts_disjoint_from_train(splits: dict[str, list[dict[str, Any]]]) -> None:
    eval_prompts = [tiny_tasks.final_prompt(e) for e in splits["eval"]]
    assert len(set(eval_prompts)) == len(eval_prompts)
    train_prompts = {p for e in splits["train"] for p in tiny_tasks.user_prompts(e)}
    assert not train_prompts & set(eval_prompts)


def test_tasks_and_chat_shapes_present(splits: dict[str, list[dict[str, Any]]]) -> None:
    for examples in splits.values():
        counts = {task: sum(e["task"] == task for e in examples) for task in tiny_tasks.TASKS}
        assert min(counts.values()) > 0
        assert max(counts.values()) - min(counts.values()) <= 1
        assert any(e["messages"][0]["role"] == "system" for e in examples)
        assert any(len(tiny_tasks.user_prompts(e)) == 2 for e in examples)


def test_answers_are_correct(splits: dict[str, list[dict[str, Any]]]) -> None:
    for example in splits["eval"]:
        prompt = tiny_tasks.final_prompt(example)
        task, _, arg = prompt.partition(" ")
        assert task == example["task"]
        if task == "add":
            a, b = arg.split("+")
            expected = str(int(a) + int(b))
        elif task == "reverse":
            expected = arg[::-1]
        elif task == "sort":
            expected = "".join(sorted(arg))
        else:
            letter, _, word = arg.split(" ")
            expected = str(word.count(letter))
        assert example["answer"] == expected


def test_is_correct() -> None:
    assert tiny_tasks.normalize_answer("  168\n") == "168"
    assert tiny_tasks.is_correct(" 168 ", "168")
    assert tiny_tasks.is_correct("olleh", "olleh\n")
    assert not tiny_tasks.is_correct("169", "168")
    assert not tiny_tasks.is_correct("1 68", "168")
    assert not tiny_tasks.is_correct("", "0")


def test_no_unk_over_dataset(splits: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    unk = tokenizer.unk_token_id
    for examples in splits.values():
        for example in examples:
            text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
            ids = _ids(tokenizer, text)
            assert unk not in ids
            assert len(ids) <= tokenizer.model_max_length
    assert _ids(tokenizer, "é") == [unk]


def test_special_tokens(tokenizer: Any) -> None:
    assert tokenizer.convert_ids_to_tokens(list(range(len(tiny_model.SPECIAL_TOKENS)))) == list(
        tiny_model.SPECIAL_TOKENS
    )
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.unk_token == "<|unk|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == tiny_model.MODEL_MAX_LENGTH
    for token in tiny_model.SPECIAL_TOKENS:
        assert _ids(tokenizer, f"ab{token}cd")[2:3] == [tokenizer.convert_tokens_to_ids(token)]
        assert len(_ids(tokenizer, f"ab{token}cd")) == 5
    assert _ids(tokenizer, "add 1+2") == _ids(tokenizer, "add") + _ids(tokenizer, " 1+2")
    assert tokenizer("add", add_special_tokens=True)["input_ids"] == _ids(tokenizer, "add")


def test_decode_round_trips(tokenizer: Any) -> None:
    for text in ["count a in abaca", "  two  spaces ", tiny_tasks.ALPHABET, "You are: 1, 2 - 3?"]:
        ids = _ids(tokenizer, text)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_chat_template_prefix_property(
    splits: dict[str, list[dict[str, Any]]], tokenizer: Any
) -> None:
    multi = [e for e in splits["train"] if len(tiny_tasks.user_prompts(e)) == 2]
    assert multi
    for example in multi[:200]:
        messages = example["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        assert full.startswith("<|bos|>") and full.count("<|bos|>") == 1
        full_ids = _ids(tokenizer, full)
        assert full_ids[-1] == tokenizer.eos_token_id
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            prompt_ids, upto_ids = _ids(tokenizer, prompt), _ids(tokenizer, upto)
            assert upto_ids[: len(prompt_ids)] == prompt_ids
            assert full_ids[: len(upto_ids)] == upto_ids
            completion = upto_ids[len(prompt_ids) :]
            assert tokenizer.decode(completion[:-1]) == message["content"]
            assert completion[-1] == tokenizer.eos_token_id


def test_config_and_forward(tokenizer: Any) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.vocab_size >= len(tokenizer)
    assert config.vocab_size % tiny_model.VOCAB_MULTIPLE == 0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.max_position_embeddings == tokenizer.model_max_length
    assert config.tie_word_embeddings
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    messages = [{"role": "user", "content": "add 1+2"}, {"role": "assistant", "content": "3"}]
    ids = _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size)
    assert torch.isfinite(logits).all()
