"""Preference transforms: a raw row to a canonical pair (``prompt``, ``chosen``, ``rejected``, ...).

A source's ``transform`` names one of :data:`PREFERENCE_TRANSFORMS`, ``package.module:function``,
or a transform registered with :func:`register_preference_transform` in the module named by the
source's ``transform_module`` (the same lookup as the SFT transforms). Built-ins:

* ``preference`` (the default) recognises the common layouts by their values (:func:`detect`):

  - explicit prompt: ``prompt`` (string or messages) + ``chosen`` / ``rejected`` (string or
    assistant messages), TRL's standard and conversational forms;
  - implicit prompt: ``chosen`` / ``rejected`` are whole conversations sharing the prompt, which
    is their common beginning (with ``prompt`` absent or null);
  - UltraFeedback-binarized: ``prompt`` is a string and ``chosen`` / ``rejected`` are whole
    conversations starting with that prompt as a user turn: the prompt is taken from them;
  - HH-RLHF transcripts: ``chosen`` / ``rejected`` strings in the ``"\\n\\nHuman: ...
    \\n\\nAssistant: ..."`` format (:func:`hh_rlhf`);
  - LLaMA-Factory ShareGPT pairs: ``conversations`` + ``chosen`` / ``rejected`` as
    ``{from, value}`` (:func:`sharegpt_pairs`);
  - Orca columns: ``system`` / ``question`` / ``chosen`` / ``rejected`` (:func:`orca_pairs`);

* ``hh_rlhf``, ``sharegpt_pairs``, ``orca_pairs``: those layouts by name (and their options);
* ``tiny_task_pairs``: the embedded tiny tasks, the correct answer vs a wrong one.

Message content may be a string or a list of text blocks (``[{"type": "text", "text": ...}]``),
joined; any other block (an image) is an error naming the field and the block type. A transform
raises :class:`~post_training.errors.DataError` (or the SFT helpers' ``FieldError``) naming the
field; the caller adds the file and the 1-based row. The canonical row is described in
:mod:`post_training.data_preference`.
"""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from post_training.data_sft.transforms import (
    SHAREGPT_ROLES,
    FieldError,
    chat,
    register_in,
    required,
    system_of,
    with_system,
)
from post_training.errors import DataError

PreferenceTransform = Callable[..., dict[str, Any]]
PREFERENCE_TRANSFORMS: dict[str, PreferenceTransform] = {}
"""Registered preference transforms by name."""

Messages = list[dict[str, str]]


def register_preference_transform(
    name: str,
) -> Callable[[PreferenceTransform], PreferenceTransform]:
    """Register ``fn(row, **args) -> {"prompt", "chosen", "rejected", ...}`` as ``name``
    (re-registering the same function is allowed; another function under a taken name is not)."""
    return register_in(PREFERENCE_TRANSFORMS, name, "preference transform")


# --- Messages ---------------------------------------------------------------------------------


def as_messages(
    value: Any,
    field: str,
    default_role: str,
    role_key: str = "role",
    content_key: str = "content",
    role_map: Mapping[str, str] | None = None,
) -> Messages:
    """Canonical messages of a field: a string is one ``default_role`` message, a mapping one
    message, a list a conversation; content strings or text blocks (see the module docs)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, Mapping):  # one message: errors name ``field.key``, not ``field[0]``
        try:
            return chat([value], field, role_key, content_key, role_map)
        except FieldError as err:
            raise FieldError(err.field.replace(f"{field}[0]", field, 1), err.problem) from None
    if value is None:
        raise FieldError(field, "missing field")
    return chat(value, field, role_key, content_key, role_map)


def _conversation_like(value: Any) -> bool:
    """A list of messages holding a non-assistant turn (a whole conversation, not a reply)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) for m in value)
        and any(m.get("role") != "assistant" for m in value)
    )


def _common_prompt(chosen: Messages, rejected: Messages, field: str) -> tuple[Messages, int]:
    """The shared beginning of two conversations up to (excluding) the first assistant turn in
    which they differ, and its length."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1  # the reply starts at the first differing assistant turn
    if n == 0:
        raise FieldError(field, "no prompt and no common beginning of chosen / rejected")
    return chosen[:n], n


def _pair(prompt: Messages, chosen: Messages, rejected: Messages) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --- Layout detection -------------------------------------------------------------------------

HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_hh_transcript(value: Any) -> bool:
    """A string in the HH-RLHF format: it starts with ``Human:`` (after the usual blank line)
    and holds an ``\\n\\nAssistant:`` turn."""
    return (
        isinstance(value, str) and value.lstrip().startswith("Human:") and "\n\nAssistant:" in value
    )


def _is_sharegpt_message(value: Any) -> bool:
    return isinstance(value, Mapping) and "from" in value and "value" in value


def detect(row: Mapping[str, Any]) -> str:
    """The layout of a row with the default field names: ``hh_rlhf``, ``sharegpt_pairs``,
    ``orca_pairs`` or ``preference`` (explicit, implicit or UltraFeedback prompt)."""
    chosen = row.get("chosen")
    if (
        row.get("prompt") is None
        and is_hh_transcript(chosen)
        and is_hh_transcript(row.get("rejected"))
    ):
        return "hh_rlhf"
    if isinstance(row.get("prompt"), str) and is_hh_transcript(row["prompt"]):
        return "hh_rlhf"
    conversation = row.get("conversations")
    if (
        row.get("prompt") is None
        and isinstance(conversation, list)
        and conversation
        and all(_is_sharegpt_message(m) for m in conversation)
    ):
        return "sharegpt_pairs"
    if (
        row.get("prompt") is None
        and isinstance(row.get("question"), str)
        and isinstance(chosen, str)
        and isinstance(row.get("rejected"), str)
    ):
        return "orca_pairs"
    return "preference"


# --- Built-in transforms ----------------------------------------------------------------------


@register_preference_transform("preference")
def preference(
    row: Mapping[str, Any],
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> dict[str, Any]:
    """Explicit, implicit or UltraFeedback prompt + chosen / rejected (see the module docs);
    with the default field names, HH-RLHF, ShareGPT-pair and Orca rows are recognised and
    handed to their transforms. ``prompt_field: null`` always takes the prompt from the
    conversations."""
    defaults = (prompt_field, chosen_field, rejected_field) == ("prompt", "chosen", "rejected")
    layout = detect(row) if defaults else "preference"
    if layout != "preference":
        return PREFERENCE_TRANSFORMS[layout](row)
    raw_chosen, raw_rejected = required(row, chosen_field), required(row, rejected_field)
    chosen = as_messages(raw_chosen, chosen_field, "assistant")
    rejected = as_messages(raw_rejected, rejected_field, "assistant")
    raw_prompt = row.get(prompt_field) if prompt_field else None
    whole = _conversation_like(raw_chosen) and _conversation_like(raw_rejected)
    if raw_prompt is None or (whole and isinstance(raw_prompt, str)):
        prompt, n = _common_prompt(chosen, rejected, chosen_field)
        if raw_prompt is not None:
            _check_prompt_starts(raw_prompt, prompt, str(prompt_field), chosen_field)
        return _pair(prompt, chosen[n:], rejected[n:])
    return _pair(as_messages(raw_prompt, str(prompt_field), "user"), chosen, rejected)


def _check_prompt_starts(text: str, prompt: Messages, prompt_field: str, field: str) -> None:
    """UltraFeedback: the conversations' first user turn must be the prompt string."""
    first_user = next((m["content"] for m in prompt if m["role"] == "user"), None)
    if first_user is None or first_user.strip() != text.strip():
        raise FieldError(
            field,
            f"is a whole conversation that does not start with the '{prompt_field}' text as a "
            "user turn; give the reply only, or set transform_args.prompt_field: null to take "
            "the prompt from the conversations",
        )


