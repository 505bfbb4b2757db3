"""DPO family, SimPO, ORPO and QRPO: against formulas written here independently, and against TRL.

TRL 1.16 computes the DPO losses inline in ``DPOTrainer._compute_loss`` (after a model forward);
we call it with a stand-in ``self`` and a stand-in model that returns given per-token log-probs,
one pair at a time, so that every per-pair loss and metric is compared. SimPO and ORPO are
checked against ``trl.experimental``'s ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from post_training.losses import (
    DPO_LOSS_TYPES,
    REFERENCE_FREE,
    dpo_loss,
    log_partition,
    qrpo_loss,
    quantile_rewards,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


# Two hand-made pairs: summed log-probs, reference log-probs, completion lengths.
PC, PR = [-10.0, -4.0], [-12.0, -3.0]
RC, RR = [-11.0, -5.0], [-11.5, -4.5]
LC, LR = [4, 2], [5, 3]


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def by_hand(loss_type: str, i: int, beta: float, eps: float = 0.0, **kw) -> float:
    """The per-pair loss from the papers' formulas, on Python floats."""
    pc, pr, lc, lr = PC[i], PR[i], LC[i], LR[i]
    if loss_type == "simpo":
        u = beta * (pc / lc - pr / lr) - kw["gamma"]
        return -(1 - eps) * logsig(u) - eps * logsig(-u)
    if loss_type == "orpo":
        ac, ar = pc / lc, pr / lr
        odds_c, odds_r = math.exp(ac) / (1 - math.exp(ac)), math.exp(ar) / (1 - math.exp(ar))
        return -ac - kw["alpha"] * math.log(sig(math.log(odds_c / odds_r)))
    rho_c, rho_r = pc - RC[i], pr - RR[i]
    z = beta * (rho_c - rho_r)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "ipo":
        return (rho_c / lc - rho_r / lr - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        u = beta * (rho_c / lc - rho_r / lr)
        return -(1 - eps) * logsig(u) - eps * logsig(-u)
    if loss_type == "robust":
        return ((1 - eps) * -logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        # KL(softmax over {c, r} of β·ρ || (1-ε, ε))
        p_w, p_l = sig(z), sig(-z)
        return p_w * math.log(p_w / (1 - eps)) + p_l * math.log(p_l / eps)
    if loss_type == "nca_pair":
        return -logsig(beta * rho_c) - 0.5 * logsig(-beta * rho_c) - 0.5 * logsig(-beta * rho_r)
    if loss_type == "bco_pair":
        return -logsig(beta * rho_c) - logsig(-beta * rho_r)
    if loss_type == "sppo_hard":
        return (beta * rho_c - 0.5) ** 2 / beta**2 + (beta * rho_r + 0.5) ** 2 / beta**2
    if loss_type == "apo_zero":
        return (1 - sig(beta * rho_c)) + sig(beta * rho_r)
    if loss_type == "apo_down":
        return sig(beta * rho_c) + (1 - sig(z))
    if loss_type == "discopop":
        m = sig(z / kw["tau"])
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    raise AssertionError(loss_type)


def ours(loss_type: str, beta: float, **kw):
    ref = (None, None) if loss_type in REFERENCE_FREE else (t(RC), t(RR))
    return dpo_loss(t(PC), t(PR), *ref, t(LC), t(LR), beta=beta, loss_type=loss_type, **kw)


SMOOTHING = {"exo_pair": 0.01, "robust": 0.2, "sigmoid": 0.1, "sigmoid_norm": 0.1, "simpo": 0.1}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES + REFERENCE_FREE)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_each_loss_type_by_hand(loss_type: str, beta: float) -> None:
    eps = SMOOTHING.get(loss_type, 0.0)
    kw = {"simpo_gamma": 0.3, "orpo_alpha": 0.25, "discopop_tau": 0.05}
    losses, _ = ours(loss_type, beta, label_smoothing=eps, **kw)
    assert losses.shape == (2,)
    expected = [by_hand(loss_type, i, beta, eps, gamma=0.3, alpha=0.25, tau=0.05) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_label_smoothing_changes_sigmoid_and_simpo(loss_type: str) -> None:
    plain, _ = ours(loss_type, 0.5)
    smoothed, _ = ours(loss_type, 0.5, label_smoothing=0.1)
    assert plain.tolist() == pytest.approx([by_hand(loss_type, i, 0.5, gamma=0.5) for i in (0, 1)])
    assert not torch.allclose(plain, smoothed)


def test_reference_based_metrics_by_hand() -> None:
    beta = 0.5
    _, m = ours("ipo", beta)  # ipo averages in the loss, but rewards use the summed log-ratios
    chosen = [beta * (PC[i] - RC[i]) for i in (0, 1)]
    rejected = [beta * (PR[i] - RR[i]) for i in (0, 1)]
    assert m["rewards/chosen"].tolist() == pytest.approx(chosen)
    assert m["rewards/rejected"].tolist() == pytest.approx(rejected)
    assert m["rewards/margins"].tolist() == pytest.approx(
        [c - r for c, r in zip(chosen, rejected, strict=True)]
    )
    assert m["rewards/accuracies"].tolist() == [
        float(c > r) for c, r in zip(chosen, rejected, strict=True)
    ]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == PC and m["logps/rejected"].tolist() == PR
    assert m["nll_loss"].tolist() == pytest.approx([-PC[i] / LC[i] for i in (0, 1)])
    assert all(not v.requires_grad and v.shape == (2,) for v in m.values())


@pytest.mark.parametrize("loss_type", REFERENCE_FREE)
def test_reference_free_metrics_use_beta_times_average_logps(loss_type: str) -> None:
    beta = 2.0
    _, m = ours(loss_type, beta)
    assert m["rewards/chosen"].tolist() == pytest.approx([beta * PC[i] / LC[i] for i in (0, 1)])
    assert m["rewards/rejected"].tolist() == pytest.approx([beta * PR[i] / LR[i] for i in (0, 1)])
    assert m["logps/chosen"].tolist() == PC  # summed, as for every loss type
    if loss_type == "orpo":
        ac, ar = [PC[i] / LC[i] for i in (0, 1)], [PR[i] / LR[i] for i in (0, 1)]
        lor = [
            math.log(math.exp(a) / (1 - math.exp(a))) - math.log(math.exp(b) / (1 - math.exp(b)))
            for a, b in zip(ac, ar, strict=True)
        ]
        assert m["log_odds_chosen"].tolist() == pytest.approx(lor)
        assert m["log_odds_ratio"].tolist() == pytest.approx([logsig(x) for x in lor])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_nll_weight_adds_length_averaged_chosen_nll(loss_type: str) -> None:
    base, _ = ours(loss_type, 0.3)
    rpo, _ = ours(loss_type, 0.3, nll_weight=0.7)
    expected = [0.7 * -PC[i] / LC[i] for i in (0, 1)]
    assert (rpo - base).tolist() == pytest.approx(expected)


def test_per_pair_losses_are_not_averaged_and_have_gradients() -> None:
    chosen = t(PC).requires_grad_()
    losses, _ = dpo_loss(chosen, t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.5)
    losses.sum().backward()
    # d/dπ_c of −log σ(βΔ) is −β·σ(−βΔ)
    z = [0.5 * ((PC[i] - RC[i]) - (PR[i] - RR[i])) for i in (0, 1)]
    assert chosen.grad.tolist() == pytest.approx([-0.5 * sig(-x) for x in z])


def test_discopop_is_finite_for_large_negative_margins() -> None:
    pc, pr = t([-500.0]), t([-1.0])
    losses, _ = dpo_loss(
        pc, pr, t([-1.0]), t([-1.0]), t([5]), t([5]), beta=1.0, loss_type="discopop"
    )
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx(-logsig(-499.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "Unknown loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no meaning"),
        ({"loss_type": "exo_pair"}, "exo_pair needs"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"ref": None}, "needs ref_chosen_logps"),
        ({"loss_type": "simpo"}, "reference-free"),
        ({"loss_type": "orpo", "ref": None, "nll_weight": 1.0}, "already contains"),
        ({"lengths": t([0, 2])}, "chosen_lengths must be >= 1"),
        ({"rejected": t([[-1.0, -2.0]])}, "shape"),
    ],
)
def test_invalid_dpo_inputs_raise(kwargs, match) -> None:
    kwargs = dict(kwargs)
    ref = kwargs.pop("ref", (t(RC), t(RR)))
    ref = (None, None) if ref is None else ref
    lengths = kwargs.pop("lengths", t(LC))
    rejected = kwargs.pop("rejected", t(PR))
    with pytest.raises(ValueError, match=match):
        dpo_loss(t(PC), rejected, *ref, lengths, t(LR), **kwargs)


