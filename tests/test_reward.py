"""Reward models: the Bradley–Terry loss against its formula and against TRL 1.16's
``RewardTrainer`` on the same model and pairs (loss, metrics and gradients), the reward read at
each conversation's last non-pad token as ``AutoModelForSequenceClassification`` pools it
alone, and the config rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from post_training.data_preference.encode import encode_pairs
from post_training.data_preference.transforms import tiny_task_pairs
from post_training.data_sft.collate import pad_collate
from post_training.data_sft.messages import read_jsonl_messages
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.errors import ConfigError
from post_training.losses.reward import reward_loss
from post_training.losses.table import RewardLoss
from post_training.schema import check
from post_training.trainers.reward import document_ends, pair_rewards
from post_training.utils.config import asset_path

from .test_schema import composed


def test_reward_loss_by_hand() -> None:
    rc = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    rr = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64)
    margin = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    losses, metrics = reward_loss(rc, rr, margin, center_rewards_coefficient=0.01)
    for i in range(3):
        d = float(rc[i] - rr[i])
        want = math.log1p(math.exp(-(d - float(margin[i])))) + 0.01 * float(rc[i] + rr[i]) ** 2
        assert float(losses[i]) == pytest.approx(want, rel=1e-12)
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert metrics["margin"].tolist() == [1.0, -1.0, -0.5]
    plain, _ = reward_loss(rc, rr)
    assert float(plain[0]) == pytest.approx(math.log1p(math.exp(-1.0)))


def test_reward_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"trainer.center_rewards_coefficient=-0.1"):
        RewardLoss(center_rewards_coefficient=-0.1)
    check(composed("train-reward", ["trainer.center_rewards_coefficient=0.01"]))
    with pytest.raises(ConfigError, match=r"dataset.unpair=true with train_reward"):
        check(composed("train-reward", ["dataset.unpair=true"]))


def test_document_ends_follow_the_pad_rule() -> None:
    # chosen: 3 tokens ending in the pad id (eos == pad), rejected: 2 tokens, then padding
    batch = {
        "input_ids": torch.tensor([[5, 6, 0, 7, 8, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]]),
    }
    assert document_ends(batch, pad_token_id=0).tolist() == [[1, 4]]
    assert document_ends(batch, pad_token_id=None).tolist() == [[2, 4]]


def _pairs(n: int) -> list[dict]:
    rows = read_jsonl_messages(asset_path("tiny-tasks/eval.jsonl"))
    single = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) == 1]
    return [tiny_task_pairs(r) for r in single[:n]]


def _model(seed: int = 0) -> AutoModelForSequenceClassification:
    config = AutoConfig.from_pretrained(asset_path("tiny-llama"))
    config.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).double()


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_reward_matches_trl_reward_trainer(center: float | None, tmp_path: Path) -> None:
    """One step of TRL's RewardTrainer (its own tokenization, padded [chosen; rejected] batch,
    HF pooling) and ours (one packed row per pair, the head's output at each conversation's
    end) on the same model: equal loss, accuracy, margin and gradients."""
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    model = _model()
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = _pairs(8)
    config = RewardConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(pairs),
        center_rewards_coefficient=center,
        train_sampling_strategy="sequential",  # TRL's batch in our order
        report_to=[],
        use_cpu=True,
        max_length=None,
    )
    dataset = Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    trl = TRLRewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    model.eval()
    trl_batch = trl._prepare_inputs(next(iter(trl.get_train_dataloader())))
    model.zero_grad(set_to_none=True)
    trl_loss = trl.compute_loss(model, trl_batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trl_metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}

    rows = encode_pairs(pairs, ChatEncoder(tokenizer, None, TokenizeOptions(512)), "pairs", 511)
    batch = pad_collate(rows, tokenizer.pad_token_id)
    n = len(pairs)
    for i, row in enumerate(rows):  # the same tokens as TRL's chosen (i) and rejected (n + i)
        split = int((row["position_ids"][1:] == 0).nonzero()[0][0]) + 1
        for side, tokens in ((i, row["input_ids"][:split]), (n + i, row["input_ids"][split:])):
            mask = trl_batch["attention_mask"][side].bool()
            assert tokens.tolist() == trl_batch["input_ids"][side][mask].tolist(), (i, side)
    model.zero_grad(set_to_none=True)
    chosen, rejected = pair_rewards(model, batch, tokenizer.pad_token_id)
    losses, metrics = RewardLoss(center_rewards_coefficient=center)(chosen, rejected, batch)
    losses.mean().backward()
    assert abs(float(losses.mean()) - float(trl_loss)) < 1e-9
    for name, grad in trl_grads.items():
        mine = dict(model.named_parameters())[name].grad
        assert float((mine - grad).abs().max()) < 1e-9, name
    assert float(metrics["accuracy"].mean()) == pytest.approx(trl_metrics["accuracy"], abs=1e-9)
    assert float(metrics["margin"].mean()) == pytest.approx(trl_metrics["margin"], abs=1e-9)
    assert float(metrics["mean_reward"].mean()) == pytest.approx(
        trl_metrics["mean_reward"], abs=1e-9
    )
