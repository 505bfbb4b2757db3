"""KTO: the loss against its formula, against TRL 1.16's ``KTOTrainer`` on the same model and
batch (loss, metrics and every parameter's gradient: one full trainer step), the KL reference
point estimated over the whole accumulation window (so 1×k = k×1), and unpaired data
(``prompt, completion, label`` rows or ``dataset.unpair=true``) with bad rows named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from post_training.data_preference.encode import encode_pairs
from post_training.data_preference.transforms import tiny_task_pairs
from post_training.data_preference.unpaired import (
    kl_partners,
    kto_rows,
    label_balance,
    load_unpaired_examples,
)
from post_training.data_sft.collate import pad_collate
from post_training.data_sft.messages import read_jsonl_messages
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.errors import ConfigError, DataError
from post_training.losses.kto import kto_loss, summarize_kto
from post_training.losses.table import KTOLoss
from post_training.schema import check
from post_training.trainers.preference import pair_statistics
from post_training.trainers.sft import sft_forward
from post_training.utils.config import asset_path

from .conftest import assistant, user


def _examples(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref = logps + torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 1, 0, 0][:n], dtype=torch.float64)
    return logps, ref, labels


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("z0", [0.0, 0.7, -0.4])
def test_kto_loss_by_hand(loss_type: str, z0: float) -> None:
    logps, ref, labels = _examples()
    beta, wd, wu = 0.2, 1.3, 0.8
    losses, sums = kto_loss(
        logps, ref, labels, torch.tensor(z0, dtype=torch.float64), beta, wd, wu, loss_type=loss_type
    )
    kl = max(z0, 0.0)  # clamped at 0
    for i in range(len(logps)):
        rho = float(logps[i] - ref[i])
        sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x, dtype=torch.float64)))  # noqa: E731
        if loss_type == "kto":
            want = (
                wd * (1 - sig(beta * (rho - kl)))
                if labels[i]
                else wu * (1 - sig(beta * (kl - rho)))
            )
        else:
            want = wd * (1 - sig(beta * rho)) if labels[i] else wu * sig(beta * rho)
        assert abs(float(losses[i]) - float(want)) < 1e-12
    d = labels.bool()
    summary = summarize_kto({k: float(v) for k, v in sums.items()}, {})
    assert summary["rewards/chosen"] == pytest.approx(float((beta * (logps - ref))[d].mean()))
    assert summary["rewards/rejected"] == pytest.approx(float((beta * (logps - ref))[~d].mean()))
    assert summary["logps/chosen"] == pytest.approx(float(logps[d].mean()))
    assert summary["kl"] == pytest.approx(kl)


def test_kto_gradient_flows_only_through_the_example() -> None:
    logps, ref, labels = _examples()
    logps.requires_grad_(True)
    z0 = torch.tensor(0.3, requires_grad=True)
    losses, _ = kto_loss(logps, ref, labels, z0, 0.1)
    losses.sum().backward()
    assert z0.grad is None, "z₀ is detached (KTO's KL point carries no gradient)"
    assert bool((logps.grad[labels.bool()] < 0).all()), "desirable: raise the log-prob"
    assert bool((logps.grad[~labels.bool()] > 0).all()), "undesirable: lower it"


def test_kto_options_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"trainer.desirable_weight=0.0"):
        KTOLoss(desirable_weight=0.0)
    with pytest.raises(ValueError, match=r"trainer.loss_type='bco'"):
        KTOLoss(loss_type="bco")


# ----------------------------------------------------------------------------- TRL oracle
def _unpaired(n: int) -> list[dict]:
    rows = read_jsonl_messages(asset_path("tiny-tasks/eval.jsonl"))
    single = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) == 1]
    examples = []
    for i, row in enumerate(single[:n]):
        pair = tiny_task_pairs(row)
        side = "chosen" if i % 3 != 1 else "rejected"
        examples.append(
            {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        )
    return examples


@pytest.fixture
def models():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    config = AutoConfig.from_pretrained(asset_path("tiny-llama"))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config).double()  # fp64: layouts agree to 1e-12
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(config).double()
    return tokenizer, policy, reference


def _ours(policy, reference, rows, loss: KTOLoss, tokenizer, chunk_size=0):
    batch = pad_collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        ref = pair_statistics(sft_forward(reference, batch, chunk_size), batch)
    stats = pair_statistics(sft_forward(policy, batch, chunk_size), batch)
    z0 = (stats["rejected_logps"].detach() - ref["rejected_logps"]).mean()
    stats["kl"] = z0
    losses, sums = loss(stats, (ref["chosen_logps"], ref["rejected_logps"]), batch)
    return losses.mean(), sums


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_kto_matches_trl_kto_trainer_loss_metrics_and_gradients(
    models, loss_type: str, tmp_path: Path
) -> None:
    """One full step of TRL's KTOTrainer (its own tokenization, KL completions, fused head
    and reference forward) and of ours on the same policy, reference and examples: equal loss,
    metrics and per-parameter gradients."""
    from trl import KTOConfig
    from trl import KTOTrainer as TRLKTOTrainer

    tokenizer, policy, reference = models
    examples = _unpaired(8)
    assert len({json.dumps(e["prompt"]) for e in examples}) == len(examples)
    beta, wd, wu = 0.1, 1.0, 1.33
    config = KTOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        loss_type=loss_type,
        per_device_train_batch_size=len(examples),
        report_to=[],
        use_cpu=True,
        max_length=None,
    )
    trl = TRLKTOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
    )
    policy.eval()
    reference.eval()
    trl_batch = trl._prepare_inputs(next(iter(trl.get_train_dataloader())))
    policy.zero_grad(set_to_none=True)
    trl_loss = trl.compute_loss(policy, trl_batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    trl_metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}

    # Ours: the same examples, KL completions from kto_rows (example i gets i−1's, cyclically,
    # as TRL's +1 rotation when every prompt differs), one padding-free row per example.
    rows = encode_pairs(
        kto_rows(examples, "dataset.train"),
        ChatEncoder(tokenizer, None, TokenizeOptions(512)),
        "dataset.train",
        511,
    )
    # the same tokens as TRL's own tokenization (prompt + completion, and the KL sequences)
    for i, row in enumerate(rows):
        split = int((row["position_ids"][1:] == 0).nonzero()[0][0]) + 1
        trl_ids = trl_batch["input_ids"][i][trl_batch["attention_mask"][i].bool()].tolist()
        assert row["input_ids"][:split].tolist() == trl_ids, i
        if loss_type == "kto":  # apo_zero_unpaired has no KL term, TRL no KL sequences
            kl = trl_batch["KL_input_ids"][i][trl_batch["KL_attention_mask"][i].bool()].tolist()
            assert row["input_ids"][split:].tolist() == kl, i
    loss = KTOLoss(beta=beta, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)
    policy.zero_grad(set_to_none=True)
    ours, sums = _ours(policy, reference, rows, loss, tokenizer, chunk_size=7)
    ours.backward()
    # TRL's fused head returns fp32 log-probs: agreement to fp32 rounding of the sums
    assert abs(float(ours) - float(trl_loss)) < 1e-6
    for name, grad in trl_grads.items():
        ours_grad = dict(policy.named_parameters())[name].grad
        assert float((ours_grad - grad).abs().max()) < 1e-6, name
    summary = summarize_kto({k: float(v) for k, v in sums.items()}, {})
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"]  # fmt: skip
    if loss_type == "kto":
        keys.append("kl")
    for key in keys:
        assert summary[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-5), key


def _fit(policy, rows, tokenizer, steps: int = 30) -> None:
    """A few SFT steps on the rows' tokens (both documents): the policy then gives these
    answers, the KL completions included, more probability than the untouched reference, so
    the KL estimate ``z₀`` is positive (not clamped away)."""
    batch = pad_collate(rows, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        out = sft_forward(policy, batch)
        loss = -(out["logps"] * out["completion"]).sum() / out["completion"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_window_kl_makes_accumulation_exact(models) -> None:
    """z₀ over the window: the per-example losses of a window cut into micro-batches equal
    those of one batch; each micro-batch's own z₀ (TRL's estimate) would give another loss."""
    tokenizer, policy, reference = models
    policy, reference = policy.float(), reference.float()
    rows = encode_pairs(
        kto_rows(_unpaired(8), "dataset.train"),
        ChatEncoder(tokenizer, None, TokenizeOptions(512)),
        "dataset.train",
        511,
    )
    _fit(policy, rows, tokenizer)
    loss = KTOLoss()
    policy.eval()
    with torch.no_grad():
        whole, _ = _ours(policy, reference, rows, loss, tokenizer)
        parts = []
        for part in (rows[:3], rows[3:]):
            batch = pad_collate(part, tokenizer.pad_token_id)
            ref = pair_statistics(sft_forward(reference, batch), batch)
            stats = pair_statistics(sft_forward(policy, batch), batch)
            parts.append((batch, ref, stats))
        kl = [s["rejected_logps"] - r["rejected_logps"] for _, r, s in parts]
        z0 = torch.cat(kl).mean()
        assert float(z0) > 1.0
        window, local = 0.0, 0.0
        for (batch, ref, stats), part_kl in zip(parts, kl, strict=True):
            for z, total in ((z0, "window"), (part_kl.mean(), "local")):
                losses, _ = loss(
                    {**stats, "kl": z}, (ref["chosen_logps"], ref["rejected_logps"]), batch
                )
                if total == "window":
                    window += float(losses.sum())
                else:
                    local += float(losses.sum())
    assert window / len(rows) == pytest.approx(float(whole), rel=1e-6)
    assert abs(local / len(rows) - float(whole)) > 1e-4, "the micro-batches' own z₀ differ"


# ------------------------------------------------------------------------------- data
def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unpaired_rows_load_and_get_mismatched_kl_completions(tmp_path: Path) -> None:
    rows = [
        {"prompt": [user("2+2?")], "completion": [assistant("4")], "label": True},
        {"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False},
        {"prompt": [user("3+3?")], "completion": [assistant("6")], "label": True},
        {"prompt": [user("1+1?")], "completion": [assistant(" ")], "label": True},  # dropped
    ]
    source = load_unpaired_examples(
        {"path": str(_write(tmp_path / "u.jsonl", rows))}, "dataset.train", False
    )
    assert [e["label"] for e in source.examples] == [True, False, True]
    assert source.dropped == {"empty_completion": 1}
    assert source.locate(2).endswith("u.jsonl:3")
    partners = kl_partners(source.examples, "dataset.train")
    # never the example's own prompt: 0 and 1 share one, so both take 2's completion
    assert partners == [2, 2, 1]
    built = kto_rows(source.examples, "dataset.train")
    assert built[0]["rejected"] == [assistant("6")] and built[1]["kto_label"] == 0.0


BAD_ROWS = [
    (
        {"prompt": "q", "completion": "a", "label": 2},
        "u.jsonl:2: field 'label' must be true or false, got 2 (int)",
    ),
    (
        {"prompt": "q", "completion": "a"},
        "u.jsonl:2: field 'label' must be true or false, got missing",
    ),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        "u.jsonl:2: KTO needs unpaired rows with fields prompt, completion, label",
    ),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_unpaired_rows_are_named(tmp_path: Path, row: dict, message: str) -> None:
    good = {"prompt": "p", "completion": "c", "label": 0}
    path = _write(tmp_path / "u.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        load_unpaired_examples({"path": str(path)}, "dataset.train", False)
    assert message in str(err.value)
    assert str(err.value).startswith("dataset.train: ")


def test_unpair_splits_pairs_and_one_prompt_is_refused(tmp_path: Path) -> None:
    pairs = [
        {"prompt": "a?", "chosen": "yes", "rejected": "no"},
        {"prompt": "b?", "chosen": "up", "rejected": "down"},
    ]
    source = load_unpaired_examples(
        {"path": str(_write(tmp_path / "p.jsonl", pairs))}, "dataset.train", True
    )
    assert [(e["completion"][0]["content"], e["label"]) for e in source.examples] == [
        ("yes", True), ("no", False), ("up", True), ("down", False)
    ]  # fmt: skip
    assert source.locate(3).endswith("p.jsonl:2")
    # the chosen and rejected of one pair share a prompt: the KL partner skips its twin
    assert kl_partners(source.examples, "dataset.train") == [3, 3, 1, 1]
    with pytest.raises(DataError, match="at least two different prompts"):
        kl_partners(source.examples[:2], "dataset.train")


def test_label_balance_line() -> None:
    rows = [{"kto_label": 1.0}] * 3 + [{"kto_label": 0.0}] * 6
    line, ok = label_balance(rows, 1.0, 1.0)
    assert not ok and "3 desirable, 6 undesirable" in line and "0.500" in line
    line, ok = label_balance(rows, 2.2, 1.0)
    assert ok and "1.100" in line


def test_schema_knows_kto_and_unpair_is_for_kto_only() -> None:
    from tests.test_schema import composed

    check(composed("train-preference", ["trainer=kto", "dataset.unpair=true"]))
    with pytest.raises(ConfigError, match=r"dataset.unpair=true with trainer=dpo"):
        check(composed("train-preference", ["trainer=dpo", "dataset.unpair=true"]))
