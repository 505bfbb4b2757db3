"""PLW, LN-PLW and IRL against hand computations, and exact split into micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from post_training.losses import sft_loss
from post_training.losses.irl import irl_loss, next_state_values
from post_training.losses.plw import ln_plw_loss, plw_loss

# Two sequences; position t is aligned to the predicted token t+1.
LOGPS = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, 0.0, 0.0]])
PROMPT = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
COMPLETION = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
TARGET = PROMPT + COMPLETION  # real predicted tokens; row 2 is padded after 2 predictions


def counts(p=PROMPT, c=COMPLETION):
    return {
        "num_prompt_tokens": float(p.sum()),
        "num_completion_tokens": float(c.sum()),
        "num_sequences": float(len(p)),
    }


def test_plw_token_level_by_hand() -> None:
    plw = 0.1
    loss, _ = plw_loss(LOGPS, PROMPT, COMPLETION, plw, **counts())
    num = plw * (1 + 2 + 0.5) + (3 + 4 + 1.5)
    assert math.isclose(loss.item(), num / (plw * 3 + 3), rel_tol=1e-6)


def test_plw_sequence_level_by_hand() -> None:
    plw = 0.1
    loss, _ = plw_loss(LOGPS, PROMPT, COMPLETION, plw, **counts(), sequence_level=True)
    seq1 = (plw * (1 + 2) + (3 + 4)) / (plw * 2 + 2)
    seq2 = (plw * 0.5 + 1.5) / (plw * 1 + 1)
    assert math.isclose(loss.item(), (seq1 + seq2) / 2, rel_tol=1e-6)


def test_plw_zero_is_completion_sft_and_one_is_full_sequence() -> None:
    zero, _ = plw_loss(LOGPS, PROMPT, COMPLETION, 0.0, **counts())
    sft, _ = sft_loss(LOGPS, COMPLETION, float(COMPLETION.sum()))
    assert torch.isclose(zero, sft)
    one, _ = plw_loss(LOGPS, PROMPT, COMPLETION, 1.0, **counts())
    assert torch.isclose(one, -(LOGPS * TARGET).sum() / TARGET.sum())


def test_ln_plw_by_hand() -> None:
    plw = 0.3
    tok, _ = ln_plw_loss(LOGPS, PROMPT, COMPLETION, plw, **counts())
    assert math.isclose(tok.item(), plw * (3.5 / 3) + 8.5 / 3, rel_tol=1e-6)
    seq, _ = ln_plw_loss(LOGPS, PROMPT, COMPLETION, plw, **counts(), sequence_level=True)
    expected = ((plw * 1.5 + 3.5) + (plw * 0.5 + 1.5)) / 2
    assert math.isclose(seq.item(), expected, rel_tol=1e-6)


def test_irl_terminal_value_is_per_sequence_not_per_row() -> None:
    lse = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    v = next_state_values(lse, TARGET, gamma=0.9)
    # Row 1: states after positions 0..2 are non-terminal; after the last token, terminal.
    assert v[0].tolist() == pytest.approx([0.9 * 2, 0.9 * 3, 0.9 * 4, 0.0])
    # Row 2 ends after 2 predictions: position 1's next state is terminal although the row goes on.
    assert v[1].tolist() == pytest.approx([0.9 * 6, 0.0, 0.0, 0.0])


def test_irl_by_hand_and_lambda_zero_is_base() -> None:
    lse = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    lam, gamma, plw = 0.5, 0.9, 0.0
    loss, metrics = irl_loss(
        LOGPS,
        lse,
        TARGET,
        PROMPT,
        COMPLETION,
        **counts(),
        lambda_td=lam,
        gamma=gamma,
        prompt_loss_weight=plw,
    )
    q = LOGPS + lse
    r = [q[0, 2] - gamma * lse[0, 3], q[0, 3] - 0.0, q[1, 1] - 0.0]
    td = sum(x**2 for x in r) / 3
    base = (3 + 4 + 1.5) / 3
    assert math.isclose(loss.item(), base + lam * td.item(), rel_tol=1e-6)
    assert math.isclose(metrics["reward_sum"].item(), sum(r).item(), rel_tol=1e-6)
    zero, _ = irl_loss(LOGPS, lse, TARGET, PROMPT, COMPLETION, **counts(), lambda_td=0.0)
    base_loss, _ = plw_loss(LOGPS, PROMPT, COMPLETION, 0.0, **counts())
    assert torch.equal(zero, base_loss)


@pytest.mark.parametrize("name", ["plw", "ln_plw", "irl"])
@pytest.mark.parametrize("sequence_level", [False, True])
def test_micro_batches_with_window_counts_sum_to_the_full_batch(name, sequence_level) -> None:
    torch.manual_seed(0)
    logps = -torch.rand(5, 7, requires_grad=True)
    lse = torch.rand(5, 7, requires_grad=True)
    lengths = [7, 3, 5, 6, 2]
    target = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    prompt = target.clone()
    prompt[:, 2:] = 0
    completion = target - prompt

    def loss_of(rows, c):
        args = (logps[rows], prompt[rows], completion[rows])
        if name == "plw":
            return plw_loss(*args, 0.2, **c, sequence_level=sequence_level)[0]
        if name == "ln_plw":
            return ln_plw_loss(*args, 0.2, **c, sequence_level=sequence_level)[0]
        return irl_loss(
            logps[rows],
            lse[rows],
            target[rows],
            prompt[rows],
            completion[rows],
            **c,
            lambda_td=0.5,
            gamma=0.9,
            sequence_level=sequence_level,
        )[0]

    window = counts(prompt, completion)
    full = loss_of(slice(0, 5), window)
    grads_full = torch.autograd.grad(full, [logps, lse], allow_unused=True)
    parts = loss_of(slice(0, 2), window) + loss_of(slice(2, 5), window)
    grads_parts = torch.autograd.grad(parts, [logps, lse], allow_unused=True)
    assert torch.allclose(full, parts, atol=1e-6)
    for a, b in zip(grads_full, grads_parts, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_counts_use_the_shifted_masks_of_the_predicted_tokens() -> None:
    """The first token (BOS, prompt) is never predicted: it must not enter the denominator."""
    from post_training.trainers.sft import SFTTrainer

    batch = {
        "prompt_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]),
    }
    counts = SFTTrainer.loss_counts(None, batch)  # type: ignore[arg-type]
    assert counts["num_prompt_tokens"] == 5 - 2  # unshifted would say 5
    assert counts["num_completion_tokens"] == 6
    assert counts["num_sequences"] == 2


def test_sequence_exact_match_scores_the_last_assistant_turn_only() -> None:
    """Two-turn row: a miss in the first assistant turn does not count (greedy decoding of the
    last turn is what ``evaluate`` scores); a miss in the last turn does. Packing both rows into
    one gives the same count."""
    from post_training.trainers.sft import exact_matches, last_turn

    # Row 1: prompt, answer (miss), prompt, answer (hits). Row 2: prompt, answer with one miss.
    prompt = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]])
    correct = torch.tensor([[0.0, 1, 0, 1, 1, 1], [1, 1, 1, 0, 1, 0]])
    final = last_turn(completion, prompt, None)
    assert final.tolist() == [[False] * 4 + [True] * 2, [False, False, True, True, True, False]]
    out = {"completion": completion, "prompt": prompt, "correct": correct, "sequence": None}
    assert exact_matches(out) == 1
    out["correct"] = torch.ones_like(correct)
    assert exact_matches(out) == 2

    # Both documents packed in one row of 12 (ids 0 and 1; padding -1 never counts).
    packed = {
        "prompt": torch.cat([prompt[0], prompt[1]]).unsqueeze(0),
        "completion": torch.cat([completion[0], completion[1]]).unsqueeze(0),
        "correct": torch.cat([correct[0], correct[1]]).unsqueeze(0),
        "sequence": torch.tensor([[0] * 6 + [1] * 6]),
    }
    assert last_turn(packed["completion"], packed["prompt"], packed["sequence"]).tolist() == [
        final[0].tolist() + final[1].tolist()
    ]
    assert exact_matches(packed) == 1
    packed["sequence"] = torch.tensor([[0] * 6 + [1] * 5 + [-1]])
    packed["completion"][0, -1] = 0
    assert exact_matches(packed) == 1
