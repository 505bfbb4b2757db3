"""Chat templates and masks: every registered template round-trips through its Jinja form, and
its fast offset-based masks equal incremental token-id rendering; filters count per reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer

from post_training.data_sft.templates import TEMPLATES, resolve_template, template_from_mapping
from post_training.data_sft.tokenize import (
    ChatEncoder,
    FilterReport,
    TokenizeOptions,
    reference_masks,
    tokenize_chat,
)
from post_training.errors import ConfigError, DataError
from post_training.losses.constants import IGNORE_INDEX
from post_training.modeling.loading import load_model, load_tokenizer, stop_token_ids
from post_training.utils.config import asset_path
from tests.bpe_tokenizer import bpe_tokenizer, bpe_tokenizer_dir

CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 1+2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "3"},  # repeats the previous answer: string search breaks
        {"role": "assistant", "content": "3 again, 3"},
    ],
    [
        {"role": "user", "content": "Hello there! How are you today?"},
        {"role": "assistant", "content": " I am fine,\nthank you."},
    ],
    [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n"},
        {"role": "user", "content": "Reverse the word 'banana'"},
        {"role": "assistant", "content": "ananab"},
    ],
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


@pytest.fixture(scope="module", params=["tiny-char", "bpe"])
def any_tokenizer(request, tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer) if request.param == "tiny-char" else bpe_tokenizer()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_round_trips_through_jinja_with_exact_masks(name, any_tokenizer) -> None:
    template = TEMPLATES[name]
    bound = template.bind(any_tokenizer.bos_token, any_tokenizer.eos_token)
    any_tokenizer.chat_template = bound.to_jinja()
    encoder = ChatEncoder(any_tokenizer, template, TokenizeOptions(4096))
    for chat in CHATS:
        text, _ = bound.render(chat)
        assert text == any_tokenizer.apply_chat_template(chat, tokenize=False)
        for cut in range(1, len(chat)):
            ours = bound.render(chat[:cut], add_generation_prompt=True)[0]
            theirs = any_tokenizer.apply_chat_template(
                chat[:cut], tokenize=False, add_generation_prompt=True
            )
            assert ours == theirs
        report = FilterReport()
        examples, _ = encoder.encode([chat], report=report)
        reference = reference_masks(chat, any_tokenizer)
        if reference is None:
            # A subword merged across a turn boundary (BPE "\n" + "   return"): counted, and
            # trained, so that every completion character is covered by a trained token.
            assert report.boundary_tokens > 0
            ex = examples[0]
            trained_text = any_tokenizer.decode(ex["input_ids"][ex["completion_mask"] == 1])
            for m in chat:
                if m["role"] == "assistant":
                    assert m["content"] + bound.roles["assistant"].suffix in trained_text
            continue
        ids, completion = reference
        assert report.boundary_tokens == 0
        assert examples[0]["input_ids"].tolist() == ids
        assert examples[0]["completion_mask"].tolist() == completion
        # What is trained decodes to exactly the assistant turns plus their end-of-turn suffix.
        if any_tokenizer.unk_token_id in ids:  # the char-level vocab lacks some characters
            continue
        trained = [
            any_tokenizer.decode(examples[0]["input_ids"][examples[0]["completion_mask"] == 1])
        ]
        assert trained == [expected_trained(chat, bound)]


def expected_trained(chat, bound) -> str:
    suffix = bound.roles["assistant"].suffix
    return "".join(m["content"] + suffix for m in chat if m["role"] == "assistant")


def test_multi_turn_masks_and_labels(tiny_tokenizer) -> None:
    ex = tokenize_chat(CHATS[0], tiny_tokenizer)
    tokens = tiny_tokenizer.convert_ids_to_tokens(ex["input_ids"].tolist())
    completion = "".join(t for t, c in zip(tokens, ex["completion_mask"], strict=True) if c)
    assert completion == "3<|end|>3 again, 3<|end|>"
    prompt = "".join(t for t, p in zip(tokens, ex["prompt_mask"], strict=True) if p)
    assert prompt == (
        "<|bos|><|system|>Be brief.<|end|><|user|>add 1+2<|end|><|assistant|>"
        "<|user|>3<|end|><|assistant|>"
    )
    assert (ex["prompt_mask"] + ex["completion_mask"] == 1).all()
    assert (
        ex["labels"] == np.where(ex["completion_mask"] == 1, ex["input_ids"], IGNORE_INDEX)
    ).all()
    assert tiny_tokenizer.eos_token_id in ex["labels"].tolist()  # EOS is learned


def test_plain_text_trains_every_token_and_ends_with_eos(tiny_tokenizer) -> None:
    template = TEMPLATES["tulu"]
    encoder = ChatEncoder(tiny_tokenizer, template, TokenizeOptions(64, add_bos=True))
    (ex,), _ = encoder.encode([[{"role": "text", "content": "abc cab"}]])
    assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id  # add_bos prepends BOS
    assert ex["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert ex["completion_mask"].tolist() == [0] + [1] * (len(ex["input_ids"]) - 1)


def test_add_bos_only_when_the_template_has_none(tiny_tokenizer) -> None:
    chat = CHATS[1]
    for name, expect_double in (("olmo", False), ("chatml", False)):
        encoder = ChatEncoder(tiny_tokenizer, TEMPLATES[name], TokenizeOptions(512, add_bos=True))
        (ex,), _ = encoder.encode([chat])
        ids = ex["input_ids"].tolist()
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert (ids[1] == tiny_tokenizer.bos_token_id) is expect_double


def test_yaml_defined_template_trains_only_the_parts_it_says() -> None:
    tokenizer = bpe_tokenizer()
    template = template_from_mapping(
        {
            "name": "mine",
            "bos": "{bos}",
            "roles": {
                "user": {"prefix": "Q: ", "suffix": "\n"},
                "assistant": {"prefix": "A: ", "suffix": "{eos}", "after": "\n"},
            },
        }
    )
    ex = tokenize_chat(CHATS[2], tokenizer, template)
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<s>Q: def add(a, b):\nA:     return a + b\n</s>\nQ: ")
    trained = tokenizer.decode(ex["input_ids"][ex["completion_mask"] == 1])
    # " ananab" is one BPE token that starts on the prefix's space, and the prefix's space
    # merges with the indentation: both are trained as a whole (every answer character is).
    assert trained == "     return a + b\n</s> ananab</s>"
    with pytest.raises(ConfigError, match="unknown keys"):
        template_from_mapping({"roles": {"assistant": {}}, "colour": 1})


def test_unknown_template_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"available: .*chatml.*tulu"):
        resolve_template("no-such-template")


def test_named_template_configures_tokenizer_and_generation_stop_tokens() -> None:
    cfg = {
        "tokenizer_name_or_path": str(bpe_tokenizer_dir()),
        "trust_remote_code": False,
        "chat_template": "chatml",
        "special_tokens": {"pad_token": "<pad>", "eos_token": "</s>"},
    }
    tokenizer = load_tokenizer(cfg)
    chat = CHATS[1]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nHello there! How are you today?<|im_end|>\n"
        "<|im_start|>assistant\n I am fine,\nthank you.<|im_end|>"
    )
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(cfg, tokenizer) == [tokenizer.eos_token_id, im_end]
    model_cfg = {
        **cfg,
        "model_name_or_path": str(asset_path("tiny-llama")),
        "init_from_config": True,
        "init_seed": 0,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
    }
    model = load_model(model_cfg, tokenizer)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, im_end]


def test_filters_count_each_reason(tiny_tokenizer) -> None:
    user, assistant = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    rows = [
        [user, assistant],  # kept
        [user, user, assistant],  # merged
        [{"role": "user", "content": "x" * 80}, assistant],  # too long
        [user],  # no completion
        [],  # empty
        [assistant, user, assistant],  # starts with assistant
        [user, assistant, {"role": "system", "content": "late"}, user, assistant],
    ]
    report = FilterReport()
    encoder = ChatEncoder(tiny_tokenizer, None, TokenizeOptions(40))
    examples, kept = encoder.encode(rows, "mem", report)
    assert kept == [0, 1]
    assert report.merged == 1 and report.kept == 2 and report.total == 7
    assert dict(report.dropped) == {
        "too_long": 1,
        "no_completion": 1,
        "empty": 1,
        "starts_with_assistant": 1,
        "system_not_first": 1,
    }
    merged = tiny_tokenizer.decode(examples[1]["input_ids"])
    assert merged.count("<|user|>") == 1 and merged.count("hi") == 2  # one user turn: hi + hi

    drop = ChatEncoder(tiny_tokenizer, None, TokenizeOptions(40, role_fix="drop"))
    report = FilterReport()
    drop.encode(rows[:2], "mem", report)
    assert dict(report.dropped) == {"non_alternating_roles": 1}
    with pytest.raises(DataError, match=r"mem: row 2: messages\[0\] and messages\[1\]"):
        ChatEncoder(tiny_tokenizer, None, TokenizeOptions(40, role_fix="error")).encode(
            rows[:2], "mem"
        )


def test_truncate_keeps_the_head_and_drops_examples_left_without_completion(
    tiny_tokenizer,
) -> None:
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 60}]
    long_prompt = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]
    report = FilterReport()
    encoder = ChatEncoder(tiny_tokenizer, None, TokenizeOptions(20, truncation="truncate"))
    examples, kept = encoder.encode([long_answer, long_prompt], "mem", report)
    assert kept == [0] and report.truncated == 2
    assert len(examples[0]["input_ids"]) == 20 and examples[0]["completion_mask"][-1] == 1
    assert dict(report.dropped) == {"no_completion_after_truncation": 1}


def test_tokenizer_template_that_is_not_prefix_stable_is_refused(tiny_tokenizer) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Renders the last message differently: the conversation up to a turn is not a prefix.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% if not loop.last %}{{ '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(
        DataError, match="row 1: the tokenizer's chat template is not prefix-stable"
    ):
        ChatEncoder(tokenizer, None, TokenizeOptions(100)).encode([CHATS[1]], "mem")
