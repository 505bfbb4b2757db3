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
