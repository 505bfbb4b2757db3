"""Preference rows packed with several pairs (``training_args.packing``): every pair is in
exactly one row with both its sides, per-pair log-probs, losses and gradients equal one pair per
row for every preference loss, and the reward model's rewards too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from post_training.data_preference.collate import pair_collate, real_pairs
from post_training.data_preference.encode import encode_pairs
from post_training.data_preference.transforms import preference
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.losses.table import PREFERENCE_LOSSES, build_loss
from post_training.modeling.loading import load_model
from post_training.trainers.preference import pair_statistics
from post_training.trainers.reward import pair_rewards
from post_training.trainers.sft import sft_forward
from post_training.utils.config import asset_path

WORDS = ["a", "bc", "def", "gh", "ijk", "l", "mn", "op"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


def _model(tokenizer, reward_head: bool = False):
    cfg = {
        "model_name_or_path": str(asset_path("tiny-llama")),
        "init_from_config": True,
        "init_seed": 3,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
    }
    return load_model(cfg, tokenizer, reward_head=reward_head).double()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """11 pairs of varied lengths, with every per-pair column a loss may read."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):
        words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
        rows.append(
            preference(
                {
                    "prompt": f"task {i}: " + words(int(rng.integers(1, 12))),
                    "chosen": words(int(rng.integers(1, 14))),
                    "rejected": words(int(rng.integers(1, 14))),
                }
            )
        )
    encoded = encode_pairs(rows, ChatEncoder(tokenizer, None, TokenizeOptions(128)), "pairs", 127)
    for i, pair in enumerate(encoded):
        pair["ref_chosen_logps"] = np.float64(-30.0 - i)
        pair["ref_rejected_logps"] = np.float64(-28.0 - 0.5 * i)
        pair["chosen_quantile_reward"] = np.float64(0.1 + 0.07 * i)
        pair["rejected_quantile_reward"] = np.float64(0.9 - 0.05 * i)
        pair["kto_label"] = np.float64(i % 3 != 0)
        pair["margin"] = np.float64(0.2 * i)
    return encoded


def _packed_and_unpacked(pairs, tokenizer):
    pad = tokenizer.pad_token_id
    longest = max(len(p["input_ids"]) for p in pairs)
    packed = pair_collate(pairs, pad, capacity=2 * longest)
    return packed, pair_collate(pairs, pad)


def test_packing_keeps_every_pair_once_in_one_row_with_both_sides(pairs, tokenizer) -> None:
    packed, unpacked = _packed_and_unpacked(pairs, tokenizer)
    counts = packed["pairs_per_row"]
    assert len(counts) < len(pairs) and int(counts.max()) >= 3, counts  # really several per row
    assert int(counts.sum()) == len(pairs) == int(real_pairs(packed).sum())
    assert sorted(packed["row_index"].tolist()) == list(range(len(pairs)))  # none lost or twice
    # Row r holds its pairs' tokens back to back, in the order of the per-pair columns.
    order = packed["row_index"].tolist()
    start = 0
    for r, n in enumerate(counts.tolist()):
        tokens = np.concatenate([pairs[i]["input_ids"] for i in order[start : start + n]])
        row = packed["input_ids"][r][packed["attention_mask"][r].bool()].numpy()
        np.testing.assert_array_equal(row, tokens)
        starts = int((packed["position_ids"][r][: len(tokens)] == 0).sum())
        assert starts == 2 * n  # two documents (chosen, rejected) per pair
        start += n
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()  # less padding
    # Every row fits the capacity; a micro-batch of one pair is one row.
    assert packed["input_ids"].shape[1] <= 2 * max(len(p["input_ids"]) for p in pairs)
    alone = pair_collate(pairs[:1], tokenizer.pad_token_id, capacity=4096)
    assert alone["pairs_per_row"].tolist() == [1]


SECTIONS = [
    {"name": "dpo"},
    {"name": "dpo", "loss_type": "ipo"},
    {
        "name": "dpo",
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.5],
        "ld_alpha": 0.5,
        "use_weighting": True,
    },
    {"name": "dpo", "loss_type": "simpo", "beta": 2.0},
    {"name": "dpo", "loss_type": "orpo"},
    {"name": "cpo", "loss_type": "hinge"},
    {"name": "kto"},
    {"name": "qrpo"},
]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: f"{s['name']}-{s.get('loss_type')}")
def test_packed_pairs_give_the_losses_and_gradients_of_one_pair_per_row(
    section, pairs, tokenizer
) -> None:
    loss_fn = build_loss(section, PREFERENCE_LOSSES)
    model = _model(tokenizer)
    packed, unpacked = _packed_and_unpacked(pairs, tokenizer)
    results = []
    for batch in (unpacked, packed):
        model.zero_grad(set_to_none=True)
        out = sft_forward(model, batch, chunk_size=16, sum_sq=loss_fn.needs_sum_sq)
        stats = pair_statistics(out, batch, loss_fn.ld_alpha)
        ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        if loss_fn.window_kl:
            stats["kl"] = torch.tensor(0.3, dtype=torch.float64)
        losses, metrics = loss_fn(stats, ref if loss_fn.needs_reference else None, batch)
        (losses.sum() / len(pairs)).backward()
        order = torch.argsort(batch["row_index"])  # back to the pairs' order
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(
            (
                {k: v[order].detach() for k, v in stats.items() if v.ndim},
                losses[order].detach(),
                {k: v[order] if v.ndim else v for k, v in metrics.items()},
                grads,
            )
        )
    (stats_a, loss_a, metrics_a, grads_a), (stats_b, loss_b, metrics_b, grads_b) = results
    assert stats_a.keys() == stats_b.keys()
    for key in stats_a:
        torch.testing.assert_close(stats_b[key], stats_a[key], rtol=1e-9, atol=1e-9, msg=key)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-9, atol=1e-9)
    for key in metrics_a:
        torch.testing.assert_close(metrics_b[key], metrics_a[key], rtol=1e-9, atol=1e-9, msg=key)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-7, atol=1e-9, msg=name)


def test_packed_pairs_give_the_rewards_of_one_pair_per_row(pairs, tokenizer) -> None:
    model = _model(tokenizer, reward_head=True).eval()
    packed, unpacked = _packed_and_unpacked(pairs, tokenizer)
    with torch.no_grad():
        chosen_a, rejected_a = pair_rewards(model, unpacked, tokenizer.pad_token_id)
        chosen_b, rejected_b = pair_rewards(model, packed, tokenizer.pad_token_id)
    order = torch.argsort(packed["row_index"])
    torch.testing.assert_close(chosen_b[order], chosen_a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rejected_b[order], rejected_a, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(chosen_a, rejected_a)  # the two sides really differ
