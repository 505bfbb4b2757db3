"""TRL's DPO options: loss lists with weights (MPO), f-divergences, sigmoid_norm, LD-DPO's
``ld_alpha``, WPO's ``use_weighting`` and TR-DPO's ``sync_ref_model``.

Each is checked against a formula written here and against TRL 1.16's
``DPOTrainer._compute_loss`` on the same per-token log-probs (a stand-in model returns them, as
in ``test_preference_losses``): our per-pair statistics come from
:func:`~post_training.trainers.preference.pair_statistics` on packed rows (chosen and rejected
of a pair in one row), TRL's from its own padded [chosen; rejected] layout.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from post_training.losses import dpo
from post_training.losses.dpo import dpo_loss
from post_training.losses.table import DPOLoss
from post_training.trainers.preference import mix_into, pair_statistics
from tests.test_preference_losses import random_pairs

PROMPT = 2  # prompt tokens per side


class LiveStandIn(torch.nn.Module):
    """A stand-in module scored live: returns given outputs, as TRL's fused-LM-head forward
    would (TRL turns gradient checkpointing off around the reference)."""

    is_gradient_checkpointing = False

    def __init__(self, outputs: SimpleNamespace) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, **kwargs) -> SimpleNamespace:
        return self.outputs


def token_pairs(n: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per pair: per-token completion log-probs of policy and reference and WPO's
    ``log Σ p²`` for chosen and rejected (ragged lengths, some equal)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        lc, lr = (
            int(torch.randint(1, 7, (1,), generator=g)),
            int(torch.randint(1, 7, (1,), generator=g)),
        )
        if i == 0:
            lr = lc  # equal lengths: LD-DPO changes nothing there
        pair = {}
        for side, length in (("chosen", lc), ("rejected", lr)):
            logps = -torch.rand(length, generator=g, dtype=torch.float64) * 3 - 0.05
            pair[side] = logps
            pair[f"ref_{side}"] = logps + torch.randn(length, generator=g, dtype=torch.float64)
            # log Σ p² ≤ max log p: anything below the token's own log-prob works for WPO
            pair[f"sq_{side}"] = logps - torch.rand(length, generator=g, dtype=torch.float64)
        pairs.append(pair)
    return pairs


def packed(pairs, key: str = "", sq: bool = False):
    """Our layout: one row per pair, chosen then rejected, position_ids restarting; the
    ``out`` dict of ``sft_forward`` (aligned to the predicted token) and the batch."""
    rows = []
    for pair in pairs:
        rows.append(
            [pair[f"{key}chosen"], pair[f"{key}rejected"], pair["sq_chosen"], pair["sq_rejected"]]
        )
    width = max(2 * PROMPT + len(c) + len(r) for c, r, _, _ in rows)
    n = len(rows)
    position_ids = torch.zeros(n, width, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    completion = torch.zeros(n, width, dtype=torch.long)
    logps = torch.zeros(n, width, dtype=torch.float64)
    log_sq = torch.zeros(n, width, dtype=torch.float64)
    for row, (c, r, sq_c, sq_r) in enumerate(rows):
        at = 0
        for tokens, squares in ((c, sq_c), (r, sq_r)):
            length = PROMPT + len(tokens)
            position_ids[row, at : at + length] = torch.arange(length)
            attention[row, at : at + length] = 1
            completion[row, at + PROMPT : at + length] = 1
            # the log-prob of token a sits at position a - 1
            logps[row, at + PROMPT - 1 : at + length - 1] = tokens
            log_sq[row, at + PROMPT - 1 : at + length - 1] = squares
            at += length
    batch = {"position_ids": position_ids, "attention_mask": attention}
    shifted = torch.nn.functional.pad(completion[:, 1:], (0, 1))
    out = {"logps": logps, "completion": shifted, "logit_mean": torch.zeros_like(logps)}
    if sq:
        out["log_sum_sq"] = log_sq
    return out, batch


def trl_tokens(
    pairs,
    loss_types,
    weights=None,
    beta=0.1,
    eps=0.0,
    ld_alpha=None,
    f_div="reverse_kl",
    f_coef=0.5,
    wpo=False,
):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on the same per-token log-probs, its reference
    scored by the same stand-in (TRL's own LD-DPO sums for the reference too)."""
    from trl import DPOTrainer

    sides = [p[s] for s in ("chosen", "rejected") for p in pairs]
    refs = [p[f"ref_{s}"] for s in ("chosen", "rejected") for p in pairs]
    sqs = [p[f"sq_{s}"] for s in ("chosen", "rejected") for p in pairs]
    width = PROMPT + max(len(x) for x in sides)
    mask = torch.zeros(len(sides), width, dtype=torch.long)

    def per_token(values):  # fp32: TRL's alpha-divergence clamp knows fp16/bf16/fp32 only
        out = torch.zeros(len(sides), width - 1, dtype=torch.float32)
        for row, tokens in enumerate(values):
            out[row, PROMPT - 1 : PROMPT - 1 + len(tokens)] = tokens
        return out

    for row, tokens in enumerate(sides):
        mask[row, PROMPT : PROMPT + len(tokens)] = 1

    def outputs(values):
        logps = per_token(values)
        return SimpleNamespace(
            log_probs=logps,
            entropy=torch.zeros_like(logps),
            mean_logits=torch.zeros_like(logps),
            is_top1=torch.zeros_like(logps, dtype=torch.bool),
            log_sum_sq_probs=per_token(sqs),
        )

    policy, reference = LiveStandIn(outputs(sides)), LiveStandIn(outputs(refs))
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_div,
        f_alpha_divergence_coef=f_coef,
        loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=eps,
        use_weighting=wpo,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
    }
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours_tokens(pairs, ld_alpha=None, **options):
    """Our per-pair losses on the same tokens: pair_statistics of policy and reference, then
    the DPOLoss object of the options (as the trainer does)."""
    wpo = options.get("use_weighting", False)
    out, batch = packed(pairs, sq=wpo)
    ref_out, _ = packed(pairs, "ref_")
    stats = pair_statistics(out, batch, ld_alpha)
    ref = pair_statistics(ref_out, batch, ld_alpha)
    loss = DPOLoss(ld_alpha=ld_alpha, **options)
    return loss(stats, (ref["chosen_logps"], ref["rejected_logps"]), batch)


