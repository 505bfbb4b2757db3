"""Completion masks of the tokenizer's own chat template, on real tokenizers and real multi-turn
data, against an independent oracle on every token.

Oracle: Hugging Face's ``apply_chat_template(..., return_assistant_tokens_mask=True)`` on a copy
of the family's template with ``{% generation %}`` tags written by hand around what is trained
(``tests/fixtures/tagged_templates/<family>.jinja``; each copy is checked to render exactly as
the original on every conversation here). A family without a tagged copy falls back to the reply
text located in the full rendering. Conversations: HH-RLHF transcripts (chosen and rejected,
``tests/fixtures/data``) plus hand-written ones with a system prompt, padded and repeated
content, an empty reply and ``<think>`` blocks. ``python -m tests.test_real_template_masks``
prints the figures per family (conversations, tokens compared, mismatches).
"""

from __future__ import annotations

import copy
import functools
import json
import lzma
import re
from pathlib import Path
from typing import Any

import pytest

from post_training.data_sft.templates import TEMPLATES
from post_training.data_sft.tokenize import ChatEncoder, FilterReport, TokenizeOptions
from post_training.data_sft.training_data import cache_key, load_sft_data, tokenize_options
from post_training.errors import ConfigError, DataError

from .real_tokenizers import FAMILIES, load_real_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TAGGED = FIXTURES / "tagged_templates"
HH = FIXTURES / "data" / "hh_rlhf_harmless_base_test_first300.jsonl.xz"
HH_ROWS = 90  # line 87 holds an empty reply

HAND_WRITTEN = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 1+2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "3"},  # repeats the previous reply
        {"role": "assistant", "content": "3 again, 3"},
    ],
    [
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": "\n  spaced reply \n"},  # trimmed by some templates
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "<think>\nmull it over\n</think>\n\nfinal answer"},
    ],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "<think>\nearly thoughts\n</think>\n\nok"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "plain"},
    ],
]
# Mistral-Nemo renders the system prompt only inside a user turn that is the conversation's last
# message: with one, no turn's prompt is a prefix of the whole conversation; refused (below).
NOT_PREFIX_STABLE_WITH_SYSTEM = {"mistral-nemo"}


def hh_conversations(rows: int = HH_ROWS) -> list[list[dict[str, str]]]:
    """HH-RLHF ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts as messages."""
    out = []
    with lzma.open(HH, "rt", encoding="utf-8") as handle:
        lines = [line for _, line in zip(range(rows), handle, strict=False)]
    for line in lines:
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            parts = re.split(r"\n\n(Human|Assistant):", row[side])
            assert parts[0] == ""
            out.append(
                [
                    {
                        "role": "user" if who == "Human" else "assistant",
                        "content": text.removeprefix(" "),
                    }
                    for who, text in zip(parts[1::2], parts[2::2], strict=True)
                ]
            )
    return out


@functools.cache
def tokenizer(family: str) -> Any:
    return load_real_tokenizer(family)


@functools.cache
def special_ids(family: str) -> frozenset[int]:
    tok = tokenizer(family)
    added = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return frozenset(set(tok.all_special_ids) | added)


def conversations(family: str) -> list[list[dict[str, str]]]:
    chats = hh_conversations() + HAND_WRITTEN
    if family in NOT_PREFIX_STABLE_WITH_SYSTEM:
        chats = [c for c in chats if c[0]["role"] != "system"]
    return chats


