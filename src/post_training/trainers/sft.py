"""Plain SFT trainer: feeds batches to :func:`post_training.losses.sft_loss`."""

from __future__ import annotations

import torch

from post_training.losses import next_token_logps, sft_loss, shift_labels
from post_training.trainers.base import Trainer


class SFTTrainer(Trainer):
    """Mean NLL over completion tokens (the token's own mask, aligned to the prediction)."""

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return shift_labels(batch["completion_mask"], 0).sum()

    def compute_loss(self, model, batch, num_loss_tokens):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = next_token_logps(logits, batch["labels"])
        mask = shift_labels(batch["completion_mask"], 0)
        return sft_loss(logps, mask, num_loss_tokens)
