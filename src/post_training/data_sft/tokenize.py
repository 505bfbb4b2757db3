"""Templating and tokenization with exact prompt / completion masks, truncation and filters.

Each conversation is rendered to text together with the character spans of its trained parts
(every assistant turn's reply and end-of-turn token; all of a plain-text document):

- a registry / YAML :class:`~post_training.data_sft.templates.ChatTemplate` knows the spans by
  construction (the reply content plus the assistant suffix; separators and ``after`` text, such
  as chatml's newline after ``<|im_end|>``, are never trained);
- the tokenizer's own Jinja template: the whole conversation is rendered once, and for each
  assistant turn ``i`` the span is taken from that full rendering:

  * it starts where the generation prompt ends: ``render(messages[:i], add_generation_prompt=
    True)`` must be a prefix of the full rendering (else the example is refused);
  * the reply is located after that point, before the next turn's generation prompt ends (the
    content as given, stripped, or, for a reply holding a ``<think>`` block, the part after
    ``</think>``: templates strip, trim and re-wrap content);
  * it ends right after the end-of-turn token that follows the reply: the first special token
    after it, with only whitespace between (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
    ``<|end|>``, ``</s>``, ...). What follows that token (chatml's and Gemma's newline) is
    not trained. The reply is its first occurrence so followed, with no such token between the
    generation prompt and it, so repeated content stays in its own turn; an empty reply is
    located by rendering once more with a probe character appended to it. A reply that cannot
    be located this way is refused rather than guessed.

  Templates need not be prefix-stable turn by turn. Reasoning templates (Qwen3, DeepSeek-R1
  style ``<think>`` blocks) render turns differently depending on their position, and the
  masks follow the full rendering: every turn trains what the template renders for it after
  its generation prompt. For the last turn that is what the model must generate at inference
  after the generation prompt, e.g. Qwen3's empty ``<think>\n\n</think>\n\n`` before the
  reply is trained; earlier turns, which Qwen3 renders without a think block, train just their
  reply and ``<|im_end|>``.

``train_on`` (``data.train_on``): ``all_assistant_turns`` trains every assistant turn,
``last_assistant_turn`` only the final one (the earlier ones are context, LlamaFactory's
``mask_history``).

The whole text is then tokenized once (batched, in Rust) with character offsets, and a token is
a completion token iff it overlaps a trained span, so every completion character is trained even
where a subword merges across the boundary (e.g. BPE's ``" answer"`` after ``"Assistant:"``);
such tokens are counted in the report. Rows in errors are 1-based (or the source's own
``file:line`` when the caller passes a locator).

Filters: an example is dropped, and counted in the :class:`FilterReport` per reason, when it is
empty, starts with an assistant turn, has a system message after the first, non-alternating
roles (``data.non_alternating_roles=drop``), no completion (before or after truncation), or is
too long (``data.truncation=drop``); with ``drop_empty_turns`` (the SFT training data), also
when a user or assistant turn's content is empty or whitespace only (``empty_user_turn``,
``empty_assistant_turn``): such a turn teaches nothing, or to reply with nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from post_training.data_sft.templates import ROLES, TEXT_ROLE, ChatTemplate
from post_training.errors import ConfigError, DataError
from post_training.losses.constants import IGNORE_INDEX
from post_training.utils.progress import ItemProgress

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("drop", "truncate")
ROLE_FIX_MODES = ("merge", "drop", "error")
TRAIN_ON_MODES = ("all_assistant_turns", "last_assistant_turn")
ENCODE_BATCH = 1024


@dataclass
class TokenizeOptions:
    """``max_seq_length``; ``truncation``: ``drop`` too-long examples or ``truncate`` their tail
    (kept if completion tokens remain); ``role_fix``: consecutive messages of the same role are
    ``merge``d (joined by ``merge_separator``), the example ``drop``ped, or an ``error``;
    ``train_on``: ``all_assistant_turns`` or only the ``last_assistant_turn``."""

    max_seq_length: int
    truncation: str = "drop"
    role_fix: str = "merge"
    merge_separator: str = "\n\n"
    add_bos: bool = False
    train_on: str = "all_assistant_turns"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON_MODES:
            raise ConfigError(
                f"data.train_on must be one of {TRAIN_ON_MODES}, got {self.train_on!r}"
            )
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(
                f"data.truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}"
            )
        if self.role_fix not in ROLE_FIX_MODES:
            raise ConfigError(
                f"data.non_alternating_roles must be one of {ROLE_FIX_MODES}, got {self.role_fix!r}"
            )


@dataclass
class FilterReport:
    """Examples kept and dropped per reason."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    merged: int = 0
    boundary_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"{name}: kept {self.kept} of {self.total} examples (truncated {self.truncated}, "
            f"merged roles in {self.merged}; {self.boundary_tokens} tokens straddle a "
            f"prompt/completion boundary); dropped: {reasons}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "truncated": self.truncated,
            "merged": self.merged,
            "boundary_tokens": self.boundary_tokens,
            "dropped": dict(self.dropped),
        }


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def fix_roles(
    messages: Sequence[Mapping[str, Any]],
    options: TokenizeOptions,
    where: str,
    drop_empty: bool = False,
) -> tuple[list[dict[str, str]], bool]:
    """Validate roles; merge (or drop / refuse) consecutive messages of the same role.

    A system message is allowed only first. With ``drop_empty``, a user or assistant message
    whose content is empty or whitespace only drops the example (``empty_<role>_turn``).
    Returns the messages and whether any were merged.
    """
    out: list[dict[str, str]] = []
    merged = False
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in (*ROLES, TEXT_ROLE):
            raise DataError(f"{where}: messages[{i}].role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content is {type(content).__name__}, not str")
        if role == TEXT_ROLE and len(messages) != 1:
            raise DataError(f"{where}: a 'text' message must be the only message of its row")
        if drop_empty and role in ("user", "assistant") and not content.strip():
            raise _Skip(f"empty_{role}_turn")
        if role == "system" and i > 0:
            if options.role_fix == "error":
                raise DataError(f"{where}: messages[{i}] is a system message after the first")
            raise _Skip("system_not_first")
        if out and out[-1]["role"] == role:
            if options.role_fix == "error":
                raise DataError(
                    f"{where}: messages[{i - 1}] and messages[{i}] both have role {role!r}"
                )
            if options.role_fix == "drop":
                raise _Skip("non_alternating_roles")
            out[-1] = {
                "role": role,
                "content": out[-1]["content"] + options.merge_separator + content,
            }
            merged = True
            continue
        out.append({"role": role, "content": content})
    return out, merged