def trained_runs(mask: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of 1s."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def located_reply_mask(family: str, chat: list[dict[str, str]]) -> list[int]:
    """Fallback oracle: each assistant turn from the end of its generation prompt through the
    first special token (by id) at or after the end of its reply text in the full rendering."""
    tok, special = tokenizer(family), special_ids(family)
    full = tok.apply_chat_template(chat, tokenize=False)
    enc = tok(full, add_special_tokens=False).encodings[0]
    mask = [0] * len(enc.ids)
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        reply = message["content"].split("</think>")[-1].strip()
        assert reply, "the fallback oracle needs a non-empty reply"
        end = full.index(reply, len(prompt)) + len(reply)
        last = next(k for k, (a, _) in enumerate(enc.offsets) if a >= end and enc.ids[k] in special)
        for k, (a, b) in enumerate(enc.offsets):
            if b > len(prompt) and a < enc.offsets[last][1]:
                mask[k] = 1
    return mask


@functools.cache
def oracle(family: str) -> list[tuple[list[int], list[int]]]:
    """HF token ids and the oracle mask of every conversation of ``family``."""
    tok = tokenizer(family)
    path = TAGGED / f"{family}.jinja"
    tagged = path.read_text() if path.exists() else None
    out = []
    for chat in conversations(family):
        full = tok.apply_chat_template(chat, tokenize=False)
        ids = list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        if tagged is not None:
            assert tok.apply_chat_template(chat, tokenize=False, chat_template=tagged) == full, (
                f"{family}: the tagged template no longer renders as the fixture's"
            )
            hf = tok.apply_chat_template(
                chat,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                chat_template=tagged,
            )
            assert list(hf["input_ids"]) == ids
            mask = list(hf["assistant_masks"])
        else:
            if any(not m["content"].strip() for m in chat if m["role"] == "assistant"):
                continue
            mask = located_reply_mask(family, chat)
        out.append((ids, mask))
    return out


def encode(family: str, chats: list, **options: Any) -> list[dict[str, Any]]:
    encoder = ChatEncoder(tokenizer(family), None, TokenizeOptions(1 << 20, **options))
    report = FilterReport()
    examples, kept = encoder.encode(chats, "hh", report)
    assert kept == list(range(len(chats))), report.as_dict()
    return examples


def figures(family: str) -> tuple[int, int, int]:
    """(conversations, tokens compared, mask or id mismatches) of ``family``."""
    reference = oracle(family)
    examples = encode(family, conversations(family))
    tokens = mismatches = 0
    for ex, (ids, mask) in zip(examples, reference, strict=True):
        tokens += len(ids)
        if ex["input_ids"].tolist() != ids:
            mismatches += len(ids)
            continue
        mismatches += sum(a != b for a, b in zip(ex["completion_mask"].tolist(), mask, strict=True))
    return len(reference), tokens, mismatches


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_equal_the_oracle_on_every_token(family: str) -> None:
    tok, special, bos = tokenizer(family), special_ids(family), tokenizer(family).bos_token_id
    chats, reference = conversations(family), oracle(family)
    assert len(reference) == len(chats)  # none left out (only the fallback oracle skips any)
    assert sum(len([m for m in c if m["role"] == "assistant"]) > 1 for c in chats) >= 100
    examples = encode(family, chats)
    with_bos = encode(family, chats, add_bos=True) if bos is not None else examples
    for chat, ex, again, (ids, mask) in zip(chats, examples, with_bos, reference, strict=True):
        assert ex["input_ids"].tolist() == ids  # == apply_chat_template(tokenize=True)
        assert ex["completion_mask"].tolist() == mask
        runs = trained_runs(mask)
        assert len(runs) == sum(m["role"] == "assistant" for m in chat)
        for _, end in runs:  # the end-of-turn token is trained, what follows it is not
            assert ids[end - 1] in special
            assert end == len(ids) or mask[end] == 0
        if bos is not None:  # one BOS at most, also when add_bos asks for one
            for got in (ids, again["input_ids"].tolist()):
                assert got[:2] != [bos, bos]
                if bos != tok.eos_token_id:  # olmo-2's BOS is also the EOS closing its turns
                    assert got.count(bos) <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_last_assistant_turn_trains_only_the_final_reply(family: str) -> None:
    examples = encode(family, conversations(family), train_on="last_assistant_turn")
    for ex, (ids, mask) in zip(examples, oracle(family), strict=True):
        assert ex["input_ids"].tolist() == ids
        a, b = trained_runs(mask)[-1]
        assert ex["completion_mask"].tolist() == [int(a <= k < b) for k in range(len(ids))]


def decode_runs(tok: Any, ex: dict[str, Any]) -> list[str]:
    ids = ex["input_ids"].tolist()
    return [tok.decode(ids[a:b]) for a, b in trained_runs(ex["completion_mask"].tolist())]


def test_qwen3_trains_multi_turn_data_with_its_own_template() -> None:
    tok = tokenizer("qwen3")
    chat = HAND_WRITTEN[0]
    (ex,) = encode("qwen3", [chat])
    # Earlier turns as rendered (no think block); the last one as generated after
    # "<|im_start|>assistant\n", the template's empty think block included. No "\n" after
    # <|im_end|> is trained.
    assert decode_runs(tok, ex) == ["3<|im_end|>", "<think>\n\n</think>\n\n3 again, 3<|im_end|>"]
    # A reasoning reply before the last user turn loses its think block; the last keeps it.
    (ex,) = encode("qwen3", [[*HAND_WRITTEN[2][:3], HAND_WRITTEN[1][3]]])
    assert decode_runs(tok, ex) == [
        "ok<|im_end|>",
        "<think>\nmull it over\n</think>\n\nfinal answer<|im_end|>",
    ]


@pytest.mark.parametrize("family", ["qwen2.5", "gemma-3", "olmo-2"])
def test_located_reply_oracle_agrees_with_the_tagged_one(family: str) -> None:
    """The fallback oracle (for a family without a tagged template) is itself checked."""
    for chat, (_, mask) in zip(conversations(family), oracle(family), strict=True):
        if all(m["content"].strip() for m in chat if m["role"] == "assistant"):
            assert located_reply_mask(family, chat) == mask


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "gemma-3", "olmo-2"])
def test_the_newline_after_the_end_of_turn_token_is_not_trained(family: str) -> None:
    tok = tokenizer(family)
    (ex,) = encode(family, [HAND_WRITTEN[0][1:]])
    ids, mask = ex["input_ids"].tolist(), ex["completion_mask"].tolist()
    first_end = trained_runs(mask)[0][1]
    assert tok.decode(ids[first_end : first_end + 1]) == "\n" and mask[first_end] == 0


