"""Preference datasets as mixtures of sources (``train: {sources: [...]}``), as SFT datasets are:
each source's amount, drawn from its own seeded stream, shuffled; errors name the source, its
file and line; KTO mixes unpaired files, or pairs split after mixing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training.data_alignment.rows import read_rows
from post_training.data_preference.pairs import load_preference_pairs, spec_label
from post_training.data_preference.unpaired import load_unpaired_examples
from post_training.data_sft import inspect as data_inspect
from post_training.errors import ConfigError, DataError
from post_training.frame import validate
from post_training.utils.config import CONFIGS_DIR, register_resolvers


def _pairs(tmp_path: Path, name: str, n: int) -> str:
    path = tmp_path / f"{name}.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"{name}{i}", "rejected": "x"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chosen(source) -> list[str]:
    return [p["chosen"][0]["content"] for p in source.pairs]


def test_a_mixture_takes_each_sources_amount_from_its_own_stream(tmp_path: Path) -> None:
    a, b, c = _pairs(tmp_path, "a", 6), _pairs(tmp_path, "b", 10), _pairs(tmp_path, "c", 5)
    spec = {"sources": [{"path": a, "count": 4}, {"path": b, "weight": 1.0}], "total": 7, "seed": 1}
    source = load_preference_pairs(spec, "dataset.train")
    chosen = _chosen(source)
    assert sorted(x[0] for x in chosen) == ["a"] * 4 + ["b"] * 3
    assert len(set(chosen)) == 7  # drawn without replacement
    assert chosen == _chosen(load_preference_pairs(spec, "dataset.train"))  # seeded
    assert chosen != sorted(chosen)  # shuffled
    for i, text in enumerate(chosen):  # each pair is located in its own file and line
        k = int(text[1:])
        expected = f"sources[{0 if text[0] == 'a' else 1}] "
        assert source.locate(i).startswith(expected)
        assert source.locate(i).endswith(f"{text[0]}.jsonl:{k + 1}")
    # another source (with its own count) leaves the others' draws as they were
    more = {**spec, "sources": [*spec["sources"], {"path": c, "count": 2}], "total": 9}
    assert set(chosen) < set(_chosen(load_preference_pairs(more, "dataset.train")))
    assert spec_label(more) == f"mixture of {tmp_path.name}/a, {tmp_path.name}/b, {tmp_path.name}/c"
    # max_examples keeps the first mixed pairs
    capped = load_preference_pairs({**spec, "max_examples": 3}, "dataset.train")
    assert _chosen(capped) == chosen[:3]


def test_a_bad_row_in_a_mixture_names_the_source_file_line_and_field(tmp_path: Path) -> None:
    good = _pairs(tmp_path, "good", 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n'
    )
    spec = {"sources": [{"path": good}, {"path": str(bad), "name": "mine"}]}
    with pytest.raises(DataError) as err:
        load_preference_pairs(spec, "dataset.train")
    assert str(err.value).startswith(f"dataset.train.sources[1]: {bad}:2: field 'rejected'")


def test_mixture_amounts_and_keys_are_checked(tmp_path: Path) -> None:
    a = _pairs(tmp_path, "a", 3)
    with pytest.raises(DataError, match=r"sources\[0\] '.*a': 5 rows requested \(count 5\)"):
        load_preference_pairs({"sources": [{"path": a, "count": 5}]}, "dataset.train")
    upsampled = load_preference_pairs(
        {"sources": [{"path": a, "count": 5}], "upsample": True}, "dataset.train"
    )
    counts = Counter(_chosen(upsampled))  # the whole source once, then 2 of its rows again
    assert sorted(counts) == ["a0", "a1", "a2"] and sorted(counts.values()) == [1, 2, 2]
    with pytest.raises(ConfigError, match=r"sources\[0\]: unknown keys \['keep_columns'\]"):
        load_preference_pairs({"sources": [{"path": a, "keep_columns": ["x"]}]}, "dataset.train")
    with pytest.raises(ConfigError, match=r"several sources are named \['same'\]"):
        load_preference_pairs(
            {"sources": [{"path": a, "name": "same"}, {"path": a, "name": "same"}]}, "d"
        )


def test_kto_mixes_unpaired_files_and_splits_mixed_pairs(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"sources": [{"path": str(path), "count": 2}, {"path": str(path), "name": "again"}]}
    unpaired = load_unpaired_examples(spec, "dataset.train", unpair=False)
    assert len(unpaired.examples) == 6
    assert {unpaired.locate(i).split(":")[0] for i in range(6)} == {
        f"sources[0] '{tmp_path.name}/u'",
        "sources[1] 'again'",
    }
    pairs = {"sources": [{"path": _pairs(tmp_path, "p", 4), "count": 3}], "max_examples": 2}
    split = load_unpaired_examples(pairs, "dataset.train", unpair=True)
    assert [e["label"] for e in split.examples] == [True, False, True, False]  # 2 pairs, 4 rows


def test_the_tiny_pairs_mixture_preset_draws_eight_wrong_answers_per_prompt() -> None:
    register_resolvers()
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose("train-reward", overrides=["dataset=tiny-pairs-mixture"])
    dataset = validate(cfg).dataset
    train = OmegaConf.to_container(cfg.dataset.train, resolve=True)
    source = load_preference_pairs(train, "dataset.train")
    assert len(source.pairs) == 64_000 and dataset.name == "tiny-pairs-mixture"
    rejected: dict[str, set[str]] = {}
    for pair in source.pairs:
        prompt = json.dumps(pair["prompt"])
        rejected.setdefault(prompt, set()).add(pair["rejected"][0]["content"])
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
        assert pair["chosen_reward"] == 1.0 > pair["rejected_reward"]
    # 8 draws per prompt, 5.0 different on average (a count has few wrong values): 3 or more
    # different wrong answers for 97.8% of the prompts, where one source gives one
    assert len(rejected) == 8_000
    assert sum(len(r) >= 3 for r in rejected.values()) == 7_824
    assert [source.locate(i).split(" ")[0] for i in range(3)] != ["sources[0]"] * 3  # shuffled


def test_the_alignment_stages_read_a_mixture_of_pair_sources(tmp_path: Path) -> None:
    a, b = _pairs(tmp_path, "a", 4), _pairs(tmp_path, "b", 4)
    dataset = {
        "name": "mix",
        "train": {
            "sources": [
                {"path": a, "transform": "preference", "count": 2},
                {"path": b, "transform": "preference", "count": 3},
            ]
        },
    }
    rows = read_rows(dataset, "train")
    assert [r["id"] for r in rows] == [f"train-{i}" for i in range(5)]
    assert sorted(r["chosen"][0]["content"][0] for r in rows) == ["a", "a", "b", "b", "b"]


def test_data_inspect_shows_the_pairs_of_a_mixture(capsys: pytest.CaptureFixture[str]) -> None:
    register_resolvers()
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose("data-inspect", overrides=["dataset=tiny-pairs-mixture", "num_samples=2"])
    out = data_inspect.run(cfg)
    assert out == capsys.readouterr().out.strip("\n")
    assert out.startswith("64000 pairs in dataset.train (mixture of wrong-0, wrong-1, ")
    headers = re.findall(
        r"^=== train pair \d+ \(sources\[\d\] 'wrong-\d': .+:\d+\) ===$", out, re.M
    )
    assert len(headers) == 2 and out.count("--- chosen tokens") == 2
