"""The ``tiny_tasks`` lm-eval task: the embedded tiny-tasks eval split, prompted and scored
exactly as ``python -m post_training.evaluate`` scores it (:mod:`post_training.exact_match`).

lm-eval's stock prompt builder puts ``doc_to_text`` into a single user turn (after an optional
system prompt and few-shot turns). A tiny-tasks example is a whole conversation: an optional
system prompt, sometimes an earlier user/assistant exchange, then the graded user turn. So this
task renders the conversation itself: every message up to the last assistant turn, through the
model's chat template with the generation prompt (``simple_evaluate(apply_chat_template=True)``
hands the template to :meth:`TinyTasks.fewshot_context`). The prediction is the greedy
continuation, stopped at the tokenizer's EOS only (``until: []``; lm-eval adds the EOS), and
matches when it equals the ``answer`` field after stripping whitespace
(:func:`post_training.data_sft.tiny_tasks.is_correct`).

Few-shot examples (``num_fewshot``) are conversations of the train split, as earlier turns (no
system prompt of their own). Without a chat template the messages are joined as plain text
(user, target delimiter, answer, few-shot delimiter), which no checkpoint of ours was trained on.

lm-eval loads this file by path (``!function utils.X`` in ``tiny_tasks.yaml``); it is no module
of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask
from lm_eval.api.utils import Message, maybe_delimit, multiturn_to_singleturn

from post_training.data_sft.tiny_tasks import is_correct, read_jsonl

DATA_DIR = Path(__file__).resolve().parents[1]
"""``assets/tiny-tasks``: ``train.jsonl`` and ``eval.jsonl``."""


def load_splits(**_: Any) -> datasets.DatasetDict:
    """The committed splits, in file order (lm-eval passes the task metadata as keywords)."""
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(read_jsonl(DATA_DIR / f"{name}.jsonl"))
            for name in ("train", "eval")
        }
    )


def prompt_messages(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to (without) the last assistant turn: what the model answers."""
    messages = doc["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


def expected(doc: dict[str, Any]) -> str:
    """The ``answer`` field, else the content of the last assistant turn."""
    if doc.get("answer") is not None:
        return str(doc["answer"])
    return next(m["content"] for m in reversed(doc["messages"]) if m["role"] == "assistant")


def doc_to_text(doc: dict[str, Any]) -> str:
    """The graded user prompt (what lm-eval logs as the document's text)."""
    return prompt_messages(doc)[-1]["content"]


def doc_to_target(doc: dict[str, Any]) -> str:
    return expected(doc)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after stripping whitespace, as ``post_training.evaluate``."""
    return {"exact_match": float(is_correct(results[0], expected(doc)))}


class TinyTasks(ConfigurableTask):
    """A generate-until task whose prompt is the document's own conversation."""

    def __init__(self, config: dict[str, Any] | None = None, **_: Any) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def fewshot_context(
        self,
        doc: dict[str, Any],
        num_fewshot: int,
        system_instruction: str | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        chat_template: Callable[..., str] | None = None,
        gen_prefix: str | None = None,
    ) -> str:
        """``doc``'s conversation (after ``system_instruction`` and ``num_fewshot`` train
        conversations), rendered with ``chat_template`` when lm-eval applies one."""
        turns = prompt_messages(doc)
        system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
        system = maybe_delimit(system_instruction, system, self.config.fewshot_delimiter)
        messages = [Message("system", system, self.config.fewshot_delimiter)] if system else []
        for shot in self.sampler.sample(n=num_fewshot) if num_fewshot > 0 else []:
            shot_turns = [m for m in prompt_messages(shot) if m["role"] != "system"]
            shot_turns.append({"role": "assistant", "content": expected(shot)})
            messages += [self._message(m) for m in shot_turns]
        messages += [self._message(m) for m in turns[:-1]]
        messages.append(Message("user", turns[-1]["content"]))  # the graded turn: no delimiter
        if apply_chat_template and chat_template is not None:
            if fewshot_as_multiturn:
                chat = [m.to_dict() for m in messages]
            else:
                chat = multiturn_to_singleturn(messages)
            return chat_template(chat, add_generation_prompt=True)
        return "".join(m.to_text() for m in messages)

    def _message(self, message: dict[str, str]) -> Message:
        """An earlier turn; its plain-text delimiter as lm-eval's own few-shot turns."""
        if message["role"] == "assistant":
            return Message("assistant", message["content"], self.config.fewshot_delimiter)
        return Message(message["role"], message["content"], self.config.target_delimiter)
