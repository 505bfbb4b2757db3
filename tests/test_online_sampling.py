"""``train_online`` is on-policy: its sampler draws from the policy's own distribution (left
padding and the KV cache of a mixed-length batch included), and the log-probs and entropy it
scores for the sampled tokens are those of a plain forward over each sequence alone."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from post_training.data_alignment.generation import SamplingOptions, generate_hf
from post_training.data_sft.collate import pad_collate
from post_training.online.trainer import sampled_example, sampled_token_stats
from post_training.utils.config import asset_path

SAMPLES = 1500


@pytest.fixture(scope="module")
def peaked() -> tuple[torch.nn.Module, object]:
    """The tiny model with its (tied) embeddings scaled up: next-token distributions that are
    far from uniform and depend on the context, so a sampler or a padding error shows."""
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    config = AutoConfig.from_pretrained(asset_path("tiny-llama"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2.0)
    return model, tokenizer


def _prompt(tokenizer, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@torch.no_grad()
def _next_token_probs(model, ids: list[int]) -> torch.Tensor:
    return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def _assert_frequencies_match(counts: Counter, total: int, probs: torch.Tensor) -> None:
    """Each likely token's frequency within 4.5 standard errors of its probability."""
    assert total >= 200
    for token in probs.argsort(descending=True)[:6].tolist():
        p = float(probs[token])
        bound = 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / total) + 2e-3
        assert abs(counts[token] / total - p) < bound, (token, counts[token] / total, p)


def test_samples_follow_the_policy_in_a_left_padded_batch(peaked) -> None:
    model, tokenizer = peaked
    short = _prompt(tokenizer, "add 85+69")
    long = _prompt(tokenizer, "reverse abcdefg", system="You solve small puzzles.")
    assert len(long) > len(short) + 10  # the short prompts are left-padded
    probs = _next_token_probs(model, short)
    assert float(probs.max()) < 0.9 and (probs > 0.02).sum() >= 2  # several likely tokens
    options = SamplingOptions(
        num_completions=1, temperature=1.0, max_new_tokens=2, seed=0, batch_size=4 * SAMPLES
    )
    prompts = [short] * SAMPLES + [long] * SAMPLES
    ids = [str(i) for i in range(len(prompts))]
    completions = generate_hf(model, tokenizer, prompts, ids, options, [tokenizer.eos_token_id])
    for prompt, groups in ((short, completions[:SAMPLES]), (long, completions[SAMPLES:])):
        sampled = [g[0].token_ids for g in groups]
        # the first token, and the second after the commonest first (the KV-cached step)
        _assert_frequencies_match(
            Counter(s[0] for s in sampled), SAMPLES, _next_token_probs(model, prompt)
        )
        first, _ = Counter(s[0] for s in sampled).most_common(1)[0]
        seconds = Counter(s[1] for s in sampled if s[0] == first and len(s) > 1)
        if first != tokenizer.eos_token_id:
            _assert_frequencies_match(
                seconds, sum(seconds.values()), _next_token_probs(model, [*prompt, first])
            )


def test_scored_log_probs_and_entropy_equal_a_plain_forward(peaked) -> None:
    model, tokenizer = peaked
    prompts = [_prompt(tokenizer, t) for t in ("sort 7049", "count c in bcccab", "reverse mvz")]
    options = SamplingOptions(num_completions=3, temperature=1.0, max_new_tokens=8, seed=1)
    completions = generate_hf(
        model, tokenizer, prompts, ["a", "b", "c"], options, [tokenizer.eos_token_id]
    )
    examples, spans = [], []
    for prompt, group in zip(prompts, completions, strict=True):
        for c in group:
            examples.append(sampled_example(prompt, c.token_ids))
            spans.append((len(prompt), len(prompt) + len(c.token_ids)))
    batch = pad_collate(examples, tokenizer.pad_token_id)
    assert len({e["input_ids"].shape[0] for e in examples}) > 1  # right padding in the batch
    logps, entropy = sampled_token_stats(model, batch, budget=2 * 80 * batch["input_ids"].shape[1])
    for row, (example, (start, end)) in enumerate(zip(examples, spans, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([example["input_ids"]])).logits[0].double()
        log_p = torch.log_softmax(logits, -1)
        targets = torch.tensor(example["input_ids"][start:end])
        expected = log_p[start - 1 : end - 1].gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(
            logps[row, start - 1 : end - 1].double(), expected, atol=1e-4, rtol=1e-4
        )
        h = -(log_p.exp() * log_p).sum(-1)[start - 1 : end - 1]
        torch.testing.assert_close(
            entropy[row, start - 1 : end - 1].double(), h, atol=1e-4, rtol=1e-4
        )
