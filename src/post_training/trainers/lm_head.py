"""Make a causal LM's head return per-token ``(logps, lse, correct)`` instead of full logits.

For one forward, the output-embedding module's ``forward`` is replaced by the chunked
computation of :func:`post_training.losses.chunked_logps_and_lse`. The model is still called
through its wrappers (DDP, FSDP, DeepSpeed, PEFT), whose hooks sit on ``__call__`` and so still
gather / synchronise the head's parameters; the [B, T, V] logits are never materialised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from post_training.losses import chunked_logps_and_lse


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The plain linear LM head, or None where the chunked path does not apply (e.g. logit
    soft-capping after the head, or an adapter-wrapped head)."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None


@torch.no_grad()
def log_sum_sq_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """``log Σ_v softmax(z)_v² = logsumexp(2z) − 2·logsumexp(z)`` per row of
    ``z = hidden @ weight.T (+ bias)``, in fp32, ``chunk_size`` rows at a time (no gradient)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    step = chunk_size if chunk_size > 0 else hidden.shape[0] or 1
    for start in range(0, hidden.shape[0], step):
        logits = torch.nn.functional.linear(hidden[start : start + step], weight, bias).float()
        out[start : start + step] = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(
            logits, -1
        )
    return out


@contextmanager
def logprob_head(
    head: nn.Linear,
    targets: torch.Tensor,
    chunk_size: int,
    grad_hint: torch.Tensor | None = None,
    sum_sq: bool = False,
) -> Iterator[None]:
    """Within the block, ``head(hidden)`` returns [B, T, 4] = (logps, lse, correct, logit_mean)
    for ``targets`` [B, T] (already aligned to the predictions; -100 ignored); ``grad_hint``
    [B, T]: see :func:`post_training.losses.chunked_logps_and_lse`. ``logit_mean``
    (the mean logit over the vocabulary, a metric) is linear in the hidden state:
    ``hidden · Σ_v W_v / V + mean(bias)``, so it needs no logits either. ``sum_sq``: a fifth
    channel, ``log Σ_v p_v²`` per position (WPO's weights; detached), from one more pass over
    the chunks' logits without gradient."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden.shape
        flat = hidden.reshape(-1, h)
        hint = None if grad_hint is None else grad_hint.reshape(-1)
        out = chunked_logps_and_lse(
            flat, head.weight, targets.reshape(-1), chunk_size, head.bias, grad_hint=hint
        )
        with torch.no_grad():
            weight = head.weight.float()
            mean = flat.float() @ (weight.sum(0) / weight.shape[0])
            if head.bias is not None:
                mean = mean + head.bias.float().mean()
        channels = [*out, mean.to(out[0].dtype)]
        if sum_sq:
            channels.append(log_sum_sq_probs(flat, head.weight, head.bias, chunk_size))
        # A fresh tensor, not a view: FSDP2 hooks the root module's output for its backward.
        return torch.stack([o.to(out[0].dtype).view(b, t) for o in channels], dim=-1)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward
