"""Chunked log-probabilities: exact against full logits, and no [N, V] tensor kept or made."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from post_training.losses import chunked_logps_and_lse, plain_logps_and_lse

Fn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _inputs(
    n: int,
    v: int,
    h: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Leaf ``hidden`` [n, h], ``weight`` [v, h], optional ``bias`` [v], ``targets`` with -100s."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::3] = -100
    return hidden, weight, b, targets


def _run(
    fn: Fn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: tuple[torch.Tensor | None, torch.Tensor | None],
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Forward, backward of ``sum(a * logps) + sum(b * lse)``; returns values and input grads."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for leaf in leaves:
        leaf.grad = None
    logps, lse, _ = fn(hidden, weight, targets, bias=bias, **kwargs)
    a, b = coef
    loss = sum((c * out).sum() for c, out in ((a, logps), (b, lse)) if c is not None)
    loss.backward()
    grads = [t.grad if t is not None else None for t in (hidden, weight, bias)]
    return logps.detach(), lse.detach(), grads


def _coef(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.randn(n, generator=gen)


@pytest.mark.parametrize(
    ("n", "chunk_size", "bias"),
    [(37, 8, True), (37, 8, False), (10, 64, True), (9, 1, True), (16, 4, False), (12, 0, True)],
)
def test_matches_plain_values_and_grads_fp32(n: int, chunk_size: int, bias: bool) -> None:
    hidden, weight, b, targets = _inputs(n, 50, 16, bias=bias)
    coef = _coef(n)
    ref = _run(plain_logps_and_lse, hidden, weight, b, targets, coef)
    got = _run(chunked_logps_and_lse, hidden, weight, b, targets, coef, chunk_size=chunk_size)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert (got[0][targets == -100] == 0).all()
    assert got[0].dtype == got[1].dtype == torch.float32
    for g, r in zip(got[2], ref[2], strict=True):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["logps", "lse"])
def test_single_output_used(which: str) -> None:
    """Only one output in the loss: the other's gradient arrives as None and counts as 0."""
    hidden, weight, b, targets = _inputs(21, 30, 8, bias=True)
    a, c = _coef(21)
    coef = (a, None) if which == "logps" else (None, c)
    ref = _run(plain_logps_and_lse, hidden, weight, b, targets, coef)
    got = _run(chunked_logps_and_lse, hidden, weight, b, targets, coef, chunk_size=5)
    for g, r in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64() -> None:
    hidden, weight, bias, targets = _inputs(7, 11, 4, dtype=torch.float64, bias=True)

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return chunked_logps_and_lse(h, w, targets, chunk_size=3, bias=b)[:2]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_bf16_close_to_fp32_reference() -> None:
    hidden, weight, bias, targets = _inputs(40, 64, 32, dtype=torch.bfloat16, bias=True)
    coef = _coef(40)
    got = _run(chunked_logps_and_lse, hidden, weight, bias, targets, coef, chunk_size=16)
    same = _run(plain_logps_and_lse, hidden, weight, bias, targets, coef)
    fp32 = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = _run(plain_logps_and_lse, fp32[0], fp32[1], fp32[2], targets, coef)
    assert got[0].dtype == got[1].dtype == torch.float32
    for out, r in zip(got[:2], ref[:2], strict=True):
        torch.testing.assert_close(out, r, rtol=2e-2, atol=5e-2)
    for out, s in zip(got[:2], same[:2], strict=True):  # same bf16 logits, same fp32 math
        torch.testing.assert_close(out, s, rtol=1e-2, atol=2e-2)
    for g, r, leaf in zip(got[2], ref[2], (hidden, weight, bias), strict=True):
        assert g is not None and r is not None and g.dtype == leaf.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)


def test_autocast_casts_inputs_and_returns_grads_in_param_dtype() -> None:
    hidden, weight, _, targets = _inputs(24, 40, 16)
    coef = _coef(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(chunked_logps_and_lse, hidden, weight, None, targets, coef, chunk_size=5)
    ref = _run(plain_logps_and_lse, hidden, weight, None, targets, coef)
    assert got[2][0].dtype == got[2][1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got[2][1], ref[2][1], rtol=5e-2, atol=5e-2)


def test_frozen_weight_gives_hidden_grad_only() -> None:
    hidden, weight, _, targets = _inputs(19, 30, 8)
    weight.requires_grad_(False)
    coef = _coef(19)
    ref = _run(plain_logps_and_lse, hidden, weight, None, targets, coef)
    shapes: list[tuple[int, ...]] = []

    class _Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in tree_flatten(out)[0] if torch.is_tensor(t))
            return out

    logps, lse, _ = chunked_logps_and_lse(hidden, weight, targets, chunk_size=4)
    hidden.grad = None
    with _Shapes():
        ((coef[0] * logps).sum() + (coef[1] * lse).sum()).backward()
    assert weight.grad is None
    assert tuple(weight.shape) not in shapes, "a weight-shaped gradient was built"
    torch.testing.assert_close(hidden.grad, ref[2][0], rtol=1e-5, atol=1e-6)


def _saved_bytes(fn: Fn, n: int, v: int, h: int, **kwargs: Any) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn``'s forward."""
    hidden, weight, _, targets = _inputs(n, v, h)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden, weight, targets, **kwargs)
    return total


