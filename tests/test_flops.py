"""MFU accounting (``post_training.utils.flops``) and its ``perf/mfu`` metric in a real run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from post_training.utils import flops
from post_training.utils.flops import ModelFlops, device_peak_flops, flops_per_token

from .conftest import QUICK, read_metrics, run_dirs, run_entrypoint

# hidden 8, 2 layers, 2 heads (head_dim 4), 1 KV head, MLP 16, vocab 32.
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 8, 2, 2, 1, 16, 32


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_by_hand(tied: bool) -> None:
    model = tiny_llama(tied)
    head_dim = HIDDEN // HEADS
    # Per layer: q and o (8x8 each), k and v (8 -> 1 head of 4), gate/up/down (8x16 each).
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * MLP
    assert per_layer == 128 + 64 + 384
    # LM head counted once; the embedding table only when it *is* the head (tied).
    n = LAYERS * per_layer + VOCAB * HIDDEN
    assert flops.matmul_params(model) == n == 1408
    total = sum(p.numel() for p in model.parameters())
    norms = (2 * LAYERS + 1) * HIDDEN
    assert total == n + norms + (0 if tied else VOCAB * HIDDEN)
    seq_len = 10
    expected = 6 * n + 12 * LAYERS * HEADS * head_dim * seq_len
    assert flops_per_token(model, seq_len) == expected == 6 * 1408 + 1920
    assert ModelFlops.of(model) == ModelFlops(1408, LAYERS, HEADS, head_dim)


def test_cpu_peak_is_measured_positive_and_cached() -> None:
    peak = device_peak_flops("cpu")
    assert math.isfinite(peak) and peak > 1e8  # any CPU beats 0.1 GFLOP/s
    assert device_peak_flops(torch.device("cpu")) == peak  # measured once per process


def test_known_gpu_peaks() -> None:
    assert flops.GPU_BF16_PEAK_FLOPS["H100"] == flops.GPU_BF16_PEAK_FLOPS["H200"] == 989e12


@pytest.mark.e2e
def test_training_logs_mfu(artifacts: Path) -> None:
    run_entrypoint(
        "train_sft",
        [*QUICK, "job_subdir=mfu", "training_args.max_steps=2", "training_args.packing=true"],
        artifacts,
    )
    (run_dir,) = run_dirs(artifacts, "mfu")
    events = [m for m in read_metrics(run_dir) if "loss" in m]
    assert len(events) == 2
    for event in events:
        assert 0 < event["perf/mfu"] <= 1
        assert event["perf/tflops"] > 0
