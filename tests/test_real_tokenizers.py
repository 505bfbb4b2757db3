"""Real tokenizers of released families (tests/fixtures/tokenizers) against the model configs.

Every model config that names a family with a fixture must carry that tokenizer's real special
tokens: the strings and ids agree with the vocabulary, the eos closes every assistant turn of the
chat template, and ``add_bos`` says whether the template itself renders the BOS (never doubled).
The fixtures load offline, match their raw ``tokenizer.json`` and have a README row; the
templates' (in)stability under incremental rendering is pinned so a changed fixture is noticed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from post_training.utils.config import CONFIGS_DIR

from .real_tokenizers import FAMILIES, FIXTURES, load_real_tokenizer, tiny_model_dir

# Model config (configs/model/<name>.yaml) -> tokenizer family of tests/fixtures/tokenizers.
CONFIG_FAMILY = {
    "llama-3-8b-instruct": "llama-3",
    "llama-3.1-8b-instruct": "llama-3.1",
    "llama-3.2-1b-instruct": "llama-3.2",
    "qwen2.5-7b-instruct": "qwen2.5",
    "qwen3-0.6b": "qwen3",
    "qwen3-8b": "qwen3",
    "gemma-3-1b-it": "gemma-3",
    "deepseek-v3": "deepseek-v3",
    "gpt-oss-20b": "gpt-oss",
    "mistral-nemo-instruct": "mistral-nemo",
    "olmo-2-7b-instruct": "olmo-2",
}
NO_FIXTURE = {"tiny", "apertus-8b-instruct", "apertus-70b-instruct"}

# gpt-oss (harmony) closes the *last* assistant turn with <|return|> (its eos) and every earlier
# one with <|end|>; all other families close every assistant turn with the eos.
EARLIER_TURN_END = {"gpt-oss": "<|end|>"}

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]
SYSTEM = [{"role": "system", "content": "Be brief."}]

# Pinned template behaviour (see the README): for the 4-message CHAT, is the generation-prompt
# render of CHAT[:1] / CHAT[:3] a prefix of the full render ("incremental"), is the full render
# of CHAT[:2] a prefix of it ("turns"), and does the "incremental" check hold with a system
# message first ("system")? False entries are the families whose masks need care.
PREFIX_STABLE = {
    "llama-3": (True, True, True),
    "llama-3.1": (True, True, True),
    "llama-3.2": (True, True, True),
    "qwen2.5": (True, True, True),
    "qwen3": (True, False, True),  # the last assistant turn gets an empty <think>\n\n</think>\n\n
    "gemma-3": (True, True, True),
    "deepseek-v3": (True, True, True),
    "gpt-oss": (True, False, True),  # last turn ends <|return|>, earlier ones <|end|>
    "mistral-nemo": (True, True, False),  # system only before a final user turn, else dropped
    "olmo-2": (True, True, True),
}

SAMPLE = "Hi  world! It's 2024-12-01: 12345 ünï 中文\n\n\tdef f(x): return x**2 "
# SAMPLE's ids (no special tokens) from the raw tokenizer.json (tokenizers 0.23.3
# ``Tokenizer.from_file``): transformers must not rebuild a tokenizer differently from its file
# (Gemma, Qwen2 and the LlamaTokenizerFast-labelled DeepSeek go through model-specific classes).
# olmo-2 has no tokenizer.json: its ids are transformers' GPT-2-style build from vocab + merges
# ("2024" -> "20" "24"; the released cl100k-style file splits digits in threes: "202" "4").
# fmt: off
SAMPLE_IDS = {
    "llama-3": [
        13347, 220, 1917, 0, 1102, 596, 220, 2366, 19, 12, 717, 12, 1721, 25, 220, 4513, 1774,
        107268, 38672, 73958, 17161, 271, 7604, 282, 2120, 1680, 471, 865, 334, 17, 220
    ],
    "qwen2.5": [
        13048, 220, 1879, 0, 1084, 594, 220, 17, 15, 17, 19, 12, 16, 17, 12, 15, 16, 25, 220, 16,
        17, 18, 19, 20, 10489, 77, 37572, 72858, 16744, 271, 7452, 282, 2075, 1648, 470, 856, 334,
        17, 220
    ],
    "gemma-3": [
        10979, 138, 12392, 236888, 1030, 236789, 236751, 236743, 236778, 236771, 236778, 236812,
        236772, 236770, 236778, 236772, 236771, 236770, 236787, 236743, 236770, 236778, 236800,
        236812, 236810, 174898, 238527, 17346, 237364, 108, 255968, 2063, 517, 236769, 236781, 1473,
        994, 1123, 1018, 236778, 236743
    ],
    "deepseek-v3": [
        23166, 223, 2058, 3, 983, 734, 223, 939, 22, 15, 736, 15, 2616, 28, 223, 6895, 1883, 10943,
        80, 16709, 223, 21134, 271, 62783, 285, 4042, 2605, 1354, 1527, 666, 20, 223
    ],
    "gpt-oss": [
        12194, 220, 2375, 0, 7744, 220, 1323, 19, 12, 899, 12, 2290, 25, 220, 7633, 2548, 86582,
        9954, 83711, 279, 23154, 285, 4061, 3127, 622, 1215, 410, 17, 220
    ],
    "mistral-nemo": [
        37133, 1032, 4304, 1033, 2157, 1681, 1032, 1050, 1048, 1050, 1052, 1045, 1049, 1050, 1045,
        1048, 1049, 1058, 1032, 1049, 1050, 1051, 1052, 1053, 76502, 7884, 30549, 11449, 1267,
        48795, 1284, 4790, 4244, 1850, 2460, 1438, 1050, 1032
    ],
    "olmo-2": [
        13347, 220, 1917, 0, 1102, 596, 220, 508, 1187, 12, 717, 12, 1721, 25, 220, 4513, 1774,
        10709, 77, 38672, 73958, 17161, 271, 197, 755, 282, 7, 87, 1680, 471, 865, 334, 17, 220
    ],
}
# fmt: on
SAMPLE_IDS["llama-3.1"] = SAMPLE_IDS["llama-3.2"] = SAMPLE_IDS["llama-3"]  # one BPE for Llama 3.x
SAMPLE_IDS["qwen3"] = SAMPLE_IDS["qwen2.5"]  # Qwen3 adds special tokens only


@functools.cache
def tokenizer(family: str) -> Any:
    """One tokenizer per family for this module (the tests here never change it)."""
    return load_real_tokenizer(family)


def model_config(name: str) -> dict[str, Any]:
    cfg = OmegaConf.load(CONFIGS_DIR / "model" / f"{name}.yaml")
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def render(tok: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def render_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def test_families_are_the_fixture_folders() -> None:
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert set(FAMILIES) == folders
    assert set(CONFIG_FAMILY.values()) <= set(FAMILIES)


def test_every_model_config_is_mapped() -> None:
    names = {p.stem for p in (CONFIGS_DIR / "model").glob("*.yaml")}
    unmapped = names - set(CONFIG_FAMILY) - NO_FIXTURE
    assert not unmapped, f"map these model configs to a fixture family (or NO_FIXTURE): {unmapped}"
    assert set(CONFIG_FAMILY) <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_loads_offline_and_has_a_readme_row(family: str) -> None:
    tok = tokenizer(family)
    assert tok.is_fast and len(tok) > 50_000
    assert tok.chat_template, f"{family}: no chat template"
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ids == SAMPLE_IDS[family]
    assert tok.decode(ids) == SAMPLE
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    assert f"| `{family}` |" in readme, f"README.md has no row for {family}"


@pytest.mark.parametrize("name", sorted(CONFIG_FAMILY))
def test_config_special_tokens_are_the_tokenizers(name: str) -> None:
    special = model_config(name)["special_tokens"]
    tok = tokenizer(CONFIG_FAMILY[name])
    for role in ("bos", "eos", "pad"):
        token, token_id = special[f"{role}_token"], special[f"{role}_token_id"]
        assert (token is None) == (token_id is None), f"{name}: {role} token and id disagree"
        if token is None:
            continue
        assert tok.convert_tokens_to_ids(token) == token_id, f"{name}: {role} {token!r}"
        assert tok.convert_ids_to_tokens(token_id) == token, f"{name}: {role} id {token_id}"
        assert token_id in tok.all_special_ids or token in tok.get_added_vocab(), (
            f"{name}: {role} {token!r} is not a special/added token"
        )
    assert special["pad_token_id"] != special["eos_token_id"]
    if special["bos_token"] is None:
        assert tok.bos_token is None, f"{name}: the tokenizer has a BOS {tok.bos_token!r}"


@pytest.mark.parametrize("name", sorted(CONFIG_FAMILY))
def test_eos_ends_every_assistant_turn(name: str) -> None:
    family = CONFIG_FAMILY[name]
    special = model_config(name)["special_tokens"]
    tok = tokenizer(family)
    text = render(tok, CHAT)
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    pos = 0
    for i, reply in enumerate(replies):
        at = text.index(reply, pos) + len(reply)
        last = i == len(replies) - 1
        end = special["eos_token"] if last else EARLIER_TURN_END.get(family, special["eos_token"])
        assert text.startswith(end, at), f"{name}: reply {i} is followed by {text[at : at + 30]!r}"
        pos = at
    ids = render_ids(tok, CHAT)
    assert ids.count(special["eos_token_id"]) >= (1 if family in EARLIER_TURN_END else 2)
    assert special["pad_token_id"] not in ids


@pytest.mark.parametrize("name", sorted(CONFIG_FAMILY))
def test_add_bos_is_whether_the_template_renders_bos(name: str) -> None:
    special = model_config(name)["special_tokens"]
    tok = tokenizer(CONFIG_FAMILY[name])
    for messages in (CHAT, SYSTEM + CHAT):
        ids = render_ids(tok, messages)
        bos = special["bos_token_id"]
        renders_bos = bos is not None and ids[0] == bos
        assert special["add_bos"] == renders_bos, f"{name}: add_bos vs template {ids[:3]}"
        if bos is not None:
            assert ids[:2] != [bos, bos], f"{name}: doubled BOS"
            # only the leading one is a BOS (olmo-2's bos is also its eos, which closes turns)
            if bos != special["eos_token_id"]:
                assert ids.count(bos) <= 1, f"{name}: BOS inside the conversation"


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_rendering_is_as_documented(family: str) -> None:
    tok = tokenizer(family)
    full = render(tok, CHAT)
    incremental = all(
        full.startswith(render(tok, CHAT[:i], add_generation_prompt=True)) for i in (1, 3)
    )
    turns = full.startswith(render(tok, CHAT[:2]))
    with_system = render(tok, SYSTEM + CHAT)
    system = all(
        with_system.startswith(render(tok, (SYSTEM + CHAT)[:i], add_generation_prompt=True))
        for i in (2, 4)
    )
    assert (incremental, turns, system) == PREFIX_STABLE[family]


def test_tiny_model_on_a_real_vocabulary_trains(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("qwen3", tmp_path, tokenizer=tokenizer("qwen3"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size >= len(tok)
    ids = torch.tensor([render_ids(tok, CHAT)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
