"""Smoke test of the SFT data-preparation benchmark (``benchmarks/data_prep.py``).

Runs it end to end on a few hundred chats and checks its report: every pipeline timed, the
same examples kept, and our completion masks identical to TRL's assistant masks. Speed is
never asserted (the benchmark reports it; tests must not depend on the machine's load).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import data_prep
from post_training.data_sft.templates import TEMPLATES

NUM_EXAMPLES = 300


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("data-prep-bench")
    out = root / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        # The tokenizer is trained and cached under this (temporary) artifacts dir.
        mp.setenv("POST_TRAINING_ARTIFACTS_DIR", str(root / "artifacts"))
        returned = data_prep.main(
            ["--num-examples", str(NUM_EXAMPLES), "--repeats", "1", "--json", str(out)]
        )
    report = json.loads(out.read_text())
    assert report["command"] == returned["command"]
    assert (root / "artifacts" / "benchmarks").is_dir()
    return report


def test_report_fields(report: dict) -> None:
    assert report["command"].startswith("python -m benchmarks.data_prep --num-examples 300")
    assert set(report) >= {
        "config",
        "machine",
        "data",
        "results",
        "ratio_vs_trl",
        "mask_agreement",
        "targets",
    }
    assert set(report["results"]) == {"ours", "ours_1thread", "ours_jinja", "trl", "tokenize_only"}
    for name, result in report["results"].items():
        assert len(result["times_s"]) == 1, name
        assert result["examples_per_s"] > 0 and result["tokens_per_s"] > 0, name
        # Every chat is kept (too-long ones are truncated, as TRL does) by every pipeline.
        assert result["kept"] == NUM_EXAMPLES, name
    for name in ("ours", "ours_1thread", "ours_jinja", "trl"):
        assert 0 < report["results"][name]["packing_efficiency"] <= 1, name
    assert report["results"]["trl"]["cache_files"] == 0  # nothing read back from a cache
    assert set(report["ratio_vs_trl"]) == {"ours", "ours_1thread", "ours_jinja"}
    config = report["config"]
    assert config["trl"]["sft_config"]["assistant_only_loss"] is True
    assert config["trl"]["sft_config"]["packing_strategy"] == "bfd"
    assert config["trl"]["stop_token_trained"] is True
    assert report["data"]["examples"] == NUM_EXAMPLES
    assert len(report["machine"]["load_avg_1_5_15"]) == 2


def test_masks_agree_with_trl(report: dict) -> None:
    agreement = report["mask_agreement"]
    assert agreement["compared"] == 200
    assert agreement["render_mismatches"] == 0
    assert agreement["input_ids_equal_pct"] == 100.0
    assert agreement["tokens_agree_pct"] == 100.0
    assert agreement["examples_exact_pct"] == 100.0
    assert agreement["ours_jinja_equal_pct"] == 100.0
    assert agreement["differences"] == []


def test_generation_tagged_template_renders_like_the_registry_one() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = TEMPLATES["chatml"].bind(None, "<|endoftext|>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    tagged = data_prep.generation_tagged_jinja(template)
    for generation in (False, True):
        (plain,), _ = render_jinja_template(
            conversations=[messages],
            chat_template=template.to_jinja(),
            add_generation_prompt=generation,
        )
        (text,), (indices,) = render_jinja_template(
            conversations=[messages],
            chat_template=tagged,
            add_generation_prompt=generation,
            return_assistant_tokens_mask=True,
        )
        assert text == plain == template.render(messages, generation)[0]
        # The generation spans are exactly the registry template's trained spans.
        assert [tuple(span) for span in indices] == template.render(messages)[1]


def test_synthetic_data_is_seeded() -> None:
    first = data_prep.synthetic_conversations(50, seed=3)
    assert first == data_prep.synthetic_conversations(50, seed=3)
    assert first != data_prep.synthetic_conversations(50, seed=4)
    for messages in first:
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)


def test_cached_tokenizer_is_reused(tmp_path: Path) -> None:
    directory = data_prep.tokenizer_dir(str(tmp_path))
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_text("{}")
    assert data_prep.build_tokenizer(str(tmp_path)) == directory  # not retrained