def test_orpo_refuses_probability_one() -> None:
    with pytest.raises(ValueError, match="< 0"):
        dpo_loss(t([0.0]), t([-1.0]), None, None, t([3]), t([3]), loss_type="orpo")


# --------------------------------------------------------------------------- TRL as the oracle


class StandInModel:
    """Returns given outputs, as TRL's fused-LM-head forward would (``outputs.log_probs``...)."""

    training = True

    def __init__(self, outputs: SimpleNamespace) -> None:
        self.outputs = outputs

    def __call__(self, **kwargs) -> SimpleNamespace:
        return self.outputs


def trl_dpo(loss_types, weights, beta, eps, tau, pc, pr, rc, rr, lc, lr):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on given summed log-probs: (loss, metrics)."""
    from trl import DPOTrainer

    logps, lengths = torch.cat([pc, pr]), torch.cat([lc, lr])
    width = int(lengths.max()) + 2
    completion_mask = torch.zeros(len(logps), width, dtype=torch.long)
    per_token = torch.zeros(len(logps), width - 1, dtype=logps.dtype)
    for row, (total, n) in enumerate(zip(logps.tolist(), lengths.tolist(), strict=True)):
        completion_mask[row, 1 : 1 + n] = 1  # position 0 is the prompt
        per_token[row, :n] = total / n  # aligned to completion_mask[:, 1:]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    model = StandInModel(outputs)
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_pairs(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 9, (n,), generator=g)
    lr = torch.randint(1, 9, (n,), generator=g)
    pc = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05) * lc
    pr = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05) * lr
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64) * 4
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64) * 4
    return pc, pr, rc, rr, lc, lr


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_types_match_trl(loss_type: str, beta: float) -> None:
    eps = (
        SMOOTHING.get(loss_type, 0.0) if loss_type not in ("sigmoid", "sigmoid_norm") else 0.0
    )  # TRL: no cDPO
    tau = 0.05
    pc, pr, rc, rr, lc, lr = pairs = random_pairs()
    losses, m = dpo_loss(
        pc, pr, rc, rr, lc, lr, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    batch_loss, batch_metrics = trl_dpo([loss_type], [1.0], beta, eps, tau, *pairs)
    torch.testing.assert_close(losses.mean(), batch_loss, rtol=1e-5, atol=1e-5)
    for key in METRICS:
        assert m[key].mean().item() == pytest.approx(batch_metrics[key], rel=1e-5, abs=1e-5)
    for i in range(len(pc)):  # one pair at a time: every per-pair value
        one = [x[i : i + 1] for x in pairs]
        loss_i, metrics_i = trl_dpo([loss_type], [1.0], beta, eps, tau, *one)
        assert losses[i].item() == pytest.approx(loss_i.item(), rel=1e-5, abs=1e-5)
        for key in (*METRICS, "logps/chosen", "logps/rejected"):
            assert m[key][i].item() == pytest.approx(metrics_i[key], rel=1e-5, abs=1e-5)


def test_nll_weight_matches_trl_sigmoid_plus_sft() -> None:
    pc, pr, rc, rr, lc, lr = pairs = random_pairs(seed=1)
    losses, _ = dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.2, nll_weight=0.6)
    for i in range(len(pc)):  # TRL's "sft" term is a token mean over the batch: one pair each
        one = [x[i : i + 1] for x in pairs]
        trl_loss, _ = trl_dpo(["sigmoid", "sft"], [1.0, 0.6], 0.2, 0.0, 0.05, *one)
        assert losses[i].item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(eps: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, lc, lr = random_pairs(seed=2)
    beta, gamma = 2.0, 1.2
    losses, m = dpo_loss(
        pc,
        pr,
        None,
        None,
        lc,
        lr,
        beta=beta,
        loss_type="simpo",
        simpo_gamma=gamma,
        label_smoothing=eps,
    )
    cpo = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=eps,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses, chosen, rejected = CPOTrainer.cpo_loss(cpo, pc / lc, pr / lr)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards/chosen"], chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards/rejected"], rejected, rtol=1e-5, atol=1e-5)


def test_orpo_matches_trl_orpo_trainer() -> None:
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _, lc, lr = random_pairs(seed=3)
    lam = 0.25  # TRL's ORPOConfig.beta is ORPO's λ and also scales TRL's logged rewards
    losses, m = dpo_loss(pc, pr, None, None, lc, lr, beta=lam, loss_type="orpo", orpo_alpha=lam)
    orpo = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms, chosen, rejected, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(
        orpo, pc / lc, pr / lr
    )
    # TRL's loss is nll − mean(trl_terms); its NLL is over prompt and completion tokens of the
    # batch, ours the per-pair completion average (checked by hand above): compare the OR part.
    torch.testing.assert_close(losses - m["nll_loss"], -trl_terms.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards/chosen"], chosen.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards/rejected"], rejected.double(), rtol=1e-5, atol=1e-5)
    assert m["log_odds_ratio"].mean().item() == pytest.approx(mean_ratio.item(), rel=1e-5)
    assert m["log_odds_chosen"].mean().item() == pytest.approx(mean_log_odds.item(), rel=1e-5)


# --------------------------------------------------------------------------- QRPO


@pytest.mark.parametrize(
    ("beta", "exact", "approx"), [(0.1, 0.769737, 0.7697415), (0.2, 0.6767603, 0.6781124)]
)
def test_log_partition_reference_values(beta: float, exact: float, approx: float) -> None:
    assert log_partition(beta).item() == pytest.approx(exact, abs=1e-6)
    assert log_partition(beta, approx=True).item() == pytest.approx(approx, abs=1e-6)
    # The formula itself, on floats: β·log(β(e^{1/β} − 1)) and β·log β + 1.
    assert log_partition(beta).item() == pytest.approx(
        beta * math.log(beta * math.expm1(1 / beta)), rel=1e-12
    )
    assert log_partition(beta, approx=True).item() == pytest.approx(
        beta * math.log(beta) + 1, rel=1e-12
    )


def quadrature(f, n: int = 400_001) -> float:
    """Simpson's rule for ∫_0^1 f(q) dq in float64."""
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((w * f(q)).sum() / (3 * (n - 1)))


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.3, 1.0, 5.0])
def test_log_partition_matches_quadrature(beta: float) -> None:
    identity = beta * math.log(quadrature(lambda q: torch.exp(q / beta)))
    assert log_partition(beta).item() == pytest.approx(identity, rel=1e-9)
    log = beta * math.log(quadrature(lambda q: q ** (1 / beta)))
    assert log_partition(beta, "log").item() == pytest.approx(log, rel=1e-6)
    assert log_partition(beta, "log").item() == pytest.approx(beta * math.log(beta / (1 + beta)))
    floor = 0.2
    floored = beta * math.log(quadrature(lambda q: q.clamp(min=floor) ** (1 / beta)))
    assert log_partition(beta, "log", min_quantile=floor).item() == pytest.approx(floored, rel=1e-6)