F_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "exo_pair", "discopop"]


@pytest.mark.parametrize(
    "f_div,coef",
    [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.5),
        ("alpha_divergence", 1.0),
        ("alpha_divergence", 2.0),
    ],
)
@pytest.mark.parametrize("loss_type", F_TYPES)
def test_f_divergences_match_trl(loss_type: str, f_div: str, coef: float) -> None:
    pairs = token_pairs(seed=1)
    eps = {"exo_pair": 0.01, "robust": 0.2}.get(loss_type, 0.0)
    losses, metrics = ours_tokens(
        pairs,
        loss_type=loss_type,
        beta=0.3,
        label_smoothing=eps,
        f_divergence_type=f_div,
        f_alpha_divergence_coef=coef,
    )
    trl_loss, trl_metrics = trl_tokens(
        pairs, [loss_type], beta=0.3, eps=eps, f_div=f_div, f_coef=coef
    )
    torch.testing.assert_close(losses.mean().float(), trl_loss, rtol=1e-5, atol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key].mean().item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5)


def test_f_divergence_scores_by_hand() -> None:
    """The scores f'(u) at u = π/π_ref: reverse KL log u, forward KL 1 − 1/u, JS
    log(2u/(1+u)), α-divergence (u^(α−1) − 1)/(α − 1); sigmoid of β·(s_c − s_r)."""
    pc, pr, rc, rr, lc, lr = random_pairs(n=4, seed=5)
    beta = 0.4
    by_f = {
        "reverse_kl": lambda u: math.log(u),
        "forward_kl": lambda u: 1 - 1 / u,
        "js_divergence": lambda u: math.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (u ** (0.3 - 1) - 1) / (0.3 - 1),
    }
    for f_div, f in by_f.items():
        losses, _ = dpo_loss(
            pc, pr, rc, rr, lc, lr, beta=beta, f_divergence_type=f_div, f_alpha_divergence_coef=0.3
        )
        for i in range(4):
            u_c, u_r = math.exp(pc[i] - rc[i]), math.exp(pr[i] - rr[i])
            z = beta * (f(u_c) - f(u_r))
            assert losses[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-9), f_div


