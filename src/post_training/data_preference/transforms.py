"""Preference transforms: a raw row to a canonical pair (``prompt``, ``chosen``, ``rejected``, ...).

A source's ``transform`` names one of :data:`PREFERENCE_TRANSFORMS`: ``preference`` (explicit or
implicit prompt), ``tiny_task_pairs`` (the embedded tiny tasks: the correct answer vs a wrong
one), or your own, registered with :func:`register_preference_transform`. The canonical row is
described in :mod:`post_training.data_preference`.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from post_training.errors import DataError

PreferenceTransform = Callable[..., dict[str, Any]]
PREFERENCE_TRANSFORMS: dict[str, PreferenceTransform] = {}


def register_preference_transform(
    name: str,
) -> Callable[[PreferenceTransform], PreferenceTransform]:
    """Register ``fn(row, **args) -> {"prompt", "chosen", "rejected", ...}``."""

    def decorator(fn: PreferenceTransform) -> PreferenceTransform:
        PREFERENCE_TRANSFORMS[name] = fn
        return fn

    return decorator


def _as_messages(value: Any, role: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        return [dict(m) for m in value]
    raise DataError(f"field '{field}' must be a string or a list of messages")


@register_preference_transform("preference")
def preference(
    row: Mapping[str, Any],
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> dict[str, Any]:
    """Explicit prompt (string or messages) + chosen / rejected (string or assistant messages),
    or the implicit-prompt form: chosen and rejected are whole conversations sharing the prompt."""
    for field in (chosen_field, rejected_field):
        if row.get(field) is None:
            raise DataError(f"missing field '{field}' (fields present: {sorted(row)})")
    chosen = _as_messages(row[chosen_field], "assistant", chosen_field)
    rejected = _as_messages(row[rejected_field], "assistant", rejected_field)
    if row.get(prompt_field) is not None:
        prompt = _as_messages(row[prompt_field], "user", prompt_field)
    else:  # implicit prompt: the longest common prefix of the two conversations
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1  # the reply starts at the first differing assistant turn
        if n == 0:
            raise DataError(f"no '{prompt_field}' and no common prompt in chosen / rejected")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A deterministic incorrect answer of the tiny tasks (numbers: off by 1-3; words: shuffled
    or with one character changed)."""
    if answer.isdigit() and not (len(answer) > 1 and answer.startswith("0")):
        value = int(answer)
        wrong = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
        return str(wrong)
    chars = list(answer)
    for _ in range(10):
        rng.shuffle(chars)
        if "".join(chars) != answer:
            return "".join(chars)
    i = rng.randrange(len(answer))
    return answer[:i] + ("a" if answer[i] != "a" else "b") + answer[i + 1 :]


def tiny_task_reward(prediction: str, answer: str, partial: bool = True) -> float:
    """Reward of a tiny-task answer: 1 when exact; else, with ``partial``, half the character
    similarity (``difflib`` ratio), so that wrong answers are ranked and quantiles spread."""
    prediction, answer = prediction.strip(), answer.strip()
    if prediction == answer:
        return 1.0
    if not partial:
        return 0.0
    return 0.5 * difflib.SequenceMatcher(None, prediction, answer).ratio()


@register_preference_transform("tiny_task_pairs")
def tiny_task_pairs(row: Mapping[str, Any], seed: int = 0, partial: bool = True) -> dict[str, Any]:
    """Pairs from an embedded tiny-tasks row: the correct final answer vs a wrong one (rewards
    from :func:`tiny_task_reward`), deterministic per prompt and seed."""
    messages = row.get("messages")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("field 'messages' must end with an assistant turn")
    answer = messages[-1]["content"]
    key = f"{seed}:{[m['content'] for m in messages]}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    wrong = _wrong_answer(answer, rng)
    out: dict[str, Any] = {
        "prompt": [dict(m) for m in messages[:-1]],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong}],
        "chosen_reward": 1.0,
        "rejected_reward": tiny_task_reward(wrong, answer, partial),
    }
    return out
