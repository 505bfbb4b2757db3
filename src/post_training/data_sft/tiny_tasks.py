"""Deterministic toy instruction dataset with exactly checkable answers.

The dataset is the embedded default for SFT smoke runs: it is small, generated from a seed,
committed under ``post_training/assets/tiny-tasks`` and learnable by a tiny model on CPU.

Four tasks, each with a single correct answer:

* ``add``: ``"add 123+45"`` -> ``"168"``
* ``reverse``: ``"reverse hello"`` -> ``"olleh"``
* ``sort``: ``"sort 3914"`` -> ``"1349"``
* ``count``: ``"count a in abaca"`` -> ``"3"``

Every example is a chat (``messages``) whose final message is the graded assistant answer.
Some examples start with a system prompt, some have an extra user/assistant exchange of a
different task before the graded turn. Every character of every message is in ``ALPHABET``,
which the char-level tokenizer of the tiny model (``post_training.modeling.tiny_model``) covers.

Regenerate the committed files with::

    python -m post_training.data_sft.tiny_tasks
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --- Difficulty knobs -------------------------------------------------------------------------

ADD_MAX_DIGITS = 2
"""Maximum number of digits of each ``add`` operand (the digit count is drawn uniformly)."""

REVERSE_MIN_LEN = 3
"""Minimum length of the word to reverse."""

REVERSE_MAX_LEN = 5
"""Maximum length of the word to reverse."""

REVERSE_ALPHABET = string.ascii_lowercase
"""Letters the words to reverse are drawn from."""

SORT_MIN_LEN = 3
"""Minimum number of digits to sort."""

SORT_MAX_LEN = 6
"""Maximum number of digits to sort."""

COUNT_MIN_LEN = 3
"""Minimum length of the word in which a letter is counted."""

COUNT_MAX_LEN = 6
"""Maximum length of the word in which a letter is counted."""

COUNT_ALPHABET = "abc"
"""Small alphabet for ``count`` words, so that counts are rarely all zero or one."""

# --- Chat shape knobs -------------------------------------------------------------------------

SYSTEM_PROMPT_PROB = 0.15
"""Probability that an example starts with a system prompt."""

MULTI_TURN_PROB = 0.15
"""Probability that an example has a first user/assistant exchange before the graded turn."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a careful calculator.",
    "You are a helpful assistant.",
    "Answer with the result only.",
    "Be brief and exact.",
    "You solve small puzzles, step by step: no chat.",
)
"""Short fixed system prompts, drawn uniformly."""

# --- Alphabet and defaults --------------------------------------------------------------------

ALPHABET: str = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +-.,?:'"
"""Every character that can appear in any message content."""

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-tasks"
"""Where the committed splits live."""

# Split sizes of the committed files.
N_TRAIN = 8000
N_EVAL = 400

SPLITS: tuple[str, ...] = ("train", "eval")
"""Names of the generated splits (and of their ``<name>.jsonl`` files)."""

_MAX_ATTEMPTS_FACTOR = 50

Example = dict[str, Any]
TaskFn = Callable[[random.Random], tuple[str, str]]


# --- Tasks ------------------------------------------------------------------------------------


