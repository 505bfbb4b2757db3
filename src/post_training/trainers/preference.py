"""Preference trainers: the DPO family and QRPO behind the shared loop of ``base.Trainer``.

Each micro-batch row is one pair (chosen and rejected back to back, ``position_ids`` restarting
at the rejected side), so one padding-free forward scores both. Summed completion log-probs per
side feed a pure loss in ``post_training.losses`` that returns per-pair losses; the step's loss is
their sum over the whole accumulation window and all ranks divided by the window's pair count.

Reference log-probs come, per batch, from (in this order): the batch's precomputed columns
(``ref_chosen_logps`` / ``ref_rejected_logps``, from the dataset or the ``precompute`` mode),
a frozen reference model, or the policy itself with its PEFT adapters disabled. Reference-free
losses (simpo, orpo) use none.
"""

from __future__ import annotations

import logging

import torch

from post_training.losses.logprobs import shift_labels
from post_training.trainers.base import Trainer, TrainerContext
from post_training.trainers.sft import sft_forward

log = logging.getLogger(__name__)


def pair_statistics(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict:
    """Per pair [B]: summed completion log-probs, completion lengths and mean logits of the
    chosen (document 0 of the row) and rejected (document 1) sides."""
    side = shift_labels((batch["position_ids"] == 0).cumsum(-1) - 1, -1)
    completion = out["completion"].to(out["logps"].dtype)
    stats = {}
    for name, index in (("chosen", 0), ("rejected", 1)):
        mask = completion * (side == index)
        lengths = mask.sum(-1)
        stats[f"{name}_logps"] = (out["logps"] * mask).sum(-1)
        stats[f"{name}_lengths"] = lengths
        stats[f"{name}_logit_sum"] = (out["logit_mean"] * mask).sum(-1).detach()
    return stats


class PreferenceTrainer(Trainer):
    """The preference family's trainer: one forward per pair, the reference log-probs of
    ``ctx.reference`` and the loss object of ``trainer.name`` (dpo family, qrpo)."""

    def __init__(self, ctx: TrainerContext) -> None:
        super().__init__(ctx)
        self.reference = ctx.reference
        self.reference.prepare(self.accelerator)
        if self.reference.precompute:  # one pass; the main process writes the cache
            with self.accelerator.main_process_first():
                self.reference.precompute_columns(
                    self.model,
                    [*self.train_data, *self.eval_data],
                    self.run.config,
                    self.tokenizer,
                    self.accelerator,
                )

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"num_pairs": (batch["attention_mask"].sum(-1) > 0).sum()}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        return pair_statistics(sft_forward(model, batch, self.args.loss_chunk_size), batch)

    def compute_loss(self, model, batch, counts):
        ref = self.reference.logps(model, batch, self.forward)
        stats = self.forward(model, batch)
        per_pair, metrics = self.loss(stats, ref, batch)
        loss = per_pair.sum() / counts["num_pairs"].clamp(min=1)
        sums = {key: value.detach().float().sum() for key, value in metrics.items()}
        for side in ("chosen", "rejected"):
            sums[f"logits/{side}_sum"] = stats[f"{side}_logit_sum"].sum()
            sums[f"logits/{side}_tokens"] = stats[f"{side}_lengths"].sum().detach()
        return loss, sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return self.loss.summarize(sums, counts)