def test_log_partition_elementwise_and_stable_for_tiny_beta() -> None:
    betas = torch.tensor([1e-4, 0.1, 0.2, 50.0], dtype=torch.float64)
    values = log_partition(betas)
    assert torch.isfinite(values).all()  # e^{1/β} = e^{10000} would overflow
    assert values[0].item() == pytest.approx(1e-4 * math.log(1e-4) + 1, rel=1e-12)
    assert values[1:3].tolist() == pytest.approx([0.769737, 0.6767603], abs=1e-6)
    assert values[3].item() == pytest.approx(50 * math.log(50 * math.expm1(1 / 50)), rel=1e-10)
    assert values[3].item() == pytest.approx(0.5, abs=3e-3)  # β → ∞: E[q] = 1/2
    f32 = log_partition(torch.tensor([0.001, 0.1]))
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all()


def test_log_transform_partition_by_monte_carlo_over_reference_samples() -> None:
    """Z is an expectation under π_ref: draw rewards of 'reference completions', turn them into
    empirical quantiles against another reference sample, and average exp(log(q)/β)."""
    g = torch.Generator().manual_seed(0)
    beta = 0.5
    ref_rewards = torch.randn(1, 1000, generator=g, dtype=torch.float64) * 3 + 1
    samples = torch.randn(20_000, generator=g, dtype=torch.float64) * 3 + 1  # y ~ π_ref
    q = quantile_rewards(samples, ref_rewards.expand(len(samples), -1))
    z = torch.exp(torch.log(q) / beta).mean().item()
    assert beta * math.log(z) == pytest.approx(log_partition(beta, "log").item(), abs=0.01)
    z_identity = torch.exp(q / beta).mean().item()
    assert beta * math.log(z_identity) == pytest.approx(log_partition(beta).item(), abs=0.01)


