"""The chunked LM-head path of the SFT forward equals the plain one and never builds [B, T, V]."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from post_training.trainers.lm_head import chunkable_head
from post_training.trainers.sft import sft_forward

VOCAB = 4096


def tiny_model() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 20))
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 8:] = 1
    completion *= attention
    return {"input_ids": ids, "attention_mask": attention, "prompt_mask": attention - completion,
            "completion_mask": completion}  # fmt: skip


class MaxNumel(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_chunked_head_equals_plain_values_and_gradients() -> None:
    results = []
    for chunk in (0, 16):
        model = tiny_model()
        out = sft_forward(model, batch(), chunk_size=chunk)
        loss = -(out["logps"] * out["completion"]).sum() + 0.1 * (out["lse"] ** 2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads))
    (plain, g_plain), (chunked, g_chunked) = results
    for key in ("logps", "lse", "correct", "logit_mean"):
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-5, atol=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-4, atol=1e-6)
    assert chunkable_head(tiny_model()) is not None


def test_chunked_head_never_materialises_full_logits() -> None:
    model, data = tiny_model(), batch()
    full = data["input_ids"].numel() * VOCAB
    # Bound: one chunk of logits, or the [V, H] weight (its gradient), whichever is larger.
    for chunk, bound in ((16, max(16, 32) * VOCAB), (0, full)):
        mode = MaxNumel()
        with mode:
            out = sft_forward(model, data, chunk_size=chunk)
            (-(out["logps"] * out["completion"]).sum()).backward()
        if chunk:
            assert mode.max <= bound < full, (mode.max, bound)
        else:
            assert mode.max >= full
    # the head is restored after the forward
    assert model.get_output_embeddings()(torch.zeros(1, 32)).shape == (1, VOCAB)


def test_chunked_head_under_fsdp2_equals_one_process_with_full_logits(tmp_path) -> None:
    """Two gloo ranks, the model sharded with FSDP2 (``fully_shard``, as accelerate's FSDP
    plugin does), the loss through the chunked head: the summed loss and the unsharded
    gradients equal one unsharded process computing full logits on the whole batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "fsdp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.fsdp_worker", str(out), "7"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = torch.load(out)

    model = tiny_model()
    full = batch()
    out_full = sft_forward(model, full, 0)
    tokens = full["completion_mask"][:, 1:].sum()
    loss = -(out_full["logps"] * out_full["completion"]).sum() / tokens
    loss.backward()
    torch.testing.assert_close(sharded["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(sharded["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("trainer", "plw_args"),
    [
        ("sft", {}),
        ("plw", {"prompt_loss_weight": 0.3, "sequence_level_loss": True}),
        ("ln-plw", {"prompt_loss_weight": 0.5, "sequence_level_loss": False}),
        ("irl", {"prompt_loss_weight": 0.0, "sequence_level_loss": False}),
    ],
)
def test_trainer_losses_through_the_hinted_head_equal_full_logits(
    trainer, plw_args, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SFT-family trainer's ``compute_loss``: chunked (with the gradient hint of the
    linear losses, formed in forward) = full logits, in loss and every gradient, with the
    upstream factor the loop applies (``loss × ranks × accumulation``)."""
    from types import SimpleNamespace

    from post_training.losses import chunked
    from post_training.losses.table import SFT_LOSSES, build_loss
    from post_training.trainers.sft import COUNT_KEYS, SFTTrainer

    scales = []  # what the hinted backward found: the upstream scalar, or None (fallback)
    original = chunked._scale_of
    monkeypatch.setattr(
        chunked, "_scale_of", lambda g, h: scales.append(original(g, h)) or scales[-1]
    )
    data = batch()
    results = []
    for chunk in (0, 7):
        model = tiny_model()
        obj = object.__new__(SFTTrainer)
        obj.args = SimpleNamespace(loss_chunk_size=chunk)
        section = {"name": trainer, "plw_args": plw_args}
        if trainer == "irl":
            section["irl_args"] = {"lambda_td": 0.5, "gamma": 1}
        obj.loss = build_loss(section, SFT_LOSSES)
        counts = {k: obj.loss_counts(data)[k].double() for k in COUNT_KEYS}
        loss, _ = obj.compute_loss(model, data, counts)
        (loss * 4).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_full, grads_full), (loss_chunked, grads_chunked) = results
    if trainer == "irl":  # not linear in the log-probs: no hint, the recomputing backward
        assert scales == []
    else:  # the hint was used: backward found the loop's factor 4 and formed no logits
        assert len(scales) == 1 and scales[0] is not None
        torch.testing.assert_close(scales[0].float(), torch.tensor(4.0))
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-5, atol=1e-6)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_chunked[name], grad, rtol=1e-4, atol=1e-6, msg=name)
