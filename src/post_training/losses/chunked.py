"""Per-token log-probabilities from the last hidden state and the LM head, chunk by chunk.

The plain computation materialises the full logits ``hidden @ weight.T`` as an [N, V] fp32
tensor and autograd keeps it (or the softmax) alive until backward. With N = batch × sequence
and V ≈ 10^5 that tensor dominates activation memory. :func:`chunked_logps_and_lse` instead
computes the logits for ``chunk_size`` rows at a time, keeps only the two [N] results, and in
backward recomputes each chunk's logits to form its gradient. Peak extra memory is
O(chunk_size × V) fp32 (plus an fp32 [V, H] accumulator for the weight gradient) instead of
O(N × V); what is saved for backward is the inputs and the [N] logsumexp, nothing of size
N × V. The cost is one extra ``hidden @ weight.T`` matmul in backward.

**Gradient hint (fused forward-backward).** A loss that is linear in the log-probs (SFT, PLW,
LN-PLW: ``Σ_t c_t · logp_t`` with coefficients fixed by the masks and the window counts) has
a gradient ``g_logp = s · c`` known up to the upstream scalar ``s`` before the forward. Given
``grad_hint = c``, the forward also forms each chunk's logit gradient while its logits are at
hand and accumulates ``g_hidden`` and ``g_weight`` then: three matmuls, as many as the plain
computation, and no recomputation. Backward checks that the gradient it receives really is
``s · c`` with no ``lse`` part (an O(N) test) and returns the precomputed gradients times
``s``; otherwise it falls back to the recomputing backward, so a wrong hint costs time, never
correctness. The price is an fp32 [V, H] gradient buffer held from forward to backward.

Math, per row with logits ``z`` (fp32), target ``y`` and ``lse = logsumexp(z)``:

* ``logp = z[y] - lse`` (0 where ``y`` is ignored), ``p = softmax(z) = exp(z - lse)``;
* ``d logp / d z = onehot(y) - p`` and ``d lse / d z = p``, so with upstream gradients
  ``g_logp`` and ``g_lse`` the logit gradient is
  ``g_z = g_logp · (onehot(y) - p) + g_lse · p = p · (g_lse - g_logp) + g_logp · onehot(y)``,
  where ``g_logp`` is taken as 0 on ignored rows (they still carry the ``lse`` part);
* ``z = hidden @ weight.T + bias`` gives ``g_hidden = g_z @ weight``,
  ``g_weight = g_z.T @ hidden`` and ``g_bias = g_z.sum(0)``, the last two summed over chunks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from post_training.losses.constants import IGNORE_INDEX

__all__ = ["chunked_logps_and_lse", "plain_logps_and_lse"]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the softmax math: fp32, or fp64 for fp64 inputs (so gradcheck can run)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T (+ bias)`` in the inputs' dtype, upcast to fp32 (a fresh tensor)."""
    logits = F.linear(hidden, weight, bias)
    return logits.to(_math_dtype(logits.dtype))


def _logit_grad_(
    logits: Tensor, lse: Tensor, g_logp: Tensor, g_lse: Tensor, targets: Tensor
) -> Tensor:
    """In place, one chunk's logits become their gradient:
    ``g_z = p · (g_lse - g_logp) + g_logp · onehot(targets)`` with ``p = exp(z - lse)``."""
    g_z = logits.sub_(lse.unsqueeze(1)).exp_()
    g_z.mul_((g_lse - g_logp).unsqueeze(1))
    return g_z.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1))


class _Grads:
    """Gradients of hidden / weight / bias accumulated chunk by chunk from logit gradients."""

    def __init__(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]
    ) -> None:
        dtype, device = _math_dtype(hidden.dtype), hidden.device
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=device) if needs[1] else None
        self.bias = (
            torch.zeros(weight.shape[0], dtype=dtype, device=device)
            if needs[2] and bias is not None
            else None
        )

    def add(self, g_z: Tensor, h: Tensor, weight: Tensor, rows: slice) -> None:
        if self.bias is not None:
            self.bias.add_(g_z.sum(0))
        g_z_in = g_z.to(h.dtype)  # the grad the logits' fp32 upcast would pass down
        if self.hidden is not None:
            self.hidden[rows] = g_z_in @ weight
        if self.weight is not None:
            if h.dtype == self.weight.dtype:
                self.weight.addmm_(g_z_in.T, h)
            else:
                self.weight.add_(g_z_in.T @ h)

    def result(self, weight: Tensor, bias: Tensor | None, scale: Tensor | None = None):
        out = []
        for grad, like in ((self.hidden, None), (self.weight, weight), (self.bias, bias)):
            if grad is not None:
                if scale is not None:  # scaled at fp32 or better, then back to the grad's dtype
                    wide = torch.promote_types(grad.dtype, scale.dtype)
                    grad = (grad.to(wide) * scale).to(grad.dtype)
                grad = grad if like is None else grad.to(like.dtype)
            out.append(grad)
        return tuple(out)


def _scale_of(grad: Tensor, hint: Tensor) -> Tensor | None:
    """``s`` with ``grad == s · hint`` (to fp32 rounding), else None."""
    norm = (hint * hint).sum()
    if not norm > 0:
        return None
    scale = (grad * hint).sum() / norm
    tolerance = 1e-5 * grad.abs().max() + 1e-30
    return scale if bool(((grad - scale * hint).abs() <= tolerance).all()) else None