def test_quantile_rewards_ties_and_ragged_mask() -> None:
    rewards = torch.tensor([2.0, 2.0, -5.0, 7.0])
    ref = torch.tensor(
        [
            [1.0, 2.0, 2.0, 3.0],  # ties count as ≤: 3/4
            [2.0, 2.0, 9.0, float("nan")],  # last one is padding: 2/3
            [0.0, 1.0, 99.0, 99.0],  # below all valid ones; padding (99) ignored: 0/2
            [7.0, 7.0, 7.0, 7.0],  # all tied: 1
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert quantile_rewards(rewards, ref, mask).tolist() == pytest.approx([0.75, 2 / 3, 0.0, 1.0])
    assert quantile_rewards(rewards[:1], ref[:1]).tolist() == [0.75]
    with pytest.raises(ValueError, match="non-finite"):
        quantile_rewards(rewards, ref)  # the NaN is no longer masked
    with pytest.raises(ValueError, match="no reference rewards"):
        quantile_rewards(rewards, ref, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="shape"):
        quantile_rewards(rewards, ref, mask[:, :2])


# QRPO hand-made pairs: summed log-probs, reference, quantile rewards, lengths.
QC, QR = [0.9, 0.25], [0.4, 0.0]


def qrpo(**kw):
    args = {
        "chosen_quantile_reward": t(QC),
        "rejected_quantile_reward": t(QR),
        **kw.pop("args", {}),
    }
    return qrpo_loss(
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        args["chosen_quantile_reward"],
        args["rejected_quantile_reward"],
        t(LC),
        t(LR),
        **kw,
    )


def qrpo_by_hand(
    i, beta, transform="identity", beta_norm=False, loss_norm=False, cap=None, qc=QC, qr=QR
):
    def side(logp, ref, q, n):
        b = beta / n if beta_norm else beta
        b = min(b, cap) if cap is not None else b
        if transform == "identity":
            reward, blz = q, b * math.log(b * (math.exp(1 / b) - 1))
        else:
            reward, blz = math.log(q), b * math.log(b / (b + 1))
        residual = (reward - blz - b * (logp - ref)) ** 2
        return residual / n if loss_norm else residual

    return (side(PC[i], RC[i], qc[i], LC[i]) + side(PR[i], RR[i], qr[i], LR[i])) / 2


@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_qrpo_identity_by_hand(beta: float) -> None:
    losses, m = qrpo(beta=beta)
    assert losses.tolist() == pytest.approx([qrpo_by_hand(i, beta) for i in (0, 1)], rel=1e-9)
    blz = beta * math.log(beta * math.expm1(1 / beta))
    assert m["beta_log_z"].tolist() == pytest.approx([blz, blz])
    assert m["targets/chosen"].tolist() == pytest.approx([q - blz for q in QC])
    assert m["targets/rejected"].tolist() == pytest.approx([q - blz for q in QR])
    assert m["rewards/chosen"].tolist() == pytest.approx([beta * (PC[i] - RC[i]) for i in (0, 1)])
    assert m["rewards/rejected"].tolist() == pytest.approx([beta * (PR[i] - RR[i]) for i in (0, 1)])
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["quantile_rewards/margins"].tolist() == pytest.approx([0.5, 0.25])
    assert m["logps/chosen"].tolist() == PC
    assert m["beta_capped_fraction"].tolist() == [0.0, 0.0]


def test_qrpo_log_transform_by_hand_and_zero_quantile() -> None:
    args = {"rejected_quantile_reward": t([0.4, 0.05])}
    losses, m = qrpo(beta=0.2, transform="log", args=args)
    expected = [qrpo_by_hand(i, 0.2, "log", qr=[0.4, 0.05]) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert m["targets/chosen"][0].item() == pytest.approx(math.log(0.9) - 0.2 * math.log(0.2 / 1.2))
    # q = 0 (QR[1]): log q = −inf: an error unless the floor is asked for explicitly.
    with pytest.raises(ValueError, match="min_quantile"):
        qrpo(beta=0.2, transform="log")
    _, fm = qrpo(beta=0.2, transform="log", min_quantile=0.05)
    blz = log_partition(0.2, "log", min_quantile=0.05).item()
    assert blz > 0.2 * math.log(0.2 / 1.2)  # the floored transform's partition
    assert fm["targets/rejected"][1].item() == pytest.approx(math.log(0.05) - blz)
    assert fm["quantile_clamped_fraction"].tolist() == [0.0, 0.5]
    assert fm["quantile_rewards/rejected"].tolist() == QR  # the q given, not the floored one


def test_qrpo_loss_is_zero_at_the_targets_and_gradient_points_to_them() -> None:
    beta = 0.3
    blz = log_partition(beta).item()
    ref_c, ref_r = t(RC), t(RR)
    chosen = (ref_c + (t(QC) - blz) / beta).requires_grad_()
    rejected = ref_r + (t(QR) - blz) / beta
    losses, _ = qrpo_loss(chosen, rejected, ref_c, ref_r, t(QC), t(QR), t(LC), t(LR), beta=beta)
    assert losses.abs().max().item() < 1e-12
    shifted = (chosen.detach() + 1.0).requires_grad_()
    losses, _ = qrpo_loss(shifted, rejected, ref_c, ref_r, t(QC), t(QR), t(LC), t(LR), beta=beta)
    assert losses.tolist() == pytest.approx([beta**2 / 2] * 2)  # ½·(β·1)² from the chosen side
    losses.sum().backward()
    assert shifted.grad.tolist() == pytest.approx([beta**2] * 2)  # d/dlogπ ½(t − βρ)² = −β(t − βρ)


def test_qrpo_length_normalisation_options() -> None:
    beta = 0.4
    losses, m = qrpo(beta=beta, beta_length_normalized=True)
    expected = [qrpo_by_hand(i, beta, beta_norm=True) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert m["beta/chosen"].tolist() == pytest.approx([beta / n for n in LC])
    assert m["beta/rejected"].tolist() == pytest.approx([beta / n for n in LR])
    assert m["beta_log_z/chosen"].tolist() == pytest.approx(
        log_partition(t(LC).reciprocal() * beta).tolist()
    )
    losses, _ = qrpo(beta=beta, loss_length_normalized=True)
    expected = [qrpo_by_hand(i, beta, loss_norm=True) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)
    plain, _ = qrpo(beta=beta)
    assert not torch.allclose(plain, losses)


def test_qrpo_beta_cap_is_explicit_and_reported() -> None:
    beta, cap = 0.4, 0.15  # β/|y| = 0.1, 0.2 (chosen), 0.08, 0.133 (rejected)
    losses, m = qrpo(beta=beta, beta_length_normalized=True, beta_cap=cap)
    expected = [qrpo_by_hand(i, beta, beta_norm=True, cap=cap) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert m["beta/chosen"].tolist() == pytest.approx([0.1, 0.15])
    assert m["beta_capped_fraction"].tolist() == [0.0, 0.5]
    _, uncapped = qrpo(beta=beta, beta_length_normalized=True)
    assert uncapped["beta/chosen"].tolist() == pytest.approx([0.1, 0.2])
    assert uncapped["beta_capped_fraction"].tolist() == [0.0, 0.0]


def test_qrpo_approx_partition_is_opt_in() -> None:
    exact, m = qrpo(beta=0.2)
    approx, ma = qrpo(beta=0.2, approx_log_partition=True)
    assert m["beta_log_z"][0].item() == pytest.approx(0.6767603, abs=1e-6)
    assert ma["beta_log_z"][0].item() == pytest.approx(0.6781124, abs=1e-6)
    assert not torch.allclose(exact, approx)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"args": {"chosen_quantile_reward": t([1.2, 0.5])}}, r"\[0, 1\]"),
        ({"args": {"rejected_quantile_reward": t([-0.1, 0.5])}}, r"\[0, 1\]"),
        ({"args": {"chosen_quantile_reward": t([float("nan"), 0.5])}}, "non-finite"),
        ({"args": {"chosen_quantile_reward": t([float("inf"), 0.5])}}, "non-finite"),
        ({"transform": "exp"}, "Unknown transform"),
        ({"beta": 0.0}, "beta"),
        ({"beta_cap": 0.0}, "beta_cap"),
        ({"min_quantile": 0.1}, "log transform"),
        ({"transform": "log", "min_quantile": 0.0}, "min_quantile"),
        ({"transform": "log", "approx_log_partition": True}, "identity"),
        ({"args": {"chosen_quantile_reward": t([0.5])}}, "shape"),
    ],
)
def test_invalid_qrpo_inputs_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        qrpo(**kwargs)


def test_log_partition_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="beta"):
        log_partition(torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="approx"):
        log_partition(0.1, "log", approx=True)
    with pytest.raises(ValueError, match="log transform"):
        log_partition(0.1, min_quantile=0.1)
    with pytest.raises(ValueError, match="Unknown transform"):
        log_partition(0.1, "sqrt")