def test_saved_for_backward_has_no_n_by_v_tensor() -> None:
    n, h = 2048, 64
    chunked = {
        v: _saved_bytes(chunked_logps_and_lse, n, v, h, chunk_size=256) for v in (4096, 8192)
    }
    plain = _saved_bytes(plain_logps_and_lse, n, 8192, h)
    assert plain >= n * 8192 * 4, "the reference keeps the [N, V] fp32 logits"
    assert chunked[8192] < plain / 10
    weight_diff = (8192 - 4096) * h * 4
    assert abs((chunked[8192] - chunked[4096]) - weight_diff) <= 0.01 * weight_diff


class _MaxAlloc(TorchDispatchMode):
    """Records the largest storage behind any op output (the largest buffer ever touched)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                self.max_bytes = max(self.max_bytes, t.untyped_storage().nbytes())
        return out


def _max_alloc(fn: Fn, n: int, v: int, h: int, **kwargs: Any) -> tuple[int, int, int]:
    hidden, weight, _, targets = _inputs(n, v, h)
    coef = _coef(n)
    mode = _MaxAlloc()
    with mode:
        logps, lse, _ = fn(hidden, weight, targets, **kwargs)
        forward_ops = mode.ops
        ((coef[0] * logps).sum() + (coef[1] * lse).sum()).backward()
    return mode.max_bytes, forward_ops, mode.ops


def test_largest_tensor_is_one_chunk_of_logits() -> None:
    n, v, h, chunk = 2048, 8192, 64, 256
    chunked, fwd_ops, all_ops = _max_alloc(chunked_logps_and_lse, n, v, h, chunk_size=chunk)
    assert all_ops > fwd_ops + n // chunk, "backward ops were seen by the dispatch mode"
    plain, _, _ = _max_alloc(plain_logps_and_lse, n, v, h)
    assert chunked <= 2 * chunk * v * 4
    assert plain >= n * v * 4


def test_tiny_llama_matches_full_logits() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=80,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 80, (2, 11), generator=gen)
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    targets[1, :3] = -100
    a, b = (c.view(2, 11) for c in _coef(22))

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    logits = model(input_ids).logits.float()
    lse_ref = torch.logsumexp(logits, -1)
    logp_ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    logp_ref = torch.where(targets != -100, logp_ref, 0.0)
    ((a * logp_ref).sum() + (b * lse_ref).sum()).backward()
    ref_grads = grads()

    hidden = model.model(input_ids).last_hidden_state
    logps, lse, _ = chunked_logps_and_lse(
        hidden.reshape(-1, 64), model.lm_head.weight, targets.reshape(-1), chunk_size=7
    )
    ((a.reshape(-1) * logps).sum() + (b.reshape(-1) * lse).sum()).backward()
    got_grads = grads()

    torch.testing.assert_close(logps.view(2, 11), logp_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.view(2, 11), lse_ref.detach(), rtol=1e-5, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_correct_flags_argmax_hits_like_the_plain_computation() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 8), torch.randn(13, 8)
    targets = torch.randint(0, 13, (50,))
    targets[::7] = -100
    targets[1] = (hidden[1] @ weight.T).argmax()  # at least one hit
    *_, chunked = chunked_logps_and_lse(hidden, weight, targets, chunk_size=6)
    *_, plain = plain_logps_and_lse(hidden, weight, targets)
    expected = ((hidden @ weight.T).argmax(-1) == targets) & (targets != -100)
    assert torch.equal(chunked, expected.float()) and torch.equal(plain, expected.float())
    assert chunked[1] == 1 and not chunked.requires_grad


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
def test_grad_hint_forms_gradients_in_forward_exactly(bias: bool) -> None:
    """A loss linear in logps (here ``3.7 · Σ a·logps``) with the hint ``a``: the same values
    and gradients as full logits, and backward runs no matmul (no recomputation); without the
    hint backward recomputes (3 matmuls per chunk: logits, hidden and weight gradients)."""
    n, chunk = 37, 8
    hidden, weight, b, targets = _inputs(n, 50, 16, bias=bias)
    a, _ = _coef(n)
    ref = _run(plain_logps_and_lse, hidden, weight, b, targets, (3.7 * a, None))
    for hint, backward_matmuls in ((a, 0), (None, 3 * 5)):
        for leaf in (hidden, weight, b):
            if leaf is not None:
                leaf.grad = None
        logps, _, _ = chunked_logps_and_lse(hidden, weight, targets, chunk, b, grad_hint=hint)
        loss = 3.7 * (a * logps).sum()
        with _CountMatmuls() as counter:
            loss.backward()
        assert counter.count == backward_matmuls
        torch.testing.assert_close(logps.detach(), ref[0], rtol=1e-5, atol=1e-6)
        for leaf, r in zip((hidden, weight, b), ref[2], strict=True):
            if leaf is not None:
                torch.testing.assert_close(leaf.grad, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["other_coefficients", "uses_lse", "frozen_weight"])
def test_a_wrong_hint_falls_back_to_the_exact_backward(case: str) -> None:
    """The hint is only a guess: a gradient that is not a multiple of it, or that has an lse
    part, still gets the exact gradients (recomputed); a frozen head still gets hidden's."""
    n = 23
    hidden, weight, b, targets = _inputs(n, 40, 8, bias=True)
    if case == "frozen_weight":
        weight.requires_grad_(False)
        b.requires_grad_(False)
    a, c = _coef(n)
    coef = {"other_coefficients": (c, None), "uses_lse": (a, c), "frozen_weight": (a, None)}[case]
    ref = _run(plain_logps_and_lse, hidden, weight, b, targets, coef)
    got = _run(chunked_logps_and_lse, hidden, weight, b, targets, coef, chunk_size=5, grad_hint=a)
    for g, r in zip(got[2], ref[2], strict=True):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
