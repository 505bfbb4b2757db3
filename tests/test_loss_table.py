"""The loss table (losses/table.py): each entry is the loss function it wraps, its flags, its
summaries and its column check; and a DPO-family loss added as one function + one table entry."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training import schema
from post_training.errors import ConfigError, DataError
from post_training.losses import dpo
from post_training.losses.irl import irl_loss
from post_training.losses.plw import ln_plw_loss, plw_loss
from post_training.losses.qrpo import qrpo_loss
from post_training.losses.table import (
    COUNT_KEYS,
    PREFERENCE_LOSSES,
    SFT_LOSSES,
    DPOLoss,
    PreferenceLoss,
    QRPOLoss,
    SFTLoss,
    build_loss,
    check_columns,
)
from post_training.schema import trainers as trainer_schemas
from post_training.utils.config import CONFIGS_DIR, register_resolvers

register_resolvers()


def composed(name: str, overrides: list[str] = ()) -> dict:
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


# --------------------------------------------------------------------------- SFT family

# Two rows of 5 predicted positions; row 2 is padded after 3 predictions.
LOGPS = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -0.5], [-0.5, -1.5, -2.5, 0.0, 0.0]])
LSE = torch.tensor([[2.0, 1.0, 0.5, 3.0, 1.5], [0.2, 0.4, 0.6, 0.0, 0.0]])
PROMPT = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
COMPLETION = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
TARGET = PROMPT + COMPLETION
SEQUENCE = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, -1, -1]])


def sft_out(sequence: torch.Tensor | None = None) -> dict:
    return {
        "logps": LOGPS,
        "lse": LSE,
        "target": TARGET,
        "prompt": PROMPT,
        "completion": COMPLETION,
        "sequence": sequence,
    }


COUNTS = {
    "num_prompt_tokens": PROMPT.sum(),
    "num_completion_tokens": COMPLETION.sum(),
    "num_sequences": torch.tensor(2),
}


def plw_section(name: str = "plw", weight: float = 0.3, sequence_level: bool = False):
    return {
        "name": name,
        "plw_args": {"prompt_loss_weight": weight, "sequence_level_loss": sequence_level},
    }


def same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def test_count_keys() -> None:
    assert COUNT_KEYS == ("num_prompt_tokens", "num_completion_tokens", "num_sequences")


def test_sft_entry_is_plw_with_prompt_weight_zero() -> None:
    loss = build_loss({"name": "sft"})
    assert isinstance(loss, SFTLoss) and loss.name == "sft"
    same(loss(sft_out(), COUNTS), plw_loss(LOGPS, PROMPT, COMPLETION, 0.0, *COUNTS.values()))


@pytest.mark.parametrize("sequence_level", [False, True])
def test_plw_entry_is_plw_loss(sequence_level: bool) -> None:
    loss = build_loss(plw_section("plw", 0.3, sequence_level))
    expected = plw_loss(
        LOGPS,
        PROMPT,
        COMPLETION,
        0.3,
        COUNTS["num_prompt_tokens"],
        COUNTS["num_completion_tokens"],
        COUNTS["num_sequences"],
        sequence_level=sequence_level,
        sequence_ids=SEQUENCE,
    )
    same(loss(sft_out(SEQUENCE), COUNTS), expected)


@pytest.mark.parametrize("sequence_level", [False, True])
def test_ln_plw_entry_is_ln_plw_loss(sequence_level: bool) -> None:
    loss = build_loss(plw_section("ln-plw", 0.3, sequence_level))
    expected = ln_plw_loss(
        LOGPS,
        PROMPT,
        COMPLETION,
        0.3,
        *COUNTS.values(),
        sequence_level=sequence_level,
        sequence_ids=SEQUENCE,
    )
    same(loss(sft_out(SEQUENCE), COUNTS), expected)


def test_irl_entry_is_irl_loss_from_a_typed_section() -> None:
    section = trainer_schemas.IRLTrainer(
        name="irl",
        plw_args={"prompt_loss_weight": 0.2, "sequence_level_loss": False},
        irl_args={"lambda_td": 0.7, "gamma": 0.9},
    )
    loss = build_loss(section)
    expected = irl_loss(
        LOGPS,
        LSE,
        TARGET,
        PROMPT,
        COMPLETION,
        *COUNTS.values(),
        lambda_td=0.7,
        gamma=0.9,
        prompt_loss_weight=0.2,
        sequence_level=False,
        sequence_ids=None,
    )
    same(loss(sft_out(), COUNTS), expected)


def test_linear_in_logps_exactly_for_sft_plw_ln_plw() -> None:
    sections = {
        "sft": {"name": "sft"},
        "plw": plw_section("plw"),
        "ln-plw": plw_section("ln-plw"),
        "irl": {**plw_section("irl"), "irl_args": {"lambda_td": 0.5, "gamma": 1.0}},
    }
    assert set(sections) == set(SFT_LOSSES)
    linear = {name for name, s in sections.items() if build_loss(s).linear_in_logps}
    assert linear == {"sft", "plw", "ln-plw"}
    assert not any(build_loss(s).needs_reference for s in sections.values())
    assert all(build_loss(s).required_columns == () for s in sections.values())


def test_linear_entries_ignore_lse_and_are_linear_in_logps() -> None:
    """What the gradient-hint path relies on: the same gradient at any log-probs and lse."""
    for section in ({"name": "sft"}, plw_section("plw"), plw_section("ln-plw", 0.4, True)):
        loss = build_loss(section)
        grads = []
        for scale in (0.0, 3.0):
            logps = (LOGPS * scale).requires_grad_(True)
            out = {**sft_out(SEQUENCE), "logps": logps, "lse": LSE * scale}
            (grad,) = torch.autograd.grad(loss(out, COUNTS)[0], logps)
            grads.append(grad)
        assert torch.allclose(grads[0], grads[1])


def test_sft_summarize_by_hand() -> None:
    loss = build_loss({"name": "plw", "plw_args": plw_section()["plw_args"]})
    sums = {
        "prompt_nll_sum": 6.0,
        "completion_nll_sum": 8.0,
        "prompt_correct_sum": 1.0,
        "completion_correct_sum": 3.0,
        "exact_match_sum": 1.0,
    }
    counts = {"num_prompt_tokens": 3.0, "num_completion_tokens": 4.0, "num_sequences": 2.0}
    out = loss.summarize(sums, counts)
    assert out == {
        "prompt_loss": 2.0,
        "completion_loss": 2.0,
        "completion_perplexity": pytest.approx(math.exp(2.0)),
        "prompt_token_accuracy": pytest.approx(1 / 3),
        "completion_token_accuracy": 0.75,
        "token_accuracy": pytest.approx(4 / 7),
        "num_completion_tokens": 4.0,
        "sequence_exact_match": 0.5,
    }
    irl = build_loss({**plw_section("irl"), "irl_args": {"lambda_td": 0.5, "gamma": 1.0}})
    out = irl.summarize({**sums, "td_sum": 2.0, "reward_sum": -1.0}, counts)
    assert out["td_loss"] == 0.5 and out["implicit_reward"] == -0.25
    # empty window: counts clamp to 1, perplexity capped
    empty = loss.summarize({**sums, "completion_nll_sum": 1e6}, {})
    assert empty["completion_perplexity"] == math.exp(50.0)
    assert empty["sequence_exact_match"] == 1.0


# --------------------------------------------------------------------------- preference family


def pair_tensors():
    stats = {
        "chosen_logps": torch.tensor([-10.0, -4.0, -7.5]),
        "rejected_logps": torch.tensor([-12.0, -3.0, -9.0]),
        "chosen_lengths": torch.tensor([5.0, 2.0, 3.0]),
        "rejected_lengths": torch.tensor([6.0, 2.0, 4.0]),
    }
    ref = (torch.tensor([-11.0, -3.5, -7.0]), torch.tensor([-11.5, -3.5, -8.0]))
    batch = {
        "chosen_quantile_reward": torch.tensor([0.9, 0.5, 0.75], dtype=torch.float64),
        "rejected_quantile_reward": torch.tensor([0.1, 0.25, 0.5], dtype=torch.float64),
    }
    return stats, ref, batch


def dpo_section(**kw) -> dict:
    section = {
        "name": "dpo",
        "beta": 0.1,
        "loss_type": "sigmoid",
        "label_smoothing": 0.0,
        "nll_weight": 0.0,
        "simpo_gamma": 0.5,
        "orpo_alpha": 0.1,
        "discopop_tau": 0.05,
    }
    return {**section, **kw}


def qrpo_section(**kw) -> dict:
    section = {
        "name": "qrpo",
        "beta": 0.1,
        "transform": "identity",
        "approx_log_partition": False,
        "beta_length_normalized": False,
        "loss_length_normalized": False,
        "beta_cap": None,
        "min_quantile": None,
    }
    return {**section, **kw}


def test_dpo_sigmoid_entry_is_dpo_loss() -> None:
    stats, ref, batch = pair_tensors()
    loss = build_loss(dpo_section(beta=0.2, label_smoothing=0.1, nll_weight=0.3))
    assert isinstance(loss, PreferenceLoss) and loss.name == "dpo" and loss.needs_reference
    expected = dpo.dpo_loss(
        stats["chosen_logps"],
        stats["rejected_logps"],
        *ref,
        stats["chosen_lengths"],
        stats["rejected_lengths"],
        beta=0.2,
        loss_type="sigmoid",
        label_smoothing=0.1,
        nll_weight=0.3,
    )
    same(loss(stats, ref, batch), expected)


def test_simpo_entry_takes_no_reference() -> None:
    stats, _, batch = pair_tensors()
    loss = build_loss(dpo_section(loss_type="simpo", simpo_gamma=0.7))
    assert not loss.needs_reference
    expected = dpo.dpo_loss(
        stats["chosen_logps"],
        stats["rejected_logps"],
        None,
        None,
        stats["chosen_lengths"],
        stats["rejected_lengths"],
        beta=0.1,
        loss_type="simpo",
        simpo_gamma=0.7,
    )
    same(loss(stats, None, batch), expected)


def test_needs_reference_false_exactly_for_simpo_and_orpo() -> None:
    free = set()
    for loss_type in dpo.LOSS_TYPES:
        smoothing = 0.1 if loss_type == "exo_pair" else 0.0
        loss = build_loss(dpo_section(loss_type=loss_type, label_smoothing=smoothing))
        if not loss.needs_reference:
            free.add(loss_type)
    assert free == {"simpo", "orpo"}
    assert build_loss(qrpo_section()).needs_reference
    assert not any(build_loss(s).linear_in_logps for s in (dpo_section(), qrpo_section()))


def test_qrpo_entry_is_qrpo_loss() -> None:
    stats, ref, batch = pair_tensors()
    options = {"beta": 0.2, "beta_length_normalized": True, "loss_length_normalized": True}
    loss = build_loss(qrpo_section(**options))
    assert loss.required_columns == ("chosen_quantile_reward", "rejected_quantile_reward")
    expected = qrpo_loss(
        stats["chosen_logps"],
        stats["rejected_logps"],
        *ref,
        batch["chosen_quantile_reward"].float(),
        batch["rejected_quantile_reward"].float(),
        stats["chosen_lengths"],
        stats["rejected_lengths"],
        **options,
    )
    same(loss(stats, ref, batch), expected)
    with pytest.raises(KeyError, match="rejected_quantile_reward"):
        loss(stats, ref, {"chosen_quantile_reward": batch["chosen_quantile_reward"]})


def test_qrpo_warns_when_beta_cap_binds(caplog) -> None:
    stats, ref, batch = pair_tensors()
    loss = build_loss(qrpo_section(beta_cap=0.05))
    with caplog.at_level(logging.WARNING, logger="post_training.losses.table"):
        _, metrics = loss(stats, ref, batch)
    assert float(metrics["beta_capped_fraction"].mean()) == 1.0
    assert "trainer.beta_cap=0.05 binds for 100.0%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="post_training.losses.table"):
        build_loss(qrpo_section(beta_cap=0.5))(stats, ref, batch)
    assert "binds" not in caplog.text


def test_preference_summarize_by_hand() -> None:
    loss = build_loss(dpo_section())
    sums = {
        "loss": 9.0,
        "rewards/chosen": 3.0,
        "rewards/accuracies": 2.0,
        "logits/chosen_sum": 10.0,
        "logits/chosen_tokens": 4.0,
        "logits/rejected_sum": -6.0,
        "logits/rejected_tokens": 3.0,
    }
    out = loss.summarize(sums, {"num_pairs": 4.0})
    assert out == {
        "rewards/chosen": 0.75,
        "rewards/accuracies": 0.5,
        "logits/chosen": 2.5,
        "logits/rejected": -2.0,
    }
    empty = build_loss(qrpo_section()).summarize({}, {})
    assert empty == {"logits/chosen": 0.0, "logits/rejected": 0.0}


def test_bad_options_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match=r"trainer\.label_smoothing=0\.0: exo_pair needs"):
        build_loss(dpo_section(loss_type="exo_pair"))
    with pytest.raises(ValueError, match=r"trainer\.nll_weight=0\.1: orpo needs nll_weight=0"):
        build_loss(dpo_section(loss_type="orpo", nll_weight=0.1))
    with pytest.raises(ValueError, match=r"trainer\.min_quantile=0\.1: .*log transform"):
        build_loss(qrpo_section(min_quantile=0.1))


def test_unknown_name_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"trainer\.name='bco'.*sft, plw, ln-plw, irl, dpo, cpo, kto, qrpo"
    ):
        build_loss({"name": "bco"})
    with pytest.raises(ValueError, match=r"trainer\.name='sft'.*known: dpo, cpo, kto, qrpo"):
        build_loss({"name": "sft"}, PREFERENCE_LOSSES)
    assert isinstance(build_loss({"name": "sft"}, SFT_LOSSES), SFTLoss)


@pytest.mark.parametrize(
    "name,choice",
    [("train-sft", c) for c in SFT_LOSSES] + [("train-preference", c) for c in PREFERENCE_LOSSES],
)
def test_built_from_every_composed_trainer_section(name: str, choice: str) -> None:
    typed = schema.check(composed(name, [f"trainer={choice}"]))
    loss = build_loss(typed.trainer)
    assert loss.name == choice
    assert build_loss(typed.trainer) == build_loss(composed(name, [f"trainer={choice}"])["trainer"])


@pytest.mark.parametrize(
    "loss_cls,section",
    [(DPOLoss, trainer_schemas.DPOTrainer), (QRPOLoss, trainer_schemas.QRPOTrainer)],
)
def test_preference_loss_fields_are_the_section_keys(loss_cls, section) -> None:
    """A loss field missing from the schema would silently take its default."""
    fields = {f.name for f in dataclasses.fields(loss_cls)}
    assert fields == set(section.model_fields) - {"name"}


def test_check_columns_names_split_row_and_column() -> None:
    loss = build_loss(qrpo_section())
    good = {"chosen_quantile_reward": 0.5, "rejected_quantile_reward": 0.1}
    rows = [{**good, "row_index": 0}, {**good, "row_index": 4}, {"row_index": 7, **good}]
    check_columns(loss, rows, "dataset.train")
    del rows[2]["rejected_quantile_reward"]
    with pytest.raises(DataError) as info:
        check_columns(loss, rows, "dataset.eval")
    message = str(info.value)
    assert message.startswith(  # 1-based, and the columns the row has, not those it needs
        "dataset.eval: row 3 (pair 8 of the source) has no 'rejected_quantile_reward' "
        "(its data columns: chosen_quantile_reward): trainer.name=qrpo needs "
        "chosen_quantile_reward and rejected_quantile_reward"
    )
    with pytest.raises(DataError, match=r"^dataset.train: row 1 has no 'chosen_quantile_reward'"):
        check_columns(loss, [{}], "dataset.train")
    check_columns(build_loss(dpo_section()), [{}], "dataset.train")  # nothing required


# --------------------------------------------------------------------------- config-time rules


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["trainer.loss_type=exo_pair", "trainer.label_smoothing=0"], "label_smoothing=0.0"),
        (["trainer.loss_type=orpo", "trainer.nll_weight=0.1"], "nll_weight=0.1"),
        (["trainer.loss_type=hinge", "trainer.label_smoothing=0.1"], "label_smoothing=0.1"),
        (["trainer.loss_type=robust", "trainer.label_smoothing=0.6"], "label_smoothing=0.6"),
        (["trainer=qrpo", "trainer.min_quantile=0.1"], "min_quantile=0.1"),
        (
            ["trainer=qrpo", "trainer.transform=log", "trainer.approx_log_partition=true"],
            "approx_log_partition=True",
        ),
    ],
)
def test_loss_option_rules_fail_at_config_time(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        schema.check(composed("train-preference", overrides))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and f" trainer.{key}:" in message, message


def test_exo_pair_accepts_label_smoothing_up_to_one() -> None:
    overrides = ["trainer.loss_type=exo_pair", "trainer.label_smoothing=0.7"]
    assert schema.check(composed("train-preference", overrides)).trainer.label_smoothing == 0.7


# --------------------------------------------------------------------------- adding a loss


def toy_loss(t: dpo.PairTerms) -> torch.Tensor:
    """A toy DPO-family loss: squared hinge on the margin, shifted by ε."""
    return torch.relu(1 - t.z) ** 2 + t.label_smoothing


TOY = dpo.DPOLossType(
    toy_loss, (dpo.OptionRule("label_smoothing", lambda eps: eps < 0.25, "label_smoothing < 0.25"),)
)


def test_a_dpo_family_loss_is_one_function_and_one_table_entry(monkeypatch) -> None:
    overrides = ["trainer.loss_type=toy", "trainer.label_smoothing=0.2"]
    with pytest.raises(ConfigError, match=r"trainer\.loss_type='toy'"):
        schema.check(composed("train-preference", overrides))

    monkeypatch.setitem(dpo.DPO_LOSSES, "toy", TOY)  # the one table entry

    assert "toy" in dpo.DPO_LOSS_TYPES and "toy" in dpo.LOSS_TYPES
    assert "toy" in dpo.LABEL_SMOOTHING_TYPES
    typed = schema.check(composed("train-preference", overrides))
    assert typed.trainer.loss_type == "toy"
    too_much = ["trainer.loss_type=toy", "trainer.label_smoothing=0.3"]
    with pytest.raises(ConfigError, match=r"trainer\.label_smoothing=0\.3: toy needs"):
        schema.check(composed("train-preference", too_much))

    stats, ref, batch = pair_tensors()
    args = (
        stats["chosen_logps"],
        stats["rejected_logps"],
        *ref,
        stats["chosen_lengths"],
        stats["rejected_lengths"],
    )
    losses, metrics = dpo.dpo_loss(*args, beta=0.5, loss_type="toy", label_smoothing=0.2)
    z = 0.5 * ((stats["chosen_logps"] - ref[0]) - (stats["rejected_logps"] - ref[1]))
    assert torch.allclose(losses, torch.relu(1 - z) ** 2 + 0.2)
    assert torch.allclose(metrics["rewards/margins"], z)
    loss = build_loss(typed.trainer)
    assert loss.needs_reference
    expected = dpo.dpo_loss(*args, beta=0.1, loss_type="toy", label_smoothing=0.2)
    same(loss(stats, ref, batch), expected)