THINK_END = "</think>"
PROBE = "\ue000"  # a private-use character: no template or tokenizer treats it specially
_REFUSED = (
    "cannot derive exact completion masks — use a registry or YAML template (model.chat_template)"
)


class EndOfTurnTokens:
    """The tokenizer's special tokens, to recognise the end-of-turn token after a reply."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        tokens |= set(tokenizer.all_special_tokens)
        self.by_first: dict[str, list[str]] = {}
        for token in sorted((t for t in tokens if t), key=len, reverse=True):
            self.by_first.setdefault(token[0], []).append(token)

    def at(self, text: str, pos: int, bound: int) -> str | None:
        """The special token starting at ``text[pos]`` and ending by ``bound``, if any."""
        if pos >= bound:
            return None
        for token in self.by_first.get(text[pos], ()):
            if pos + len(token) <= bound and text.startswith(token, pos):
                return token
        return None


def reply_candidates(content: str) -> tuple[list[str], bool]:
    """What a template may render of a reply: as given, stripped, or the part after a think
    block; and whether that visible reply is empty (then it is located by a probe)."""
    out = [content, content.strip()]
    empty = not content.strip()
    if THINK_END in content:
        answer = content.split(THINK_END)[-1].strip()
        out.append(answer)
        empty = empty or not answer
    return list(dict.fromkeys(c for c in out if c)), empty


def _end_after(text: str, start: int, pos: int, bound: int, eot: EndOfTurnTokens) -> int | None:
    """End of the end-of-turn token after ``text[pos]`` (only whitespace between), or ``None``;
    the same token must not occur between ``start`` and ``pos`` (that would be another turn)."""
    after = pos
    while after < bound and text[after].isspace():
        after += 1
    token = eot.at(text, after, bound)
    if token is None or token in text[start:pos]:
        return None
    return after + len(token)


def reply_end(text: str, start: int, bound: int, content: str, eot: EndOfTurnTokens) -> int | None:
    """End of the reply's span in ``text``: right after the end-of-turn token that follows the
    reply located in ``text[start:bound]`` (its first such occurrence), or ``None``."""
    for candidate in reply_candidates(content)[0]:
        pos = text.find(candidate, start, bound)
        while pos != -1:
            end = _end_after(text, start, pos + len(candidate), bound, eot)
            if end is not None:
                return end
            pos = text.find(candidate, pos + 1, bound)
    return None


def _probe_end(
    render: Callable[[list[dict[str, str]]], str],
    messages: list[dict[str, str]],
    i: int,
    full: str,
    start: int,
    bound: int,
    eot: EndOfTurnTokens,
) -> int | None:
    """Span end of an empty (visible) reply: the conversation is rendered again with a probe
    character appended to reply ``i``; where the template put it is where the reply ends (the
    probe rendering minus the probe must be the full rendering)."""
    probe = [*messages[:i], {**messages[i], "content": messages[i]["content"] + PROBE}]
    text = render([*probe, *messages[i + 1 :]])
    pos = text.find(PROBE)
    if text.count(PROBE) != 1 or text.replace(PROBE, "") != full or not start <= pos <= bound:
        return None
    return _end_after(full, start, pos, bound, eot)


def _render_with_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    where: str,
    eot: EndOfTurnTokens,
    last_only: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's Jinja template; spans from the full rendering (see the module
    docstring). ``last_only``: the span of the last assistant turn only."""

    def render(msgs: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    if messages[0]["role"] == TEXT_ROLE:
        bos = tokenizer.bos_token or ""
        text = messages[0]["content"] + (tokenizer.eos_token or "")
        return bos + text, [(len(bos), len(bos) + len(text))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns and turns[0] == 0:
        raise _Skip("starts_with_assistant")
    if last_only:
        turns = turns[-1:]
    full = render(messages, False)
    starts = []
    for i in turns:
        prompt = render(messages[:i], True)
        if not full.startswith(prompt):
            pairs = zip(prompt, full, strict=False)
            at = next((k for k, (a, b) in enumerate(pairs) if a != b), len(full))
            raise DataError(
                f"{where}: the tokenizer's chat template is not prefix-stable at messages[{i}]: "
                "the conversation before it, rendered with the generation prompt, is not a "
                f"prefix of the whole conversation (from character {at}: "
                f"{prompt[at : at + 30]!r} vs {full[at : at + 30]!r}); {_REFUSED}"
            )
        starts.append(len(prompt))
    spans = []
    for k, (i, start) in enumerate(zip(turns, starts, strict=True)):
        bound = starts[k + 1] if k + 1 < len(starts) else len(full)
        content, end = messages[i]["content"], None
        if reply_candidates(content)[1] and PROBE not in full:  # nothing visible to search
            end = _probe_end(lambda m: render(m, False), messages, i, full, start, bound, eot)
        if end is None:
            end = reply_end(full, start, bound, content, eot)
        if end is None:
            raise DataError(
                f"{where}: messages[{i}] (assistant): the reply, followed by an end-of-turn "
                "token, is not found in the rendered conversation after its generation prompt; "
                f"{_REFUSED}"
            )
        spans.append((start, end))
    return full, spans


class ChatEncoder:
    """Turns conversations into tokenized examples (see the module docstring)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate | None,
        options: TokenizeOptions,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("SFT tokenization needs a fast (Rust) tokenizer for offsets")
        self.tokenizer = tokenizer
        self.options = options
        self.template = (
            template.bind(tokenizer.bos_token, tokenizer.eos_token) if template else None
        )
        self.bos_id = tokenizer.bos_token_id
        self.end_of_turn = EndOfTurnTokens(tokenizer)
        if options.add_bos and self.bos_id is None:
            raise ConfigError("model.special_tokens.add_bos is true but the tokenizer has no BOS")

    def render(
        self, messages: list[dict[str, str]], where: str
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text and its trained spans (only the last one under ``last_assistant_turn``)."""
        last_only = self.options.train_on == "last_assistant_turn"
        if self.template is not None:
            if messages[0]["role"] == "assistant" and "user" in self.template.roles:
                raise _Skip("starts_with_assistant")
            text, spans = self.template.render(messages)
            return text, spans[-1:] if last_only else spans
        return _render_with_tokenizer(self.tokenizer, messages, where, self.end_of_turn, last_only)

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation so far plus the generation prompt (what a reply continues)."""
        if self.template is not None:
            return self.template.render(messages, add_generation_prompt=True)[0]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _only_after_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        train_from: int,
        text: str,
        spans: list[tuple[int, int]],
        where: str,
    ) -> list[tuple[int, int]]:
        """Spans of the replies after ``messages[:train_from]`` (preference completions)."""
        prompt, _ = fix_roles(messages[:train_from], self.options, where)
        prompt_text = self.render_prompt(prompt)
        if not text.startswith(prompt_text):
            raise DataError(f"{where}: the rendered prompt is not a prefix of the conversation")
        return [span for span in spans if span[0] >= len(prompt_text)]

    def encode(
        self,
        conversations: Iterable[Sequence[Mapping[str, Any]] | tuple[Sequence[Any], int]],
        where: str = "dataset",
        report: FilterReport | None = None,
        locate: Callable[[int], str] | None = None,
        drop_empty_turns: bool = False,
        progress: ItemProgress | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        """Tokenized examples and, for each, the index of its conversation in the input
        (``progress`` is told of every conversation read).

        An item ``(messages, train_from)`` trains only the replies after
        ``messages[:train_from]`` (a preference prompt may hold earlier assistant turns).
        ``drop_empty_turns``: drop (and count) a conversation with an empty or whitespace-only
        user or assistant turn (see :func:`fix_roles`). Errors name ``locate(index)`` (e.g. the
        source's ``file:line``), else ``where`` and the 1-based row."""
        report = report if report is not None else FilterReport()
        examples: list[dict[str, np.ndarray]] = []
        kept_index: list[int] = []
        texts: list[str] = []
        spans: list[list[tuple[int, int]]] = []
        indices: list[int] = []

        def flush() -> None:
            encodings = self.tokenizer.backend_tokenizer.encode_batch(
                texts, add_special_tokens=False
            )
            for enc, sp, index in zip(encodings, spans, indices, strict=True):
                example = self._example(enc, sp, report)
                if example is not None:
                    examples.append(example)
                    kept_index.append(index)
            texts.clear()
            spans.clear()
            indices.clear()

        for index, item in enumerate(conversations):
            messages, train_from = item if isinstance(item, tuple) else (item, 0)
            report.total += 1
            if progress is not None:
                progress.update()
            row_where = locate(index) if locate is not None else f"{where}: row {index + 1}"
            try:
                if not messages:
                    raise _Skip("empty")
                fixed, merged = fix_roles(messages, self.options, row_where, drop_empty_turns)
                text, sp = self.render(fixed, row_where)
                if train_from:
                    sp = self._only_after_prompt(messages, train_from, text, sp, row_where)
            except _Skip as skip:
                report.dropped[skip.reason] += 1
                continue
            if not sp:
                report.dropped["no_completion"] += 1
                continue
            report.merged += int(merged)
            texts.append(text)
            spans.append(sp)
            indices.append(index)
            if len(texts) >= ENCODE_BATCH:
                flush()
        if texts:
            flush()
        if progress is not None:
            progress.finish()
        report.kept = len(examples)
        return examples, kept_index

    @staticmethod
    def _completion_mask(
        enc: Any, spans: list[tuple[int, int]], report: FilterReport
    ) -> np.ndarray:
        """1 on tokens overlapping a trained span: from the token holding its first character to
        the one holding its last (``char_to_token``, no per-token offsets in Python); a subword
        merged across a boundary is trained, so every completion character is, and reported."""
        completion = np.zeros(len(enc), dtype=np.int64)
        for a, b in spans:
            first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
            if first is None or last is None:  # characters without a token: overlap via offsets
                bounds = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                starts, ends = bounds[:, 0], np.maximum(bounds[:, 1], bounds[:, 0] + 1)
                completion |= (starts < b) & (ends > a)
                report.boundary_tokens += int(((starts < a) & (ends > a)).sum())
                report.boundary_tokens += int(((starts < b) & (ends > b)).sum())
                continue
            completion[first : last + 1] = 1
            report.boundary_tokens += int(enc.token_to_chars(first)[0] < a)
            report.boundary_tokens += int(enc.token_to_chars(last)[1] > b)
        return completion

    def _example(
        self, enc: Any, spans: list[tuple[int, int]], report: FilterReport
    ) -> dict[str, np.ndarray] | None:
        ids = enc.ids
        input_ids = np.array(ids, dtype=np.int64)
        completion = self._completion_mask(enc, spans, report)
        if self.options.add_bos and (len(ids) == 0 or ids[0] != self.bos_id):
            input_ids = np.concatenate([[self.bos_id], input_ids])
            completion = np.concatenate([[0], completion])
        limit = self.options.max_seq_length
        truncated = len(input_ids) > limit
        if truncated:
            if self.options.truncation == "drop":
                report.dropped["too_long"] += 1
                return None
            input_ids, completion = input_ids[:limit], completion[:limit]
            report.truncated += 1
        # Position 0 is never predicted, so a completion there would be no completion at all.
        if not completion[1:].any():
            reason = "no_completion_after_truncation" if truncated else "no_completion"
            report.dropped[reason] += 1
            return None
        return make_example(input_ids, completion)


def make_example(input_ids: np.ndarray, completion: np.ndarray) -> dict[str, np.ndarray]:
    """The tokenized-example contract: ``input_ids``, ``labels``, ``prompt_mask``,
    ``completion_mask``."""
    completion = completion.astype(np.int64)
    return {
        "input_ids": input_ids,
        "labels": np.where(completion == 1, input_ids, IGNORE_INDEX),
        "prompt_mask": 1 - completion,
        "completion_mask": completion,
    }


def tokenize_chat(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None = None,
    max_seq_length: int = 1 << 30,
    where: str = "example",
) -> dict[str, np.ndarray]:
    """One conversation → one example (refuses instead of dropping; for tests and tools)."""
    report = FilterReport()
    encoder = ChatEncoder(tokenizer, template, TokenizeOptions(max_seq_length, role_fix="error"))
    examples, _ = encoder.encode([messages], where, report)
    if not examples:
        raise DataError(f"{where}: dropped ({dict(report.dropped)})")
    return examples[0]


def reference_masks(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]] | None:
    """Token ids and completion mask by incremental *token-id* rendering of the tokenizer's
    template: slow, used by tests as the ground truth for prefix-stable templates (the
    registry's Jinja forms). ``None`` when the token ids are not prefix-stable (a subword merged
    across a turn boundary)."""

    def ids(msgs: Sequence[Mapping[str, str]], generation: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            list(msgs), tokenize=False, add_generation_prompt=generation
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(messages, False)
    completion = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = ids(messages[:i], True), ids(messages[: i + 1], False)
        if end[: len(start)] != start or full[: len(end)] != end:
            return None
        for pos in range(len(start), len(end)):
            completion[pos] = 1
    return full, completion