def parse_hh(text: str, field: str) -> Messages:
    """An HH-RLHF transcript (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) as messages, each
    content stripped."""
    parts = HH_MARKER.split("\n\n" + text.lstrip(" \n"))  # the first blank line is optional
    if parts[0].strip():
        raise FieldError(field, f"text before the first '\\n\\nHuman:' marker: {parts[0][:40]!r}")
    return [
        {"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()}
        for i in range(1, len(parts), 2)
    ]


@register_preference_transform("hh_rlhf")
def hh_rlhf(
    row: Mapping[str, Any],
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    prompt_field: str = "prompt",
) -> dict[str, Any]:
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` transcripts that repeat the conversation; the
    prompt is every turn before the last ``Assistant:``, which must be the same in both (else an
    error naming the first differing turn); chosen / rejected are the final replies. A row with
    a ``prompt`` transcript ending in ``Assistant:`` and plain reply strings works too."""
    if isinstance(row.get(prompt_field), str):
        prompt = parse_hh(row[prompt_field], prompt_field)
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt = prompt[:-1]  # the trailing "Assistant:" the reply continues
        chosen = as_messages(required(row, chosen_field), chosen_field, "assistant")
        rejected = as_messages(required(row, rejected_field), rejected_field, "assistant")
        return _pair(prompt, [_strip(m) for m in chosen], [_strip(m) for m in rejected])
    sides = {}
    for field in (chosen_field, rejected_field):
        value = required(row, field)
        if not isinstance(value, str):
            raise FieldError(
                field, f"must be an HH-RLHF transcript string, got {type(value).__name__}"
            )
        turns = parse_hh(value, field)
        if not turns or turns[-1]["role"] != "assistant":
            raise FieldError(field, "the transcript must end with an '\\n\\nAssistant:' turn")
        sides[field] = turns
    chosen, rejected = sides[chosen_field], sides[rejected_field]
    if chosen[:-1] != rejected[:-1]:
        k = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise FieldError(
            rejected_field,
            f"does not share the prompt with '{chosen_field}': the transcripts differ at turn "
            f"{k + 1} ({len(chosen)} vs {len(rejected)} turns); only the last reply may differ",
        )
    return _pair(chosen[:-1], chosen[-1:], rejected[-1:])


def _strip(message: dict[str, str]) -> dict[str, str]:
    return {"role": message["role"], "content": message["content"].strip()}


SHAREGPT_PAIR_ROLES = {
    **SHAREGPT_ROLES,
    "observation": "user",
    "tool": "user",
    "function_call": "assistant",
}
"""LLaMA-Factory's ``from`` values: tool results (``observation``, ``tool``) are user-side turns,
function calls (``function_call``) assistant-side ones; the canonical roles have no tool role."""


@register_preference_transform("sharegpt_pairs")
def sharegpt_pairs(
    row: Mapping[str, Any],
    field: str = "conversations",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    system_field: str | None = "system",
    role_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """LLaMA-Factory ShareGPT preference rows: the prompt is ``conversations`` (``{from, value}``
    with ``from`` mapped by :data:`SHAREGPT_PAIR_ROLES` updated with ``role_map``), after the
    optional top-level ``system`` string; chosen / rejected are one ``{from, value}`` (or a
    list of them) from the assistant side."""
    roles = {**SHAREGPT_PAIR_ROLES, **(role_map or {})}
    prompt = as_messages(required(row, field), field, "user", "from", "value", roles)
    prompt = with_system(prompt, system_of(row, system_field))
    chosen = as_messages(
        required(row, chosen_field), chosen_field, "assistant", "from", "value", roles
    )
    rejected = as_messages(
        required(row, rejected_field), rejected_field, "assistant", "from", "value", roles
    )
    return _pair(prompt, chosen, rejected)


@register_preference_transform("orca_pairs")
def orca_pairs(
    row: Mapping[str, Any],
    system_field: str | None = "system",
    question_field: str = "question",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> dict[str, Any]:
    """Orca-style columns (Intel/orca_dpo_pairs): a system message when ``system`` is non-empty,
    the ``question`` as the user turn, and the ``chosen`` / ``rejected`` reply strings."""
    prompt = as_messages(required(row, question_field), question_field, "user")
    system = row.get(system_field) if system_field else None
    if system is not None and not isinstance(system, str):
        raise FieldError(str(system_field), f"must be a string, got {type(system).__name__}")
    if system and system.strip():
        prompt = [{"role": "system", "content": system}, *prompt]
    chosen = as_messages(required(row, chosen_field), chosen_field, "assistant")
    rejected = as_messages(required(row, rejected_field), rejected_field, "assistant")
    return _pair(prompt, chosen, rejected)


# --- Tiny tasks -------------------------------------------------------------------------------


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