def test_registry_chatml_trains_im_end_but_not_the_newline_and_honours_train_on() -> None:
    tok = copy.deepcopy(tokenizer("qwen2.5"))
    chat = HAND_WRITTEN[0]
    for train_on, expected in (
        ("all_assistant_turns", ["3<|im_end|>", "3 again, 3<|im_end|>"]),
        ("last_assistant_turn", ["3 again, 3<|im_end|>"]),
    ):
        encoder = ChatEncoder(tok, TEMPLATES["chatml"], TokenizeOptions(512, train_on=train_on))
        (ex,), _ = encoder.encode([chat])
        assert decode_runs(tok, ex) == expected


def test_a_preference_prompt_with_earlier_turns_trains_only_the_reply() -> None:
    tok = tokenizer("qwen3")
    chat = HAND_WRITTEN[0]
    encoder = ChatEncoder(tok, None, TokenizeOptions(512))
    (ex,), _ = encoder.encode([(chat, 4)])
    assert decode_runs(tok, ex) == ["<think>\n\n</think>\n\n3 again, 3<|im_end|>"]


def _jsonl(path: Path, chats: list) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def _config(tmp_path: Path, train: dict, **data: Any) -> dict:
    return {
        "dataset": {"name": "t", "train": train, "eval": None},
        "model": {"max_seq_length": 4096, "chat_template": None},
        "data": {"cache": False, "cache_dir": str(tmp_path / "cache"), **data},
    }


def test_refusals_name_the_file_and_the_1_based_row(tmp_path: Path) -> None:
    tok = tokenizer("mistral-nemo")
    path = _jsonl(tmp_path / "chats.jsonl", [HAND_WRITTEN[1], HAND_WRITTEN[0]])
    with pytest.raises(DataError) as err:
        load_sft_data(_config(tmp_path, {"path": str(path)}), tok)
    message = str(err.value)
    assert message.startswith(f"dataset.train: {path}:2: ") and "\n" not in message
    assert "not prefix-stable at messages[2]" in message
    # In a mixture the row of the split is named, with the source and its path.
    mixture = {"sources": [{"path": str(path), "name": "mine"}], "shuffle": False}
    where = rf"dataset\.train \(source 'mine': {re.escape(str(path))}\): row 2 of the split"
    with pytest.raises(DataError, match=where):
        load_sft_data(_config(tmp_path, mixture), tok)


def test_a_reply_the_template_does_not_render_is_refused() -> None:
    tok = copy.deepcopy(tokenizer("qwen2.5"))
    tok.chat_template = tok.chat_template.replace(
        "'\\n' + message.content + '<|im_end|>'", "'\\n' + message.content | upper + '<|im_end|>'"
    )
    assert "upper" in tok.chat_template
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"^mem: row 1: messages\[1\] \(assistant\): the reply"):
        ChatEncoder(tok, None, TokenizeOptions(512)).encode([chat], "mem")


def test_train_on_is_an_option_of_the_config_and_of_the_cache_key(tmp_path: Path) -> None:
    tok = tokenizer("qwen3")
    train = {"path": str(_jsonl(tmp_path / "x.jsonl", HAND_WRITTEN))}
    cfg = _config(tmp_path, train, train_on="all_assistant_turns")
    last = _config(tmp_path, train, train_on="last_assistant_turn")
    assert tokenize_options(cfg).train_on == "all_assistant_turns"
    assert tokenize_options(last).train_on == "last_assistant_turn"
    assert cache_key(cfg, tok) != cache_key(last, tok)
    with pytest.raises(ConfigError, match=r"data\.train_on must be one of"):
        TokenizeOptions(16, train_on="last")


if __name__ == "__main__":
    for name in FAMILIES:
        n, tokens, bad = figures(name)
        kind = "tagged template" if (TAGGED / f"{name}.jinja").exists() else "located reply"
        print(f"{name}: {n} conversations, {tokens} tokens compared, {bad} mismatches ({kind})")
