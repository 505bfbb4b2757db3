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
from typing import Any

import torch

from post_training.losses import dpo_loss, qrpo_loss
from post_training.losses.dpo import REFERENCE_FREE
from post_training.losses.logprobs import shift_labels
from post_training.trainers.base import Trainer
from post_training.trainers.sft import sft_forward

log = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


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
    """Shared forward, reference log-probs, normalisation and metrics; subclasses pick the loss."""

    reference_free = False

    def __init__(self, *args: Any, ref_model: torch.nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)

    # --------------------------------------------------------------------------- subclass API
    def loss_from(
        self,
        stats: dict[str, torch.Tensor],
        ref: tuple[torch.Tensor, torch.Tensor] | None,
        batch: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --------------------------------------------------------------------------- loop hooks
    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"num_pairs": (batch["attention_mask"].sum(-1) > 0).sum()}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        out = sft_forward(model, batch, int(self.args.get("loss_chunk_size") or 0))
        return pair_statistics(out, batch)

    @torch.no_grad()
    def reference_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.reference_free:
            return None
        if all(k in batch for k in REF_KEYS):
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.ref_model is not None:
            ref = self.forward(self.ref_model, batch)
        else:  # PEFT: the policy without its adapters is the reference
            inner = self.accelerator.unwrap_model(model)
            if not hasattr(inner, "disable_adapter"):
                raise RuntimeError("no reference log-probs: no columns, no ref model, no PEFT")
            was_training = model.training
            model.eval()
            with inner.disable_adapter():
                ref = self.forward(model, batch)
            model.train(was_training)
        return ref["chosen_logps"].detach(), ref["rejected_logps"].detach()

    def compute_loss(self, model, batch, counts):
        ref = self.reference_logps(model, batch)
        stats = self.forward(model, batch)
        per_pair, metrics = self.loss_from(stats, ref, batch)
        loss = per_pair.sum() / counts["num_pairs"].clamp(min=1)
        sums = {key: value.detach().float().sum() for key, value in metrics.items()}
        for side in ("chosen", "rejected"):
            sums[f"logits/{side}_sum"] = stats[f"{side}_logit_sum"].sum()
            sums[f"logits/{side}_tokens"] = stats[f"{side}_lengths"].sum().detach()
        return loss, sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        pairs = max(counts.get("num_pairs", 0.0), 1.0)
        out = {}
        for key, value in sums.items():
            if key == "loss" or key.startswith("logits/"):
                continue
            out[key] = value / pairs
        for side in ("chosen", "rejected"):
            tokens = max(sums.get(f"logits/{side}_tokens", 0.0), 1.0)
            out[f"logits/{side}"] = sums.get(f"logits/{side}_sum", 0.0) / tokens
        return out

    def precompute_reference(self, examples: list[dict], batch_size: int) -> None:
        """Fill ``ref_chosen_logps`` / ``ref_rejected_logps`` of ``examples`` in place."""
        from post_training.data_sft.collate import pad_collate

        model = self.ref_model if self.ref_model is not None else self.model
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = pad_collate(chunk, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            batch = {k: v for k, v in batch.items() if k not in REF_KEYS}
            chosen, rejected = self.reference_logps(model, batch)
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                example["ref_chosen_logps"] = c
                example["ref_rejected_logps"] = r


class DPOTrainer(PreferenceTrainer):
    """``trainer=dpo``: ``trainer.loss_type`` in the DPO family, or reference-free simpo / orpo."""

    def __init__(self, *args: Any, **kwargs: Any):
        cfg = args[0]
        self.reference_free = cfg["trainer"]["loss_type"] in REFERENCE_FREE
        super().__init__(*args, **kwargs)

    def loss_from(self, stats, ref, batch):
        options = {k: v for k, v in self.cfg["trainer"].items() if k not in ("name",)}
        ref_c, ref_r = ref if ref is not None else (None, None)
        return dpo_loss(
            stats["chosen_logps"],
            stats["rejected_logps"],
            ref_c,
            ref_r,
            stats["chosen_lengths"],
            stats["rejected_lengths"],
            **options,
        )


class QRPOTrainer(PreferenceTrainer):
    """``trainer=qrpo``: quantile reward policy optimisation (arXiv 2507.08068)."""

    def loss_from(self, stats, ref, batch):
        for key in ("chosen_quantile_reward", "rejected_quantile_reward"):
            if key not in batch:
                raise KeyError(
                    f"QRPO needs '{key}' per pair: precompute it, or give chosen_reward, "
                    "rejected_reward and ref_rewards in the dataset"
                )
        options = {k: v for k, v in self.cfg["trainer"].items() if k not in ("name",)}
        per_pair, metrics = qrpo_loss(
            stats["chosen_logps"],
            stats["rejected_logps"],
            ref[0],
            ref[1],
            batch["chosen_quantile_reward"].float(),
            batch["rejected_quantile_reward"].float(),
            stats["chosen_lengths"],
            stats["rejected_lengths"],
            **options,
        )
        capped = metrics.get("beta_capped_fraction")
        if capped is not None and float(capped.max()) > 0:
            log.warning(
                "QRPO: trainer.beta_cap=%s binds for %.1f%% of this batch's completions",
                self.cfg["trainer"].get("beta_cap"),
                100 * float(capped.float().mean()),
            )
        return per_pair, metrics


PREFERENCE_TRAINERS = {"dpo": DPOTrainer, "qrpo": QRPOTrainer}
