"""Padding-free packing: nothing lost or duplicated, attention stays inside each document, and a
packed batch gives the same per-token log-probs and losses as the unpacked documents."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.packing import best_fit_decreasing, pack_examples, packing_efficiency
from post_training.data_sft.tokenize import tokenize_chat
from post_training.losses import irl_loss, ln_plw_loss, plw_loss
from post_training.modeling.loading import load_model
from post_training.trainers.sft import COUNT_KEYS, SFTTrainer, sft_forward
from post_training.utils.config import asset_path


def test_best_fit_decreasing_keeps_every_item_once_and_fits() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # none lost, none duplicated
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1  # BFD is near-optimal on such inputs
    assert best_fit_decreasing(lengths, 128) == bins  # deterministic
    # Best fit, not first fit: 6 goes into the fuller bin (7 + 3 free), not the emptier one.
    assert best_fit_decreasing([7, 4, 3], 10) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="longer than the bin capacity"):
        best_fit_decreasing([5, 11], 10)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    cfg = {
        "model_name_or_path": str(asset_path("tiny-llama")),
        "init_from_config": True,
        "init_seed": 3,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
    }
    return tokenizer, load_model(cfg, tokenizer).eval()


def _docs(tokenizer, n: int = 9) -> list[dict[str, np.ndarray]]:
    rng = random.Random(1)
    docs = []
    for i in range(n):
        turns = [
            {
                "role": "user",
                "content": f"add {rng.randint(0, 99)}+{rng.randint(0, 99)}" * (i % 3 + 1),
            },
            {"role": "assistant", "content": "abcdefghij"[: rng.randint(1, 10)]},
        ]
        if i % 4 == 0:
            turns = [{"role": "system", "content": "be brief"}, *turns, *turns[-2:]]
        docs.append(tokenize_chat(turns, tokenizer))
    return docs


def test_packed_forward_equals_each_document_alone(tiny) -> None:
    tokenizer, model = tiny
    docs = _docs(tokenizer)
    packed, bins = pack_examples(docs, capacity=96)
    assert sorted(i for b in bins for i in b) == list(range(len(docs)))
    assert len(packed) < len(docs) and packing_efficiency(packed, 96) > 0.6
    with torch.no_grad():
        out = sft_forward(model, pad_collate(packed, tokenizer.pad_token_id))
        for row, members in enumerate(bins):
            offset = 0
            for i in members:
                n = len(docs[i]["input_ids"])
                alone = sft_forward(model, pad_collate([docs[i]], tokenizer.pad_token_id))
                # Positions predicting the document's own tokens: 0 .. n-2.
                got = out["logps"][row, offset : offset + n - 1]
                torch.testing.assert_close(got, alone["logps"][0, : n - 1], atol=1e-5, rtol=1e-5)
                lse = out["lse"][row, offset : offset + n - 1]
                torch.testing.assert_close(lse, alone["lse"][0, : n - 1], atol=1e-5, rtol=1e-5)
                # The last token predicts the next document's first token: no target there.
                assert out["target"][row, offset + n - 1] == 0
                offset += n


@pytest.mark.parametrize("sequence_level", [False, True])
def test_packed_losses_equal_unpacked_losses(tiny, sequence_level: bool) -> None:
    tokenizer, model = tiny
    docs = _docs(tokenizer)
    packed, _ = pack_examples(docs, capacity=96)
    batches = {
        "unpacked": pad_collate(docs, tokenizer.pad_token_id),
        "packed": pad_collate(packed, tokenizer.pad_token_id),
    }
    losses = {}
    with torch.no_grad():
        for name, batch in batches.items():
            counts = SFTTrainer.loss_counts(None, batch)  # type: ignore[arg-type]
            out = sft_forward(model, batch)
            args = (out["logps"], out["prompt"], out["completion"], 0.3)
            count_values = [counts[k] for k in COUNT_KEYS]
            kwargs = {"sequence_level": sequence_level, "sequence_ids": out["sequence"]}
            losses[name] = (
                plw_loss(*args, *count_values, **kwargs)[0],
                ln_plw_loss(*args, *count_values, **kwargs)[0],
                irl_loss(
                    out["logps"],
                    out["lse"],
                    out["target"],
                    out["prompt"],
                    out["completion"],
                    *count_values,
                    lambda_td=0.5,
                    prompt_loss_weight=0.3,
                    **kwargs,
                )[0],
            )
            losses[name + "-counts"] = tuple(float(counts[k]) for k in COUNT_KEYS)
    assert losses["packed-counts"] == losses["unpacked-counts"]
    assert losses["packed-counts"][2] == len(docs)  # one sequence per document, not per row
    for got, want in zip(losses["packed"], losses["unpacked"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
