"""Rewards of completions: registered Python functions, or a sequence-classification model.

A reward function is ``fn(completion: str, row: Mapping) -> float``; ``row`` is the alignment row
(``prompt``, ``answer`` when the dataset has one, kept columns). Register one with::

    from post_training.data_alignment.rewards import register_reward

    @register_reward("my_reward")
    def my_reward(completion, row):
        return float(len(completion) < 100)

and pick it with ``reward.function=my_reward`` (import your module with ``reward.module=pkg.mod``)
or ``reward.function=pkg.mod:fn`` without registering.

A reward model is an ``AutoModelForSequenceClassification`` with one label, scored on the
conversation ``prompt + [assistant completion]`` rendered with the reward model's own tokenizer
and chat template (``reward.model.chat_template`` overrides it).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from post_training.data_preference.transforms import tiny_task_reward
from post_training.errors import ConfigError, DataError
from post_training.utils.progress import ItemProgress

log = logging.getLogger(__name__)

RewardFunction = Callable[[str, Mapping[str, Any]], float]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Register ``fn(completion, row) -> float`` under ``name`` (``reward.function=name``)."""

    def decorator(fn: RewardFunction) -> RewardFunction:
        if name in REWARD_FUNCTIONS and REWARD_FUNCTIONS[name] is not fn:
            raise ValueError(f"a reward function named {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return decorator


def _answer(row: Mapping[str, Any]) -> str:
    if row.get("answer") is None:
        raise DataError("no 'answer' to compare with (the dataset gives no reference reply)")
    return str(row["answer"])


@register_reward("exact_match")
def exact_match(completion: str, row: Mapping[str, Any]) -> float:
    """1 when the completion equals the row's ``answer`` after stripping whitespace, else 0."""
    return float(completion.strip() == _answer(row).strip())


@register_reward("tiny_task_partial")
def tiny_task_partial(completion: str, row: Mapping[str, Any]) -> float:
    """Exact match 1; otherwise half the character similarity to the answer (ranks wrong
    answers of the embedded tiny tasks)."""
    return tiny_task_reward(completion, _answer(row), partial=True)


def resolve_reward_function(name: str, module: str | None = None) -> RewardFunction:
    """A registered name (after importing ``module``), or ``pkg.mod:fn``."""
    if module:
        importlib.import_module(module)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.function {name!r}: {err}") from None
        return fn
    if name not in REWARD_FUNCTIONS:
        raise ConfigError(
            f"reward.function {name!r} is not registered; registered: {sorted(REWARD_FUNCTIONS)} "
            "(or give pkg.module:function, or reward.module to import your registrations)"
        )
    return REWARD_FUNCTIONS[name]


class RewardModel:
    """A one-label sequence classifier scoring (prompt, completion) conversations."""

    def __init__(self, options: Mapping[str, Any], device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from post_training.data_sft.templates import ChatTemplate, resolve_template
        from post_training.modeling.loading import check_model_path, torch_dtype

        path = options["model_name_or_path"]
        tokenizer_path = options.get("tokenizer_name_or_path") or path
        check_model_path(path, "reward.model.model_name_or_path")
        check_model_path(tokenizer_path, "reward.model.tokenizer_name_or_path")
        self.where = f"reward.model ({path})"
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(options.get("torch_dtype") or "float32"), use_safetensors=True
        ).to(device)
        self.model.eval()
        self.batch_size = int(options.get("batch_size") or 16)
        self.max_length = options.get("max_length")
        template = resolve_template(options.get("chat_template"))
        if isinstance(template, ChatTemplate):
            bound = template.bind(self.tokenizer.bos_token, self.tokenizer.eos_token)
            self.tokenizer.chat_template = bound.to_jinja()
        elif isinstance(template, str):
            self.tokenizer.chat_template = template
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"{self.where}: its tokenizer ({tokenizer_path}) has no chat template; set "
                "reward.model.chat_template"
            )
        labels = self.model.config.num_labels
        if labels != 1:
            raise ConfigError(f"{self.where}: a reward model has one label, this one has {labels}")
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"{self.where}: its tokenizer ({tokenizer_path}) has {len(self.tokenizer)} tokens "
                f"but the model's embedding has {vocab}: the tokenizer does not match the model"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"

    def texts(
        self, prompts: Sequence[Sequence[Mapping[str, Any]]], completions: Sequence[str]
    ) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                [*map(dict, prompt), {"role": "assistant", "content": completion}], tokenize=False
            )
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Sequence[Mapping[str, Any]]], completions: Sequence[str]
    ) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores: dict[int, float] = {}
        progress = ItemProgress("scoring rewards", len(texts), "completions")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in chunk],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            logits = self.model(**enc).logits[:, 0].float().tolist()
            scores.update(zip(chunk, logits, strict=True))
            progress.update(len(chunk))
        progress.finish()
        return [scores[i] for i in range(len(texts))]
