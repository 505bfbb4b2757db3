"""The reward-model trainer: a one-label sequence classifier trained on preference pairs with
the Bradley–Terry loss (``post_training.losses.reward_loss``) behind the shared loop of
``base.Trainer``.

Rows are the preference trainer's: one pair per row, chosen then rejected, ``position_ids``
restarting at the rejected side, so one padding-free forward scores both (or, with
``training_args.packing``, several pairs per row). The model's head
(``score``) gives a scalar at every position; a conversation's reward is the one at its last
token that is not the pad token — where ``AutoModelForSequenceClassification`` pools when it
scores the conversation alone, as ``data_alignment.compute_rewards`` does with the saved
model. The head is read through the model's own forward (its output captured), so DDP, FSDP
and ZeRO wrap the model as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from post_training.data_preference.collate import (
    document_index,
    pair_collate,
    pair_slots,
    per_pair,
    real_pairs,
)
from post_training.trainers.base import Trainer
from post_training.trainers.preference import pack_capacity
from post_training.trainers.sft import model_inputs


def score_head(model: nn.Module) -> nn.Module:
    """The one-label head of a sequence classifier (``score``, or ``classifier``), inside a
    DDP / DeepSpeed wrapper (``.module``); a PEFT model forwards the name to its trained copy
    of the head (a module to save)."""
    base = getattr(model, "module", model)
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(base).__name__} has no sequence-classification head (score)")


@contextmanager
def captured_scores(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``captured["scores"]`` is the head's per-token output [B, T, 1] of the
    last forward (the model then pools it as usual; the pooled value is not used). A forward
    hook sees the output as the module returns it, after the wrappers' own hooks (ZeRO-3
    attaches the hook that gathers the head's weight for backward to that output tensor)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        captured["scores"] = output

    handle = head.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def document_ends(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> torch.Tensor:
    """[R, 2P] positions of each pair slot's chosen (document 2p) and rejected (document 2p+1)
    conversation's last token that is not ``pad_token_id`` (HF's pooling rule; its last token
    when none); an empty slot (a packed row with fewer pairs) gets position 0."""
    mask = batch["attention_mask"].bool()
    document = document_index(batch)  # the padding after the last pair: its own document
    index = torch.arange(document.shape[1], device=document.device).expand_as(document)
    real = mask if pad_token_id is None else mask & (batch["input_ids"] != pad_token_id)
    ends = []
    for doc in range(2 * pair_slots(batch)):
        inside = mask & (document == doc)
        candidates = torch.where(inside & real, index, -1).amax(-1)
        fallback = torch.where(inside, index, -1).amax(-1)  # every token is the pad token
        ends.append(torch.where(candidates >= 0, candidates, fallback).clamp(min=0))
    return torch.stack(ends, -1)


def pair_rewards(
    model: nn.Module, batch: dict[str, torch.Tensor], pad_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of the chosen and rejected conversation of each pair ([B] one pair per row,
    [N] packed: :mod:`post_training.data_preference.collate`)."""
    with captured_scores(score_head(model)) as captured:
        model(**model_inputs(batch))
    scores = captured["scores"].squeeze(-1)  # [R, T]
    picked = scores.gather(1, document_ends(batch, pad_token_id))  # [R, 2P]
    return per_pair(picked[:, 0::2], batch), per_pair(picked[:, 1::2], batch)


class RewardTrainer(Trainer):
    """``train_reward``: Bradley–Terry on pairs; the loss divides by the window's pairs."""

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"num_pairs": real_pairs(batch).sum()}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """As the preference trainer's: one pair per row, or packed (``training_args.packing``)."""
        return pair_collate(examples, self.tokenizer.pad_token_id, pack_capacity(self.config))

    def compute_loss(self, model, batch, counts):
        chosen, rejected = pair_rewards(model, batch, self.tokenizer.pad_token_id)
        losses, metrics = self.loss(chosen, rejected, batch)
        real = real_pairs(batch).to(losses.dtype)
        loss = (losses * real).sum() / counts["num_pairs"].clamp(min=1)
        sums = {key: (value.float() * real).sum() for key, value in metrics.items()}
        return loss, sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return self.loss.summarize(sums, counts)
