"""Online RL losses (``post_training.losses.online``): each variant equals TRL 1.16's
``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` on the same tensors (loss and the
gradient of the per-token log-probs), the group advantages their formulas, and the window
normaliser makes micro-batches add up to the whole batch."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from post_training.losses.online import (
    NORMALISERS,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    rloo_rewards,
)

B, T, M = 6, 7, 9  # sequences, completion positions, max_completion_length


def _tensors(seed: int = 0, shifted: bool = True):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # the sampling policy: the current one moved enough that some ratios leave [0.8, 1.2]
    old = (logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)) if shifted else logps
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2], dtype=torch.float64)
    return logps, old, ref, mask, advantages


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


def _trl_self(logps, loss_type, level="token", beta=0.0, eps=(0.2, 0.28)):
    """A stand-in for TRL's trainer ``self``: its ``_compute_loss`` reads these attributes and
    gets the per-token log-probs from ``_get_per_token_logps_and_entropies``."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=M,
        accelerator=_Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
    )


def _inputs(mask, advantages, old=None, ref=None):
    out = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:
        out["old_per_token_logps"] = old
    if ref is not None:
        out["ref_per_token_logps"] = ref
    return out


CASES = [
    ("grpo", "grpo", "token", 0.0),
    ("grpo", "grpo", "token", 0.04),
    ("dapo", "dapo", "token", 0.0),
    ("dapo", "dapo", "token", 0.1),
    ("dr_grpo", "dr_grpo", "token", 0.04),
    ("gspo", "grpo", "sequence", 0.0),
]


@pytest.mark.parametrize(("variant", "trl_loss_type", "level", "beta"), CASES)
@pytest.mark.parametrize("shifted", [True, False], ids=["later-pass", "first-pass"])
def test_variant_equals_trl_grpo_loss_and_gradient(variant, trl_loss_type, level, beta, shifted):
    from trl import GRPOTrainer

    logps, old, ref, mask, advantages = _tensors(shifted=shifted)
    ours_logps = logps.clone().requires_grad_(True)
    terms = clipped_policy_loss(
        variant,
        ours_logps,
        old if shifted else ours_logps.detach(),
        advantages,
        mask,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        ref_logps=ref,
        max_completion_length=M,
    )
    counts = {"num_sequences": float(B), "num_completion_tokens": float(mask.sum())}
    ours = terms.loss_sum / counts[NORMALISERS[variant]]
    ours.backward()

    trl_logps = logps.clone().requires_grad_(True)
    fake = _trl_self(trl_logps, trl_loss_type, level, beta, (0.2, 0.28))
    inputs = _inputs(mask, advantages, old if shifted else None, ref if beta else None)
    theirs = GRPOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, rtol=1e-10, atol=1e-12)
    if shifted:  # the clip binds somewhere, both ways, so the test covers it
        assert bool(terms.low_clipped.any()) or bool(terms.high_clipped.any())
    if beta:
        kl_trl = fake._metrics["train"]["kl"][0]
        kl_ours = float((terms.kl * mask).sum() / mask.sum())
        assert kl_ours == pytest.approx(kl_trl, rel=1e-9)


def test_rloo_equals_trl_rloo_loss_and_gradient() -> None:
    from trl import RLOOTrainer

    logps, old, _, mask, advantages = _tensors()
    old_sums = (old * mask).sum(-1)
    ours_logps = logps.clone().requires_grad_(True)
    terms = clipped_policy_loss(
        "rloo", ours_logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28
    )
    (terms.loss_sum / B).backward()
    trl_logps = logps.clone().requires_grad_(True)
    fake = _trl_self(trl_logps, None, eps=(0.2, 0.28))
    inputs = {**_inputs(mask, advantages), "old_logps": old_sums}
    theirs = RLOOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()
    assert float(terms.loss_sum.detach() / B) == pytest.approx(float(theirs.detach()), rel=1e-12)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, rtol=1e-10, atol=1e-12)
    clipped = fake._metrics["train"]["clip_ratio/region_mean"][0]
    ours_clipped = float((terms.low_clipped | terms.high_clipped).double().mean())
    assert ours_clipped == pytest.approx(clipped)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    centred = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(
        centred, torch.tensor([0.5, -0.5, 0.0, 0.0, 0, 0, 0, 0], dtype=torch.float64)
    )
    scaled = group_advantages(rewards, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.5, 0.5]).double().std()
    torch.testing.assert_close(scaled[:4], centred[:4] / (std + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4, dtype=torch.float64))  # all equal: no signal
    loo = group_advantages(rewards, 4, "none", leave_one_out=True)
    # r_i − mean of the other three
    expected = [1.0 - 1 / 3, 0.0 - 2 / 3, 0.5 - 1.5 / 3, 0.5 - 1.5 / 3]
    torch.testing.assert_close(loo[:4], torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards[:1], 1, "none", leave_one_out=True)


def test_k3_kl_and_rloo_reward_penalty() -> None:
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    delta = ref - logps
    torch.testing.assert_close(k3_kl(logps, ref), delta.exp() - delta - 1)
    assert bool((k3_kl(logps, ref) >= 0).all()) and float(k3_kl(ref, ref).abs().max()) == 0
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    penalised = rloo_rewards(torch.tensor([1.0], dtype=torch.float64), logps, ref, mask, 0.1)
    assert float(penalised) == pytest.approx(1.0 - 0.1 * 0.5)


@pytest.mark.parametrize("variant", ["grpo", "dapo", "dr_grpo", "gspo", "rloo"])
def test_window_normaliser_makes_micro_batches_add_up(variant) -> None:
    """Two micro-batches, each divided by the whole window's count, sum to the whole batch's
    loss (TRL's per-micro-batch normalisers would not, for unequal lengths)."""
    logps, old, ref, mask, advantages = _tensors(seed=3)
    kwargs = {"beta": 0.04, "max_completion_length": M}

    def loss(rows):
        terms = clipped_policy_loss(
            variant, logps[rows], old[rows], advantages[rows], mask[rows], ref_logps=ref[rows],
            **kwargs,
        )  # fmt: skip
        return terms.loss_sum

    counts = {"num_sequences": float(B), "num_completion_tokens": float(mask.sum())}
    norm = counts[NORMALISERS[variant]]
    whole = loss(slice(0, B)) / norm
    parts = loss(slice(0, 2)) / norm + loss(slice(2, B)) / norm
    assert float(parts) == pytest.approx(float(whole), rel=1e-12)
    per_part = loss(slice(0, 2)) / (
        2 if NORMALISERS[variant] == "num_sequences" else mask[:2].sum()
    )
    per_part += loss(slice(2, B)) / (
        B - 2 if NORMALISERS[variant] == "num_sequences" else mask[2:].sum()
    )
    if NORMALISERS[variant] == "num_completion_tokens":  # TRL-style per-micro-batch means
        assert abs(float(per_part) / 2 - float(whole)) > 1e-6
