"""The SFT trainer: feeds next-token log-probs and masks to the loss object of ``trainer.name``.

The loss (``trainer=sft`` completion NLL, ``plw`` prompt-loss weighting, ``ln-plw``
length-normalised PLW, ``irl`` TD-regularised MLE) is chosen by the table in
:mod:`post_training.losses.table`; the trainer owns the forward pass and the counts that
normalise the loss over the whole accumulation window and all ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from post_training.losses import shift_labels
from post_training.losses.constants import IGNORE_INDEX
from post_training.losses.logprobs import next_token_logps_and_lse
from post_training.losses.plw import per_sequence
from post_training.losses.table import COUNT_KEYS
from post_training.trainers.base import Trainer
from post_training.trainers.lm_head import chunkable_head, logprob_head

__all__ = ["COUNT_KEYS", "SFTTrainer", "exact_matches", "model_inputs", "sft_forward"]


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 on tokens that some position predicts: real tokens, except a packed document's first
    (it would be predicted by the previous document)."""
    valid = batch["attention_mask"]
    if "position_ids" in batch:
        valid = valid * (batch["position_ids"] != 0)
    return valid


def sequence_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per position, the id of its packed document (unique in the batch); ``None`` unpacked."""
    if "position_ids" not in batch:
        return None
    rows, length = batch["position_ids"].shape
    docs = (batch["position_ids"] == 0).cumsum(-1) - 1
    offset = torch.arange(rows, device=docs.device).unsqueeze(-1) * length
    return (docs + offset).masked_fill(batch["attention_mask"] == 0, -1)


def sft_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The masks aligned to the predicted token: ``target`` (real, predicted), ``prompt``,
    ``completion``, and ``sequence`` (packed document ids, else None)."""
    ids = sequence_ids(batch)
    return {
        "target": shift_labels(target_mask(batch), 0),
        "prompt": shift_labels(batch["prompt_mask"], 0),
        "completion": shift_labels(batch["completion_mask"], 0),
        "sequence": None if ids is None else shift_labels(ids, -1),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The causal LM's inputs for a batch: packed batches (``position_ids``) go in without an
    attention mask and without a KV cache, so that transformers keeps attention inside each
    document; padded batches with their attention mask."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def sft_forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int = 0,
    grad_hint: torch.Tensor | None = None,
    sum_sq: bool = False,
) -> dict[str, torch.Tensor]:
    """Aligned per-token tensors: logps, lse, correct (argmax hit) and the shifted masks;
    with ``sum_sq``, also ``log_sum_sq`` (``log Σ_v p_v²``, detached; WPO's weights).

    Every real token is a target (PLW weights prompt tokens too); the masks select which count.
    With ``chunk_size > 0`` the LM head computes them chunk by chunk from the last hidden state
    (see :mod:`post_training.trainers.lm_head`): full-vocabulary logits are never held; a
    ``grad_hint`` [B, T] (the loss's gradient in the log-probs, up to a scalar) lets it form
    the gradients in the forward pass instead of recomputing the logits in backward.
    The model's inputs: :func:`model_inputs`.
    """
    tokens = batch["input_ids"].masked_fill(target_mask(batch) == 0, IGNORE_INDEX)
    inputs = model_inputs(batch)
    head = chunkable_head(model) if chunk_size > 0 else None
    if head is not None:
        targets = shift_labels(tokens, IGNORE_INDEX)
        with logprob_head(head, targets, chunk_size, grad_hint, sum_sq=sum_sq):
            logps, lse, correct, logit_mean, *extra = model(**inputs).logits.unbind(-1)
        extra = {"log_sum_sq": extra[0].detach()} if sum_sq else {}
    else:
        logits = model(**inputs).logits
        logps, lse, correct = next_token_logps_and_lse(logits, tokens)
        logit_mean = logits.detach().float().mean(-1)
        extra = {}
        if sum_sq:
            with torch.no_grad():
                wide = logits.float()
                extra["log_sum_sq"] = torch.logsumexp(2 * wide, -1) - 2 * lse.detach()
        del logits
    return {
        "logps": logps,
        "lse": lse,
        "correct": correct,
        "logit_mean": logit_mean,
        **extra,
        **sft_masks(batch),
    }


def last_turn(
    completion: torch.Tensor, prompt: torch.Tensor, sequence: torch.Tensor | None
) -> torch.Tensor:
    """Completion positions after the sequence's last prompt position: its final assistant
    turn (masks [B, T]; ``sequence`` as in :func:`per_sequence`)."""
    pos = torch.arange(completion.shape[-1], device=completion.device).expand_as(completion)
    prompt_pos = torch.where(prompt.bool(), pos, torch.full_like(pos, -1))
    if sequence is None:
        return completion.bool() & (pos > prompt_pos.amax(-1, keepdim=True))
    ids = sequence.clamp(min=0)
    last = torch.full((sequence.numel(),), -1, device=pos.device, dtype=pos.dtype)
    last = last.scatter_reduce(0, ids.reshape(-1), prompt_pos.reshape(-1), "amax")
    return completion.bool() & (sequence >= 0) & (pos > last[ids])


def exact_matches(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of sequences (packed documents) whose final assistant turn is, token for token,
    the argmax prediction under teacher forcing: exactly the sequences whose last turn greedy
    decoding reproduces, end-of-turn included (``evaluate``'s exact match), without running
    ``generate``."""
    final = last_turn(out["completion"], out["prompt"], out["sequence"]).to(out["correct"].dtype)
    misses = per_sequence((1 - out["correct"]) * final, out["sequence"])
    scored = per_sequence(final, out["sequence"]) > 0
    return (scored & (misses == 0)).sum()


class SFTTrainer(Trainer):
    """The SFT family's trainer: one forward, the masks and counts, and the loss object of
    ``trainer.name`` (:mod:`post_training.losses.table`: sft, plw, ln-plw, irl)."""

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prompt = shift_labels(batch["prompt_mask"], 0)
        completion = shift_labels(batch["completion_mask"], 0)
        ids = sequence_ids(batch)
        sequence = None if ids is None else shift_labels(ids, -1)
        return {
            "num_prompt_tokens": prompt.sum(),
            "num_completion_tokens": completion.sum(),
            "num_sequences": (per_sequence(completion, sequence) > 0).sum(),
        }

    def forward(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        grad_hint: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return sft_forward(model, batch, self.args.loss_chunk_size, grad_hint)

    def logp_gradient(
        self, batch: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``d loss / d logps`` of this micro-batch, from the loss itself at zero log-probs
        (for a loss linear in them, the gradient does not depend on where)."""
        masks = sft_masks(batch)
        with torch.enable_grad():
            probe = torch.zeros(
                masks["target"].shape, device=batch["input_ids"].device, requires_grad=True
            )
            loss, _ = self.loss({**masks, "logps": probe, "lse": probe.detach()}, counts)
            (grad,) = torch.autograd.grad(loss, probe)
        return grad

    def compute_loss(self, model, batch, counts):
        hint = None
        if self.loss.linear_in_logps and torch.is_grad_enabled() and self.args.loss_chunk_size:
            hint = self.logp_gradient(batch, counts)
        out = self.forward(model, batch, hint)
        loss, metrics = self.loss(out, counts)
        prompt_hits = (out["correct"] * out["prompt"]).sum()
        completion_hits = (out["correct"] * out["completion"]).sum()
        return loss, {
            **metrics,
            "prompt_correct_sum": prompt_hits.detach(),
            "completion_correct_sum": completion_hits.detach(),
            "exact_match_sum": exact_matches(out).detach(),
        }

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return self.loss.summarize(sums, counts)
