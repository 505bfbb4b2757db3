"""Preference trainers: the DPO family and QRPO behind the shared loop of ``base.Trainer``.

Each micro-batch row is one pair (chosen and rejected back to back, ``position_ids`` restarting
at the rejected side), so one padding-free forward scores both. Summed completion log-probs per
side feed a pure loss in ``post_training.losses`` that returns per-pair losses; the step's loss is
their sum over the whole accumulation window and all ranks divided by the window's pair count.

Reference log-probs come, per batch, from (in this order): the batch's precomputed columns
(``ref_chosen_logps`` / ``ref_rejected_logps``, from the dataset or the ``precompute`` mode),
a frozen reference model, or the policy itself with its PEFT adapters disabled. Reference-free
losses (simpo, orpo, cpo) use none.

KTO's rows have the same shape: document 0 is the unpaired example, document 1 the same prompt
with another example's completion (its KL completion); the row's ``kto_label`` says whether the
example is desirable, and the KL reference point ``z₀`` is estimated over the whole window
before the first gradient forward (:meth:`PreferenceTrainer._kl_sums`).
"""

from __future__ import annotations

import logging

import torch

from post_training.data_preference.collate import (
    document_index,
    pair_collate,
    pair_slots,
    per_pair,
    real_pairs,
)
from post_training.losses.logprobs import shift_labels
from post_training.trainers.base import Trainer, TrainerCallback, TrainerContext
from post_training.trainers.sft import sft_forward
from post_training.utils.distributed import sharding
from post_training.utils.launch_env import TR_DPO, refuse_sharded

log = logging.getLogger(__name__)


def pair_statistics(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ld_alpha: float | None = None
) -> dict:
    """Per pair ([B] unpacked, [N] packed: :mod:`post_training.data_preference.collate`):
    summed completion log-probs, completion lengths and mean logits of the chosen (document
    2p of the row) and rejected (document 2p+1) sides.

    ``ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv 2409.06411): the log-probs of each side's
    tokens beyond the shorter side's length count ``ld_alpha`` times (the lengths stay the
    full ones). With ``out["log_sum_sq"]`` (:func:`sft_forward` ``sum_sq=True``), also each
    side's WPO log-weight ``<side>_wpo_logw``: the mean over its completion tokens of
    ``logp − log Σ_v p_v²`` (WPO, Zhou et al. 2024, arXiv 2406.11827, Eq. 2), detached."""
    document = shift_labels(document_index(batch), -1).unsqueeze(1)  # [R, 1, T]
    slots = torch.arange(pair_slots(batch), device=document.device).view(1, -1, 1)
    completion = out["completion"].to(out["logps"].dtype).unsqueeze(1)
    masks = {  # [R, P, T]: the completion tokens of each slot's side
        name: completion * (document == 2 * slots + index)
        for name, index in (("chosen", 0), ("rejected", 1))
    }
    lengths = {name: mask.sum(-1) for name, mask in masks.items()}
    shared = torch.minimum(lengths["chosen"], lengths["rejected"]).unsqueeze(-1)
    logps = out["logps"].unsqueeze(1)
    stats = {}
    for name, mask in masks.items():
        token_logps = logps * mask
        if ld_alpha is not None:  # 1-based position of each token within its completion
            tail = (mask.cumsum(-1) > shared) & mask.bool()
            token_logps = torch.where(tail, ld_alpha * token_logps, token_logps)
        stats[f"{name}_logps"] = token_logps.sum(-1)
        stats[f"{name}_lengths"] = lengths[name]
        stats[f"{name}_logit_sum"] = (out["logit_mean"].unsqueeze(1) * mask).sum(-1).detach()
        if "log_sum_sq" in out:
            aligned = ((logps.detach() - out["log_sum_sq"].unsqueeze(1)) * mask).sum(-1)
            stats[f"{name}_wpo_logw"] = aligned / lengths[name].clamp(min=1)
    return {key: per_pair(value, batch) for key, value in stats.items()}


def pack_capacity(config) -> int | None:
    """Tokens per packed row of pairs (``training_args.packing``): two sides of at most
    ``model.max_seq_length`` each; ``None`` when pairs are not packed."""
    if not config.training_args.packing:
        return None
    return 2 * int(config.model.max_seq_length)


