"""GPU paths: QLoRA (4-bit base + LoRA, merged in full precision) and the chunked LM head in
bf16. Each test skips on a machine without CUDA (or without the package it needs), saying
why; their CPU counterparts are the refusal test in ``test_config.py`` and the fp32 equality
tests in ``test_lm_head.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from .conftest import QUICK, job_dir, read_metrics, run_dirs, run_entrypoint

NO_CUDA = not torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")]


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs bitsandbytes (pip install bitsandbytes)",
)
def test_qlora_trains_a_4bit_base_and_merges_in_full_precision(artifacts: Path) -> None:
    # A pretrained checkpoint to quantize: the tiny model after a short SFT run.
    pretrain = [*QUICK, "training_args.max_steps=20", "job_subdir=base"]
    run_entrypoint("train_sft", pretrain, artifacts)
    (base,) = job_dir(artifacts, "base").rglob("final-model")
    args = [*QUICK, "training_args.max_steps=10", "job_subdir=qlora",
            "model.init_from_config=false", f"model.model_name_or_path={base}",
            f"model.tokenizer_name_or_path={base}", "model.torch_dtype=bfloat16",
            "training_args.mixed_precision=bf16", "model_args.use_peft=true",
            "model_args.load_in_4bit=true", "model_args.lora_r=8",
            "training_args.learning_rate=1e-3"]  # fmt: skip
    run_entrypoint("train_sft", args, artifacts)
    (run_dir,) = run_dirs(artifacts, "qlora")
    events = [m for m in read_metrics(run_dir) if "loss" in m]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in events)
    (adapter,) = job_dir(artifacts, "qlora").rglob("final-adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    from transformers import AutoModelForCausalLM

    (final,) = job_dir(artifacts, "qlora").rglob("final-model")
    merged = AutoModelForCausalLM.from_pretrained(final)
    original = AutoModelForCausalLM.from_pretrained(base)
    # Full-precision weights (no 4-bit packing), the base plus a LoRA update on the targets.
    merged_params = dict(merged.named_parameters())
    for name, param in original.named_parameters():
        assert merged_params[name].shape == param.shape, name
    changed = [n for n, p in original.named_parameters() if not torch.equal(p, merged_params[n])]
    assert changed and all("proj" in n for n in changed), changed


def test_chunked_head_matches_full_logits_in_bf16() -> None:
    """The chunked LM head on the GPU in bf16: the same per-token log-probs and gradients as
    the plain full-logit computation, to bf16 precision."""
    from post_training.trainers.sft import sft_forward

    from .test_lm_head import batch as make_batch
    from .test_lm_head import tiny_model

    model = tiny_model().to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in make_batch().items()}
    results = []
    for chunk in (0, 7):
        model.zero_grad()
        out = sft_forward(model, batch, chunk)
        (-(out["logps"] * out["completion"]).sum()).backward()
        grad = model.get_output_embeddings().weight.grad.float().clone()
        results.append((out["logps"].float().detach(), grad))
    (full, grad_full), (chunked, grad_chunked) = results
    torch.testing.assert_close(chunked, full, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(grad_chunked, grad_full, atol=3e-2, rtol=5e-2)
