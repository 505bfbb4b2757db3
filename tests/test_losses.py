"""SFT loss against its formula, shift consistency, and exact gradient accumulation."""

from __future__ import annotations

import torch

from post_training.losses import next_token_logps, sft_loss, shift_labels


def test_next_token_logps_matches_log_softmax_and_shift() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    logps = next_token_logps(logits, labels)
    ref = torch.log_softmax(logits, -1)
    for b in range(2):
        for t in range(4):
            target = labels[b, t + 1].item()
            expected = 0.0 if target == -100 else ref[b, t, target].item()
            assert abs(logps[b, t].item() - expected) < 1e-6
    assert (logps[:, -1] == 0).all(), "the last position predicts nothing"


def test_sft_loss_is_masked_token_mean_over_given_count() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    loss, metrics = sft_loss(logps, mask, num_loss_tokens=3)
    assert torch.isclose(loss, torch.tensor((1 + 3 + 5) / 3))
    assert metrics["num_tokens"] == 3
    # With the window's total count, micro-batch losses add up to the big-batch mean.
    a, _ = sft_loss(logps[:1], mask[:1], 3)
    b, _ = sft_loss(logps[1:], mask[1:], 3)
    assert torch.isclose(a + b, loss)


def test_masks_are_shifted_with_their_tokens() -> None:
    completion = torch.tensor([[0, 0, 1, 1, 0]])
    assert shift_labels(completion, 0).tolist() == [[0, 1, 1, 0, 0]]
