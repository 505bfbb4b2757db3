"""``data_sft.inspect mode=token_stats``: the histogram marks ``max_seq_length`` and the stats
count the examples above it (before truncation)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from post_training.data_sft.inspect import histogram_figure, token_stats, write_histogram
from post_training.utils.config import CONFIGS_DIR, register_resolvers


def _config(tmp_path, truncation: str, max_seq_length: int) -> dict:
    register_resolvers()
    model = OmegaConf.load(CONFIGS_DIR / "model" / "tiny.yaml")
    dataset = OmegaConf.load(CONFIGS_DIR / "dataset" / "tiny-tasks.yaml")
    cfg = OmegaConf.create({"model": model, "dataset": dataset})
    cfg.model.max_seq_length = max_seq_length
    cfg.dataset.max_train_examples = 200
    cfg.dataset.max_eval_examples = 20
    cfg.data = {"truncation": truncation, "non_alternating_roles": "merge", "cache": False}
    cfg.data.cache_dir = str(tmp_path / "cache")
    return OmegaConf.to_container(cfg, resolve=True)


def test_histogram_marks_max_seq_length_with_the_count_above(tmp_path) -> None:
    lengths = {
        "prompt": np.arange(100),
        "completion": np.arange(100) // 2,
        "total": np.arange(1, 101),
    }
    above = {"max_seq_length": 80, "examples": 20, "of": 100, "share": 0.2, "handling": "dropped"}
    fig = histogram_figure(lengths, "tiny train", above)
    total = fig.axes[2]
    (line,) = [ln for ln in total.get_lines() if ln.get_label() == "max_seq_length=80"]
    assert list(line.get_xdata()) == [80, 80]
    assert [t.get_text() for t in total.get_legend().get_texts()] == ["max_seq_length=80"]
    assert "20 of 100 (20.0%) above max_seq_length: dropped" in total.get_title()
    assert not fig.axes[0].get_lines()  # only the total panel is marked
    write_histogram(lengths, tmp_path / "h.png", "tiny train", above)
    assert (tmp_path / "h.png").stat().st_size > 5000


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_token_stats_count_the_examples_above_max_seq_length(tmp_path, truncation) -> None:
    stats = token_stats(_config(tmp_path, truncation, 40), "train")
    above = stats["above_max_seq_length"]
    filters = stats["filters"]
    lengths = stats["_lengths"]["total"]
    assert above["max_seq_length"] == 40 and above["examples"] > 0
    assert above["examples"] == int((lengths > 40).sum()) and lengths.max() > 40
    assert above["share"] == pytest.approx(above["examples"] / above["of"])
    if truncation == "drop":
        assert above["handling"] == "dropped"
        assert above["examples"] == filters["dropped"]["too_long"]
        assert above["of"] == stats["examples"] + filters["dropped"]["too_long"]
    else:
        assert above["handling"] == "truncated"
        # counted as truncated, whether a completion remained or not (then dropped)
        assert above["examples"] == filters["truncated"]
    assert stats["total_length"]["p100"] <= 40  # the kept examples fit
