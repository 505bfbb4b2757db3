"""CPO and AlphaPO (``trainer=cpo``): against formulas written here and TRL 1.16's
``trl.experimental.cpo.CPOTrainer.cpo_loss`` on the same per-pair log-probs (TRL's loss is its
``cpo_loss`` mean plus ``cpo_alpha`` times the chosen tokens' NLL; one pair at a time the NLL
is our per-pair length-averaged one)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from post_training.losses.cpo import CPO_LOSS_TYPES, cpo_loss
from post_training.losses.table import PREFERENCE_LOSSES, CPOLoss, build_loss
from tests.test_preference_losses import random_pairs

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def by_hand(loss_type, pc, pr, lc, lr, beta, gamma=0.5, eps=0.0, cpo_alpha=1.0, alpha=0.0):
    """One pair's CPO loss from the papers' formulas, on floats."""
    s_c, s_r = (pc / lc, pr / lr) if loss_type in ("ipo", "simpo", "alphapo") else (pc, pr)
    if alpha:
        s_c, s_r = (1 - math.exp(s_c) ** -alpha) / alpha, (1 - math.exp(s_r) ** -alpha) / alpha
    u = s_c - s_r
    if loss_type == "sigmoid":
        loss = -(1 - eps) * logsig(beta * u) - eps * logsig(-beta * u)
    elif loss_type == "hinge":
        loss = max(0.0, 1 - beta * u)
    elif loss_type == "ipo":
        loss = (u - 1 / (2 * beta)) ** 2
    else:
        v = beta * u - gamma
        loss = -(1 - eps) * logsig(v) - eps * logsig(-v)
    nll_weight = 0.0 if loss_type == "alphapo" else cpo_alpha
    return loss + nll_weight * (-pc / lc)


def trl_cpo(loss_type, pc, pr, lc, lr, beta, gamma, eps, cpo_alpha, alpha):
    """TRL's CPO loss of a batch: mean of ``cpo_loss`` + cpo_alpha · NLL (here the token mean
    of the chosen completion, which one pair's averaged log-prob is)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = CPOConfig(
        output_dir="/tmp/unused",
        loss_type=loss_type,
        alpha=alpha,
        cpo_alpha=cpo_alpha,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=eps,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    cpo = SimpleNamespace(
        alpha=config.alpha,
        loss_type=config.loss_type,  # alphapo → simpo, cpo_alpha → 0 (CPOConfig's sugar)
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=eps,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    averaged = config.loss_type in ("ipo", "simpo")
    c, r = (pc / lc, pr / lr) if averaged else (pc, pr)
    losses, chosen, rejected = CPOTrainer.cpo_loss(cpo, c, r)
    return losses + config.cpo_alpha * (-pc / lc), chosen, rejected


CASES = [(t, a) for t in CPO_LOSS_TYPES for a in (0.0, 0.2) if (t, a) != ("alphapo", 0.0)]


@pytest.mark.parametrize("loss_type,alpha", CASES)  # alphapo needs alpha != 0 (a rule below)
def test_cpo_matches_trl_and_the_formula(loss_type: str, alpha: float) -> None:
    eps = 0.1 if loss_type in ("sigmoid", "simpo", "alphapo") else 0.0
    pc, pr, _, _, lc, lr = random_pairs(seed=11)
    losses, metrics = cpo_loss(pc, pr, lc, lr, beta=0.3, loss_type=loss_type, cpo_alpha=0.7,
                               simpo_gamma=0.4, label_smoothing=eps, alpha=alpha)  # fmt: skip
    expected, chosen, rejected = trl_cpo(loss_type, pc, pr, lc, lr, 0.3, 0.4, eps, 0.7, alpha)
    torch.testing.assert_close(losses, expected.to(losses.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        metrics["rewards/chosen"], chosen.to(losses.dtype), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        metrics["rewards/rejected"], rejected.to(losses.dtype), rtol=1e-5, atol=1e-5
    )
    for i in range(len(pc)):
        hand = by_hand(loss_type, pc[i].item(), pr[i].item(), lc[i].item(), lr[i].item(), 0.3,
                       0.4, eps, 0.7, alpha)  # fmt: skip
        assert losses[i].item() == pytest.approx(hand, rel=1e-9, abs=1e-12)


def test_cpo_is_reference_free_and_in_the_table() -> None:
    loss = build_loss({"name": "cpo", "loss_type": "simpo", "beta": 2.0}, PREFERENCE_LOSSES)
    assert isinstance(loss, CPOLoss) and not loss.needs_reference
    pc, pr, _, _, lc, lr = random_pairs(seed=12)
    stats = {"chosen_logps": pc, "rejected_logps": pr, "chosen_lengths": lc, "rejected_lengths": lr}
    losses, metrics = loss(stats, None, {})
    expected, _ = cpo_loss(pc, pr, lc, lr, beta=2.0, loss_type="simpo")
    torch.testing.assert_close(losses, expected)
    assert set(metrics) >= {"rewards/accuracies", "rewards/margins", "nll_loss", "logps/chosen"}


def test_gradients_flow_to_both_sides() -> None:
    pc, pr, _, _, lc, lr = random_pairs(seed=13)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _ = cpo_loss(pc, pr, lc, lr, loss_type="sigmoid")
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise chosen, lower rejected


@pytest.mark.parametrize(
    "options,match",
    [
        ({"loss_type": "dpo"}, "trainer.loss_type='dpo': Unknown CPO loss_type"),
        ({"loss_type": "alphapo"}, "trainer.alpha=0.0: loss_type=alphapo needs"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing has no meaning"),
        ({"label_smoothing": 0.5}, r"must be in \[0, 0.5\)"),
        ({"cpo_alpha": -1.0}, "trainer.cpo_alpha=-1.0"),
        ({"beta": 0.0}, "trainer.beta=0.0"),
    ],
)
def test_option_rules(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        CPOLoss(**options)
