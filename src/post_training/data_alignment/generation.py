"""Sampling reference completions: batched Hugging Face ``generate``, or vLLM on a GPU.

Reproducible per prompt: completion ``k`` of row ``id`` is drawn with random numbers that depend
only on ``(seed, id, k)``, never on the batch it lands in or the partition it belongs to, so a
partitioned run equals an unpartitioned one. With the HF backend this is done by
:class:`SeededSampler`, a logits processor that draws the token itself (temperature, top-k,
top-p, then the inverse CDF at one per-row uniform per step) and hands ``generate`` a one-hot
choice that greedy decoding takes. With vLLM each request gets its own ``seed``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from post_training.data_alignment.stage import row_seed
from post_training.errors import ConfigError
from post_training.utils.progress import ItemProgress

log = logging.getLogger(__name__)
BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class SamplingOptions:
    """``generation.*`` of the config."""

    num_completions: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int = 0
    batch_size: int = 64  # prompts per generate call (each expanded to num_completions rows)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.num_completions < 1:
            raise ConfigError("generation.num_completions must be at least 1")
        if self.temperature < 0:
            raise ConfigError("generation.temperature must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("generation.top_k >= 0, max_new_tokens >= 1, batch_size >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"generation.backend {self.backend!r}: one of {BACKENDS}")


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    truncated: bool  # max_new_tokens reached before a stop token
    token_ids: tuple[int, ...] = ()  # as sampled: the reply's tokens and the stop token, if any


def resolve_backend(requested: str) -> str:
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if not has_vllm or not torch.cuda.is_available():
            raise ConfigError(
                "generation.backend=vllm needs the vllm package and a CUDA GPU "
                f"(vllm installed: {has_vllm}, CUDA: {torch.cuda.is_available()}); use backend=hf"
            )
        return "vllm"
    if requested == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    return "hf"


def uniforms(seed: int, keys: Sequence[tuple[str, int]], steps: int) -> torch.Tensor:
    """[len(keys), steps] uniforms in [0, 1), one stream per (row id, completion index)."""
    return torch.from_numpy(
        np.stack([np.random.default_rng(row_seed(seed, i, k)).random(steps) for i, k in keys])
    )


class SeededSampler(LogitsProcessor):
    """Draws each row's next token from its own stream of uniforms (see the module docstring)."""

    def __init__(self, u: torch.Tensor, prompt_length: int, options: SamplingOptions) -> None:
        self.u = u
        self.prompt_length = prompt_length
        self.options = options

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        logits = scores.float()
        if self.options.temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / self.options.temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep = torch.ones_like(sorted_probs, dtype=torch.bool)
            if self.options.top_k:
                keep[:, self.options.top_k :] = False
            if self.options.top_p < 1:
                before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the better tokens
                keep &= before < self.options.top_p
            sorted_probs = sorted_probs * keep
            cdf = sorted_probs.cumsum(-1)
            u = self.u[:, step].to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
            index = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
            token = order.gather(-1, index)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


def _decode(tokenizer: Any, ids: Sequence[int], stops: set[int]) -> Completion:
    ids = list(ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    body = ids if end is None else ids[:end]
    sampled = tuple(ids if end is None else ids[: end + 1])
    return Completion(
        tokenizer.decode(body, skip_special_tokens=True), len(body), end is None, sampled
    )


@torch.no_grad()
def generate_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    options: SamplingOptions,
    stop_ids: Sequence[int],
) -> list[list[Completion]]:
    """``options.num_completions`` completions per prompt (token ids) with HF ``generate``."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    n = options.num_completions
    stops = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    results: dict[int, list[Completion]] = {}
    progress = ItemProgress("generating", len(prompts), "prompts")
    for start in range(0, len(order), options.batch_size):
        chunk = order[start : start + options.batch_size]
        width = max(len(prompts[i]) for i in chunk)
        rows = [i for i in chunk for _ in range(n)]
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding
            input_ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention[r, width - len(prompts[i]) :] = 1
        keys = [(ids[i], k) for i in chunk for k in range(n)]
        sampler = SeededSampler(
            uniforms(options.seed, keys, options.max_new_tokens), width, options
        )
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=options.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([sampler]),
            eos_token_id=list(stop_ids),
            pad_token_id=pad,
        )
        new = generated[:, width:].tolist()
        for j, i in enumerate(chunk):
            results[i] = [_decode(tokenizer, new[j * n + k], stops) for k in range(n)]
        progress.update(len(chunk))
    progress.finish()
    return [results[i] for i in range(len(prompts))]


def generate_vllm(
    model_cfg: Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    options: SamplingOptions,
    stop_ids: Sequence[int],
) -> list[list[Completion]]:  # pragma: no cover - needs a GPU and vllm
    """The same completions' distribution with vLLM: one request per (prompt, k), seeded by
    ``(seed, id, k)``."""
    from vllm import LLM, SamplingParams

    if model_cfg.get("init_from_config"):
        raise ConfigError(
            "generation.backend=vllm loads saved weights: set model.init_from_config=false"
        )
    llm = LLM(
        model=model_cfg["model_name_or_path"],
        tokenizer=model_cfg["tokenizer_name_or_path"],
        dtype=model_cfg.get("torch_dtype") or "auto",
        max_model_len=int(model_cfg["max_seq_length"]),
        seed=options.seed,
        trust_remote_code=bool(model_cfg.get("trust_remote_code")),
    )
    n = options.num_completions
    requests, params = [], []
    for prompt, row_id in zip(prompts, ids, strict=True):
        for k in range(n):
            requests.append({"prompt_token_ids": list(prompt)})
            params.append(
                SamplingParams(
                    n=1,
                    temperature=options.temperature,
                    top_p=options.top_p,
                    top_k=options.top_k or -1,
                    max_tokens=options.max_new_tokens,
                    seed=row_seed(options.seed, row_id, k),
                    stop_token_ids=list(stop_ids),
                    skip_special_tokens=True,
                )
            )
    outputs = llm.generate(requests, params)
    flat = [
        Completion(
            o.outputs[0].text,
            len(o.outputs[0].token_ids),
            o.outputs[0].finish_reason == "length",
            tuple(o.outputs[0].token_ids),
        )
        for o in outputs
    ]
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