def test_sigmoid_norm_by_hand() -> None:
    pc, pr, rc, rr, lc, lr = random_pairs(n=4, seed=6)
    losses, _ = dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.5, loss_type="sigmoid_norm")
    for i in range(4):
        z = 0.5 * ((pc[i] - rc[i]) / lc[i] - (pr[i] - rr[i]) / lr[i])
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-9)


@pytest.mark.parametrize(
    "types,weights",
    [
        (["sigmoid", "bco_pair"], [0.8, 0.2]),
        (["sigmoid", "ipo", "hinge"], None),
        (["apo_zero", "nca_pair"], [1.0, 0.5]),
    ],
)
def test_loss_lists_match_trl_and_the_weighted_sum(types, weights) -> None:
    pairs = token_pairs(seed=2)
    losses, _ = ours_tokens(
        pairs,
        loss_type=tuple(types),
        loss_weights=None if weights is None else tuple(weights),
        beta=0.2,
    )
    trl_loss, _ = trl_tokens(pairs, types, weights, beta=0.2)
    torch.testing.assert_close(losses.mean().float(), trl_loss, rtol=1e-5, atol=1e-5)
    pc, pr, rc, rr, lc, lr = random_pairs(seed=3)
    combined, _ = dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.2, loss_type=types, loss_weights=weights)
    expected = sum(
        w * dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.2, loss_type=t)[0]
        for t, w in zip(types, weights or [1.0] * len(types), strict=True)
    )
    torch.testing.assert_close(combined, expected)


def test_sft_entry_is_the_chosen_nll_and_matches_trl_one_pair_at_a_time() -> None:
    pairs = token_pairs(seed=4)
    losses, metrics = ours_tokens(
        pairs, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7), beta=0.2
    )
    plain, _ = ours_tokens(pairs, loss_type="sigmoid", beta=0.2)
    torch.testing.assert_close(losses, plain + 0.7 * metrics["nll_loss"])
    for i, pair in enumerate(pairs):  # TRL's "sft" is a token mean over the batch
        trl_loss, _ = trl_tokens([pair], ["sigmoid", "sft"], [1.0, 0.7], beta=0.2)
        assert losses[i].item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_alpha_matches_trl_and_the_shared_prefix_formula(ld_alpha: float) -> None:
    pairs = token_pairs(seed=7)
    losses, metrics = ours_tokens(pairs, ld_alpha=ld_alpha, beta=0.2)
    trl_loss, trl_metrics = trl_tokens(pairs, ["sigmoid"], beta=0.2, ld_alpha=ld_alpha)
    torch.testing.assert_close(losses.mean().float(), trl_loss, rtol=1e-5, atol=1e-5)
    assert metrics["logps/chosen"].mean().item() == pytest.approx(
        trl_metrics["logps/chosen"], rel=1e-6
    )
    out, batch = packed(pairs)
    stats = pair_statistics(out, batch, ld_alpha)
    for i, pair in enumerate(pairs):
        shared = min(len(pair["chosen"]), len(pair["rejected"]))
        for side in ("chosen", "rejected"):
            tokens = pair[side]
            expected = tokens[:shared].sum() + ld_alpha * tokens[shared:].sum()
            assert stats[f"{side}_logps"][i].item() == pytest.approx(expected.item(), rel=1e-12)
            assert stats[f"{side}_lengths"][i].item() == len(tokens)  # lengths stay full
    # equal lengths (pair 0): nothing is down-weighted
    assert stats["chosen_logps"][0].item() == pytest.approx(pairs[0]["chosen"].sum().item())


def test_wpo_weights_match_trl_and_formula() -> None:
    pairs = token_pairs(seed=8)
    losses, metrics = ours_tokens(pairs, use_weighting=True, beta=0.2)
    plain, _ = ours_tokens(pairs, beta=0.2)
    trl_loss, _ = trl_tokens(pairs, ["sigmoid"], beta=0.2, wpo=True)
    torch.testing.assert_close(losses.mean().float(), trl_loss, rtol=1e-5, atol=1e-5)
    for i, pair in enumerate(pairs):
        w = math.exp((pair["chosen"] - pair["sq_chosen"]).mean().item()) * math.exp(
            (pair["rejected"] - pair["sq_rejected"]).mean().item()
        )
        assert metrics["wpo_weight"][i].item() == pytest.approx(w, rel=1e-9)
        assert losses[i].item() == pytest.approx(w * plain[i].item(), rel=1e-9)