def _random_number(rng: random.Random, max_digits: int) -> int:
    """Draws a non-negative integer whose digit count is uniform in ``1..max_digits``."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def task_add(rng: random.Random) -> tuple[str, str]:
    """``"add 123+45"`` -> ``"168"``."""
    a = _random_number(rng, ADD_MAX_DIGITS)
    b = _random_number(rng, ADD_MAX_DIGITS)
    return f"add {a}+{b}", str(a + b)


def task_reverse(rng: random.Random) -> tuple[str, str]:
    """``"reverse hello"`` -> ``"olleh"``."""
    length = rng.randint(REVERSE_MIN_LEN, REVERSE_MAX_LEN)
    word = "".join(rng.choice(REVERSE_ALPHABET) for _ in range(length))
    return f"reverse {word}", word[::-1]


def task_sort(rng: random.Random) -> tuple[str, str]:
    """``"sort 3914"`` -> ``"1349"``."""
    length = rng.randint(SORT_MIN_LEN, SORT_MAX_LEN)
    digits = "".join(rng.choice(string.digits) for _ in range(length))
    return f"sort {digits}", "".join(sorted(digits))


def task_count(rng: random.Random) -> tuple[str, str]:
    """``"count a in abaca"`` -> ``"3"``."""
    length = rng.randint(COUNT_MIN_LEN, COUNT_MAX_LEN)
    word = "".join(rng.choice(COUNT_ALPHABET) for _ in range(length))
    letter = rng.choice(COUNT_ALPHABET)
    return f"count {letter} in {word}", str(word.count(letter))


TASKS: dict[str, TaskFn] = {
    "add": task_add,
    "reverse": task_reverse,
    "sort": task_sort,
    "count": task_count,
}
"""Task name -> generator of ``(prompt, answer)``; the order fixes the round-robin."""


# --- Grading ----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalises a model answer or a reference answer for comparison (strips whitespace)."""
    return text.strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` matches ``answer`` exactly after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --- Examples and splits ----------------------------------------------------------------------


def make_example(rng: random.Random, task: str) -> Example:
    """Builds one chat example whose graded (final) turn is of ``task``."""
    messages: list[dict[str, str]] = []
    if rng.random() < SYSTEM_PROMPT_PROB:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < MULTI_TURN_PROB:
        first_task = rng.choice([name for name in TASKS if name != task])
        first_prompt, first_answer = TASKS[first_task](rng)
        messages.append({"role": "user", "content": first_prompt})
        messages.append({"role": "assistant", "content": first_answer})
    prompt, answer = TASKS[task](rng)
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "task": task, "answer": answer}


def final_prompt(example: Example) -> str:
    """The user prompt of the graded turn (the message before the final assistant answer)."""
    return str(example["messages"][-2]["content"])


def user_prompts(example: Example) -> list[str]:
    """All user prompts of an example."""
    return [str(m["content"]) for m in example["messages"] if m["role"] == "user"]


def _generate_split(rng: random.Random, n: int, forbidden: set[str]) -> list[Example]:
    """Generates ``n`` examples, tasks round-robin, with unique graded prompts.

    An example is rejected when its graded prompt was already used in this split, or when any
    of its user prompts is in ``forbidden`` (the graded prompts of another split).
    """
    names = list(TASKS)
    examples: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_FACTOR * (n + 1):
            raise RuntimeError(f"could not draw {n} unique examples; loosen the difficulty knobs")
        example = make_example(rng, names[len(examples) % len(names)])
        prompt = final_prompt(example)
        if prompt in seen or forbidden.intersection(user_prompts(example)):
            continue
        seen.add(prompt)
        examples.append(example)
    rng.shuffle(examples)
    return examples


def generate_splits(
    seed: int = 0, n_train: int = N_TRAIN, n_eval: int = N_EVAL
) -> dict[str, list[Example]]:
    """Generates the ``train`` and ``eval`` splits deterministically from ``seed``.

    Tasks are balanced (round-robin over ``TASKS``). Graded prompts are unique within a split,
    and no eval graded prompt appears as any user prompt of a train example. The eval split only
    depends on ``seed`` and ``n_eval``.
    """
    root = random.Random(seed)
    eval_rng = random.Random(root.getrandbits(64))
    train_rng = random.Random(root.getrandbits(64))
    eval_examples = _generate_split(eval_rng, n_eval, forbidden=set())
    eval_prompts = {final_prompt(example) for example in eval_examples}
    train_examples = _generate_split(train_rng, n_train, forbidden=eval_prompts)
    return {"train": train_examples, "eval": eval_examples}


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    """Writes one JSON object per line (sorted keys, UTF-8, ``\\n`` line ends)."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    """Reads a JSONL file written by :func:`write_jsonl`."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    seed: int = 0,
    n_train: int = N_TRAIN,
    n_eval: int = N_EVAL,
) -> dict[str, Path]:
    """Generates the splits and writes ``train.jsonl`` and ``eval.jsonl`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = generate_splits(seed=seed, n_train=n_train, n_eval=n_eval)
    paths: dict[str, Path] = {}
    for name in SPLITS:
        paths[name] = output_dir / f"{name}.jsonl"
        write_jsonl(paths[name], splits[name])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: writes the splits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-eval", type=int, default=N_EVAL)
    args = parser.parse_args(argv)
    paths = write_splits(args.output_dir, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