@torch.no_grad()
def mix_into(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """``target ← α·source + (1 − α)·target``, parameter by parameter (same names)."""
    sources = dict(source.named_parameters())
    for name, param in target.named_parameters():
        param.mul_(1.0 - alpha).add_(sources[name].detach().to(param.dtype), alpha=alpha)


class SyncReference(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): after every
    ``ref_model_sync_steps``-th optimizer step the frozen reference model becomes
    ``α·policy + (1 − α)·reference`` (``α = ref_model_mixup_alpha``), as TRL's
    ``sync_ref_model``. The reference is part of every checkpoint, so a resumed run continues
    from the same reference."""

    def __init__(self, reference: torch.nn.Module, alpha: float, every: int) -> None:
        self.reference, self.alpha, self.every = reference, alpha, every

    def on_step_end(self, trainer: Trainer, step: dict[str, float]) -> None:
        if trainer.state.global_step % self.every == 0:
            policy = trainer.accelerator.unwrap_model(trainer.model)
            mix_into(self.reference, policy, self.alpha)


class PreferenceTrainer(Trainer):
    """The preference family's trainer: one forward per pair, the reference log-probs of
    ``ctx.reference`` and the loss object of ``trainer.name`` (dpo family, qrpo)."""

    def __init__(self, ctx: TrainerContext) -> None:
        super().__init__(ctx)
        self.reference = ctx.reference
        self.reference.prepare(self.accelerator)
        self._ref_cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        if self.loss.sync_ref_model:
            refuse_sharded(TR_DPO, sharding(self.accelerator))  # (and at launch)
            assert self.reference.model is not None, "TR-DPO needs the frozen reference model"
            self.accelerator.register_for_checkpointing(self.reference.model)
            self.callbacks.append(
                SyncReference(
                    self.reference.model,
                    self.loss.ref_model_mixup_alpha,
                    self.loss.ref_model_sync_steps,
                )
            )
        if self.reference.precompute:  # one pass shared by the ranks; the main process caches
            self.reference.precompute_columns(
                self.model,
                [*self.train_data, *self.eval_data],
                self.run.config,
                self.tokenizer,
                self.accelerator,
            )

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """One pair per row, or (``training_args.packing``) the micro-batch's pairs packed into
        rows of ``2 × model.max_seq_length`` tokens (the longest a pair can be)."""
        return pair_collate(examples, self.tokenizer.pad_token_id, pack_capacity(self.config))

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pairs (KTO: examples) of the micro-batch; for KTO's reference point also the
        summed log-ratio of its KL completions (:meth:`_kl_sums`)."""
        counts = {"num_pairs": real_pairs(batch).sum()}
        if self.loss.window_kl:
            counts.update(self._kl_sums(batch))
        return counts

    @torch.no_grad()
    def _kl_sums(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """KTO's reference point, this micro-batch's share: ``Σ (logπ − logπ_ref)`` over the
        KL completions (document 1 of each row, a mismatched prompt/completion pair) and their
        count. The loop sums both over the accumulation window and all ranks before the first
        gradient forward, so ``z₀ = max(0, Σ / n)`` does not depend on how the window is cut
        (TRL estimates it per micro-batch). The reference log-probs are kept for
        :meth:`compute_loss` so a live reference scores each batch once."""
        ref = self.reference.logps(self.model, batch, self.forward)
        self._ref_cache[id(batch)] = ref
        stats = self.forward(self.model, batch)
        real = real_pairs(batch).to(stats["rejected_logps"].dtype)
        return {
            "kl_logratio_sum": ((stats["rejected_logps"] - ref[1]) * real).sum(),
            "kl_examples": real.sum(),
        }

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """The pair statistics of ``batch`` under ``model`` (policy or reference), with the
        loss's ``ld_alpha`` and, when it weights pairs (WPO), the per-token ``log Σ p²``."""
        out = sft_forward(
            model,
            batch,
            self.args.loss_chunk_size,
            sum_sq=self.loss.needs_sum_sq,
        )
        return pair_statistics(out, batch, self.loss.ld_alpha)

    def compute_loss(self, model, batch, counts):
        ref = self._ref_cache.pop(id(batch), None)
        if ref is None:
            ref = self.reference.logps(model, batch, self.forward)
        stats = self.forward(model, batch)
        if self.loss.window_kl:  # KTO's z₀ over the whole window (see _kl_sums)
            stats["kl"] = counts["kl_logratio_sum"] / counts["kl_examples"].clamp(min=1)
        per_pair, metrics = self.loss(stats, ref, batch)
        loss = per_pair.sum() / counts["num_pairs"].clamp(min=1)
        sums = {key: value.detach().float().sum() for key, value in metrics.items()}
        for side in ("chosen", "rejected"):  # unless the loss splits them itself (KTO)
            sums.setdefault(f"logits/{side}_sum", stats[f"{side}_logit_sum"].sum())
            sums.setdefault(f"logits/{side}_tokens", stats[f"{side}_lengths"].sum().detach())
        return loss, sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return self.loss.summarize(sums, counts)
