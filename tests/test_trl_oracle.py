"""Oracle: our PLW loss equals TRL SFTTrainer's loss on the same model and batch.

plw=0 is TRL's completion-only loss; plw=1 is TRL's loss on every token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.messages import read_jsonl_messages
from post_training.data_sft.tokenize import tokenize_chat
from post_training.losses import plw_loss
from post_training.trainers.sft import COUNT_KEYS, sft_forward
from post_training.trainers.sft import SFTTrainer as OurSFTTrainer
from post_training.utils.config import asset_path


@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("tiny-llama")))
    rows = read_jsonl_messages(asset_path("tiny-tasks/eval.jsonl"))
    # One assistant turn each (with and without a system prompt): TRL's completion-only mask
    # covers the final turn only, ours every assistant turn.
    single = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) == 1]
    rows = single[:6] + [r for r in single if r["messages"][0]["role"] == "system"][:2]
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    return tokenizer, model, rows


@pytest.mark.parametrize("plw", [0.0, 1.0])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_plw_matches_trl_sft_trainer(setup, plw: float, tmp_path: Path) -> None:
    tokenizer, model, rows = setup
    config = SFTConfig(
        output_dir=str(tmp_path),
        completion_only_loss=plw == 0.0,
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
    )
    # TRL tokenizes and masks prompt/completion pairs itself: an independent derivation.
    dataset = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )
    trl = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    prepared = trl.train_dataset
    trl_batch = trl.data_collator([prepared[i] for i in range(len(prepared))])
    examples = [tokenize_chat(r["messages"], tokenizer) for r in rows]
    assert [list(prepared[i]["input_ids"]) for i in range(len(rows))] == [
        e["input_ids"].tolist() for e in examples
    ]
    model.eval()
    with torch.no_grad():
        trl_loss = trl.compute_loss(model, trl_batch)

        batch = pad_collate(examples, tokenizer.pad_token_id)
        out = sft_forward(model, batch)
        counts = OurSFTTrainer.loss_counts(None, batch)  # type: ignore[arg-type]
        ours, _ = plw_loss(
            out["logps"], out["prompt"], out["completion"], plw, *(counts[k] for k in COUNT_KEYS)
        )
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_dpo_matches_trl_dpo_trainer(setup, tmp_path: Path) -> None:
    """Our DPO (one padding-free forward per pair, chunked head, frozen reference) gives TRL
    DPOTrainer's loss and metrics on the same policy / reference pair and batch."""
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from post_training.data_preference.encode import encode_pairs
    from post_training.data_preference.transforms import tiny_task_pairs
    from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
    from post_training.losses import dpo_loss
    from post_training.trainers.preference import pair_statistics

    tokenizer, policy, rows = setup
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(asset_path("tiny-llama"))
    )
    pairs = [tiny_task_pairs(r) for r in rows]
    config = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        per_device_train_batch_size=len(pairs),
        report_to=[],
        use_cpu=True,
        max_length=None,
    )
    dataset = Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    trl = TRLDPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    policy.eval()
    reference.eval()
    with torch.no_grad():
        trl_batch = trl._prepare_inputs(next(iter(trl.get_train_dataloader())))
        trl_loss = trl.compute_loss(policy, trl_batch)
        trl_metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}  # eval mode

        encoder = ChatEncoder(tokenizer, None, TokenizeOptions(256))
        batch = pad_collate(encode_pairs(pairs, encoder, "pairs", 255), tokenizer.pad_token_id)
        ours = pair_statistics(sft_forward(policy, batch, chunk_size=7), batch)
        ref = pair_statistics(sft_forward(reference, batch, chunk_size=7), batch)
        losses, metrics = dpo_loss(
            ours["chosen_logps"],
            ours["rejected_logps"],
            ref["chosen_logps"],
            ref["rejected_logps"],
            ours["chosen_lengths"],
            ours["rejected_lengths"],
            beta=0.1,
        )
    torch.testing.assert_close(losses.mean(), trl_loss.float(), rtol=1e-4, atol=1e-4)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert abs(float(metrics[key].mean()) - trl_metrics[key]) < 1e-4, key
    for side in ("chosen", "rejected"):
        mean_logit = ours[f"{side}_logit_sum"].sum() / ours[f"{side}_lengths"].sum()
        assert abs(float(mean_logit) - trl_metrics[f"logits/{side}"]) < 1e-4, side