class _ChunkedLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`chunked_logps_and_lse`; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_size: int,
        grad_hint: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, dtype = hidden.shape[0], _math_dtype(hidden.dtype)
        logps = torch.zeros(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        correct = torch.zeros(n, dtype=dtype, device=hidden.device)
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        hint = None if grad_hint is None or not any(needs) else grad_hint.to(dtype) * valid
        grads = None if hint is None else _Grads(hidden, weight, bias, needs)
        no_lse_grad = None if hint is None else torch.zeros_like(hint)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], weight, bias)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe[rows].unsqueeze(1)).squeeze(1)
                lse[rows] = chunk_lse
                logps[rows] = torch.where(valid[rows], target_logit - chunk_lse, 0.0)
                correct[rows] = ((logits.argmax(-1) == safe[rows]) & valid[rows]).to(dtype)
                if grads is not None and hint is not None and no_lse_grad is not None:
                    # In place: the logits become their gradient (no second [chunk, V]).
                    _logit_grad_(logits, chunk_lse, hint[rows], no_lse_grad[rows], safe[rows])
                    grads.add(logits, hidden[rows], weight, rows)
                del logits  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.hinted = (hint, grads)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(correct)
        return logps, lse, correct

    @staticmethod
    def backward(
        ctx: Any, grad_logps: Tensor | None, grad_lse: Tensor | None, _grad_correct: Any = None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        hint, hinted_grads = ctx.hinted
        ctx.hinted = (None, None)  # free the buffers whichever path is taken
        if (grad_logps is None and grad_lse is None) or not (
            need_hidden or need_weight or need_bias
        ):
            return None, None, None, None, None, None, None
        if hint is not None and hinted_grads is not None and grad_logps is not None:
            no_lse_part = grad_lse is None or not bool(grad_lse.any())
            valid_grad = grad_logps.to(hint.dtype) * (targets != IGNORE_INDEX)
            scale = _scale_of(valid_grad, hint) if no_lse_part else None
            if scale is not None:
                return (*hinted_grads.result(weight, bias, scale), None, None, None, None)

        n, device, dtype = hidden.shape[0], hidden.device, lse.dtype
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        zeros = torch.zeros(n, dtype=dtype, device=device)
        g_logp = zeros if grad_logps is None else grad_logps.to(dtype) * valid
        g_lse = zeros if grad_lse is None else grad_lse.to(dtype)

        grads = _Grads(hidden, weight, bias, (need_hidden, need_weight, need_bias))
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, n, ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                g_z = _chunk_logits(hidden[rows], weight, bias)
                g_z = _logit_grad_(g_z, lse[rows], g_logp[rows], g_lse[rows], safe[rows])
                grads.add(g_z, hidden[rows], weight, rows)
                del g_z
        return (*grads.result(weight, bias), None, None, None, None)


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(
            f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
            f" and {None if bias is None else bias.dtype}"
        )


def plain_logps_and_lse(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: full [N, V] fp32 logits, then ``(logps, lse)`` as in the chunked version.

    Simple and exact, but autograd keeps the [N, V] fp32 logits for backward.
    """
    _check_inputs(hidden, weight, targets, bias)
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(_math_dtype(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    valid = targets != IGNORE_INDEX
    logps = torch.where(valid, target_logit - lse, 0.0)
    correct = ((logits.argmax(-1) == targets.clamp(min=0)) & valid).to(logps.dtype)
    return logps, lse, correct.detach()


def chunked_logps_and_lse(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    grad_hint: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Target log-probabilities and logsumexp of ``hidden @ weight.T (+ bias)``, by row chunks.

    Args:
        hidden: [N, H] last hidden states (flatten [B, T, H] first), any float dtype.
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        targets: [N] long token ids; ``-100`` marks ignored rows.
        chunk_size: rows per chunk; ``<= 0`` falls back to :func:`plain_logps_and_lse`.
        bias: optional [V] LM-head bias, same dtype as ``hidden``.
        grad_hint: optional [N] expected gradient of the loss with respect to ``logps`` up to
            a scalar (a loss linear in the log-probs, not using ``lse``): the gradients are
            then formed in forward, without recomputation (see the module docstring); a
            gradient that turns out otherwise takes the recomputing backward.

    Returns:
        ``(logps, lse, correct)``, all [N] fp32 (fp64 for fp64 inputs, for ``gradcheck``):
        ``log_softmax(logits)[target]`` (0 on ignored rows), ``logsumexp(logits)`` (on every
        row), and ``correct`` = 1 where the argmax is the target (token accuracy; not
        differentiable). logps and lse are differentiable with respect to
        ``hidden``, ``weight`` and ``bias``; each chunk's logits are computed in the inputs'
        dtype and upcast to fp32 before the softmax math, in forward and again in backward,
        so no [N, V] tensor is ever held. Peak extra memory is O(chunk_size × V) fp32.

    Under autocast the inputs are first cast to the autocast dtype (as ``F.linear`` would do),
    so the matmuls run in that dtype and the casts' backward returns gradients in the
    original dtypes; inside, autocast is disabled so forward and backward agree.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_inputs(hidden, weight, targets, bias)
    if chunk_size <= 0:
        with torch.autocast(device_type=device_type, enabled=False):
            return plain_logps_and_lse(hidden, weight, targets, bias)
    needs = (
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    if not torch.is_grad_enabled():
        grad_hint = None
    return _ChunkedLogProbs.apply(hidden, weight, bias, targets, chunk_size, grad_hint, needs)