def test_log_sum_sq_of_the_forward_is_log_sum_of_squared_probs() -> None:
    """sft_forward's ``log_sum_sq`` (chunked head and plain logits alike) is log Σ_v p_v²."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from post_training.trainers.sft import sft_forward
    from post_training.utils.config import asset_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("tiny-llama")))
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "prompt_mask": torch.zeros_like(ids),
        "completion_mask": torch.ones_like(ids),
    }
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits.float(), -1)
        expected = torch.log((probs**2).sum(-1))
        for chunk in (0, 5):
            out = sft_forward(model, batch, chunk, sum_sq=True)
            torch.testing.assert_close(out["log_sum_sq"], expected, rtol=1e-4, atol=1e-5)
        assert "log_sum_sq" not in sft_forward(model, batch, 5)


def test_mix_into_is_the_tr_dpo_update() -> None:
    torch.manual_seed(0)
    target, source = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    mix_into(target, source, 0.6)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, 0.6 * source.state_dict()[name] + 0.4 * before[name])


@pytest.mark.parametrize(
    "options,match",
    [
        (
            {"loss_type": ("sigmoid", "hinge"), "loss_weights": (1.0,)},
            r"trainer.loss_weights=\[1.0\]: needs one weight per loss type",
        ),
        ({"loss_type": "sigmoid", "loss_weights": (1.0, 2.0)}, "needs one weight per loss type"),
        ({"loss_type": ("sigmoid", "hinge"), "loss_weights": (1.0, -1.0)}, "weights must be >= 0"),
        ({"loss_type": ("simpo", "sigmoid")}, "simpo is reference-free and cannot be combined"),
        ({"loss_type": ("sft",)}, "'sft' alone is SFT"),
        (
            {"loss_type": ("sigmoid", "sft"), "nll_weight": 0.5},
            "trainer.nll_weight=0.5: the loss_type list already has 'sft'",
        ),
        ({"loss_type": ("sigmoid", "sigmoid")}, "listed twice"),
        ({"loss_type": ("sigmoid", "nope")}, "Unknown loss_type 'nope'"),
        (
            {"loss_type": "bco_pair", "f_divergence_type": "forward_kl"},
            "loss_type 'bco_pair' is written in the raw log-ratios",
        ),
        ({"f_divergence_type": "chi2"}, "trainer.f_divergence_type='chi2'"),
        ({"ld_alpha": 1.5}, r"trainer.ld_alpha=1.5: must be in \[0, 1\]"),
        (
            {"sync_ref_model": True, "ref_model_mixup_alpha": 0.0},
            "trainer.ref_model_mixup_alpha=0.0",
        ),
        (
            {"sync_ref_model": True, "loss_type": "simpo"},
            "is reference-free; there is no reference model",
        ),
        (
            {"loss_type": ("hinge", "bco_pair"), "label_smoothing": 0.1},
            "label_smoothing has no meaning",
        ),
    ],
)
def test_option_rules(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        DPOLoss(**options)


def test_schema_accepts_lists_and_names_the_key() -> None:
    from post_training.schema.trainers import DPOTrainer

    base = dict(
        name="dpo",
        beta=0.1,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        label_smoothing=0.0,
        nll_weight=0.0,
        simpo_gamma=0.5,
        orpo_alpha=0.1,
        discopop_tau=0.05,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        ld_alpha=None,
        use_weighting=False,
        sync_ref_model=False,
        ref_model_mixup_alpha=0.6,
        ref_model_sync_steps=512,
    )
    section = DPOTrainer(**base)
    loss = DPOLoss.from_section(section)
    assert loss.loss_type == ("sigmoid", "bco_pair", "sft") and loss.loss_weights == (0.8, 0.2, 1.0)
    with pytest.raises(ValidationError, match="needs one weight per loss type"):
        DPOTrainer(**{**base, "loss_weights": [1.0]})
    with pytest.raises(ValidationError, match="'nope': must be one of"):
        DPOTrainer(**{**base, "loss_type": ["sigmoid", "nope"], "loss_weights": None})


def test_new_loss_type_listed_everywhere() -> None:
    assert "sigmoid_norm" in dpo.LOSS_TYPES and "sigmoid_norm" in dpo.LABEL_SMOOTHING_TYPES
