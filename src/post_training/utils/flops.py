"""Model FLOPs utilisation (MFU): training FLOPs per token and the device's peak.

Accounting (torchtitan's ``get_nparams_and_flops``): one token of a training step (forward and
backward) costs

    6·N + 12·L·H·D·S

FLOPs, N being the matmul parameters (every linear layer's weight, the LM head included; the
embedding table excluded, unless it is tied to the head, where it is counted once as the head),
L layers, H attention heads of dimension D, and S the sequence length the attention ran over
(the padded or packed row length). The attention term counts QKᵀ and AV (2 matmuls forward, 4
backward, 2 FLOPs per multiply-add) over the full score matrix, as torchtitan's code does; the
issue writes 6·L·H·D·S, which would discount the causal half (our and TRL's MFU alike, so the
ratios do not change; at S = 1024 on the CPU benchmark model it would lower MFU by about 10%).
A frozen reference model's forward (DPO) and activation recomputation are not counted.

The peak is the device's dense bf16 peak for known GPUs, else a matmul peak measured on this
machine at start-up (a few timed square matmuls in the device's working precision, best of).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name.
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
}


@dataclass(frozen=True)
class ModelFlops:
    """What the FLOPs of a decoder-only transformer's training step depend on."""

    matmul_params: int
    num_layers: int
    num_heads: int
    head_dim: int

    def per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token at sequence length ``seq_len``."""
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * self.matmul_params + attention

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        config = model.config
        config = getattr(config, "text_config", None) or config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(matmul_params(model), int(config.num_hidden_layers), heads, int(head_dim))


def matmul_params(model: nn.Module) -> int:
    """Weights of the linear layers (each tensor once): the LM head included, so a tied
    embedding table counts once, an untied one not at all."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            total += int(getattr(weight, "ds_numel", weight.numel()))  # ZeRO-3: full size
    return total


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` at sequence length ``seq_len`` (see module doc)."""
    return ModelFlops.of(model).per_token(seq_len)


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int
) -> float:
    """FLOP/s of the fastest of ``repeats`` timed ``n×n @ n×n`` matmuls per size."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


@functools.cache
def measure_cpu_matmul_peak(sizes: tuple[int, ...] = (1024, 1536), repeats: int = 3) -> float:
    """FLOP/s of the best timed fp32 square matmul on the CPU with torch's current threads
    (cached per process; ~0.3 s on 2 cores)."""
    return measure_matmul_peak(torch.device("cpu"), torch.float32, sizes, repeats)


@functools.cache
def _measured_gpu_peak(index: int) -> float:
    device = torch.device("cuda", index)
    return measure_matmul_peak(device, torch.bfloat16, (4096, 8192), 5)


def device_peak_flops(device: torch.device | str) -> float:
    """Peak FLOP/s to divide by: the dense bf16 peak of a known GPU (by name), a measured bf16
    matmul peak of an unknown one, a measured fp32 matmul peak on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return measure_cpu_matmul_peak()
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    for key, peak in GPU_BF16_PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return peak
    return _measured_gpu_peak(index)
