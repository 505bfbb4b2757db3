"""Registered transforms: one raw row in, one canonical ``{"messages": [...]}`` row out.

A transform is a function ``(row: dict, **args) -> dict`` whose result holds ``messages``: a
list of ``{"role", "content"}`` with roles ``system`` / ``user`` / ``assistant`` and at least
one assistant turn, or, for plain text trained on every token, exactly one
``{"role": "text", "content": ...}`` message. Other keys of the result are ignored unless a
source lists them in ``keep_columns``.

Built-ins: ``messages`` (OpenAI chat format), ``sharegpt``, ``alpaca`` (Alpaca or Dolly
columns), ``prompt_completion`` (plain or TRL's conversational form), ``qa`` and ``text``. Add
your own in any importable module::

    from post_training.data_sft.transforms import register_transform, string

    @register_transform("my_format")
    def my_format(row, system_prompt=None):
        # string() raises FieldError for a missing, null or non-string field; it is reported
        # with the file, the line or row, and the fields the row has.
        return {"messages": [{"role": "user", "content": string(row, "q")},
                             {"role": "assistant", "content": string(row, "a")}]}

The rows of a source share one schema, so a key that some rows lack reads as ``None`` in them.
Name the transform in a source as ``transform: my_format`` with ``transform_module:
my_pkg.my_mod`` (imported first), or skip the decorator: ``transform: my_pkg.my_mod:my_format``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
from datasets import Dataset
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable

from post_training.data_sft.messages import ROLES
from post_training.errors import DataError

TransformFn = Callable[..., Mapping[str, Any]]
Locate = Callable[[int], str]

TEXT_ROLE = "text"
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
"""Arrow type of the canonical ``messages`` column."""

TRANSFORMS: dict[str, TransformFn] = {}
"""Registered transforms by name."""

_BATCH_ROWS = 8192
_ROLES = frozenset((*ROLES, TEXT_ROLE))


class FieldError(Exception):
    """Raised by a transform for one row: ``field`` is missing or wrong; ``problem`` says how."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


def register_in(
    registry: dict[str, Any], name: str, kind: str = "transform"
) -> Callable[[Any], Any]:
    """Decorator registering ``fn`` as ``name`` in ``registry`` (re-registering the same
    function is allowed, so a module may be imported twice; another function under a taken name
    is not). ``kind`` names the registry in errors."""

    def decorator(fn: Any) -> Any:
        previous = registry.get(name)
        if previous is not None and _qualified(previous) != _qualified(fn):
            raise ValueError(f"{kind} '{name}' is already registered by {_qualified(previous)}")
        registry[name] = fn
        return fn

    return decorator


def register_transform(name: str) -> Callable[[TransformFn], TransformFn]:
    """Decorator registering ``fn`` as transform ``name`` (see :func:`register_in`)."""
    return register_in(TRANSFORMS, name)


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def import_transform_module(module: str) -> None:
    """Import ``module`` so that its ``@register_transform`` functions register."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise DataError(f"transform_module '{module}' cannot be imported: {err}") from err


def get_transform(
    name: str, registry: Mapping[str, Any] | None = None, kind: str = "transform"
) -> TransformFn:
    """A transform registered in ``registry`` (default: the SFT :data:`TRANSFORMS`), or
    ``"package.module:function"`` imported from its module; ``kind`` names it in errors."""
    registry = TRANSFORMS if registry is None else registry
    if name in registry:
        return registry[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        import_transform_module(module)
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise DataError(f"{kind} '{name}': module '{module}' has no function '{attr}'")
        return fn
    raise DataError(
        f"unknown {kind} '{name}'; available: {', '.join(sorted(registry))} "
        "(or 'package.module:function', or register one and name its module in transform_module)"
    )


# --- Helpers for transforms -------------------------------------------------------------------


def has(row: Mapping[str, Any], field: str) -> bool:
    """Whether ``row`` holds a non-null ``field`` (the rows of a source share one schema, so a
    key that some rows lack reads as ``None`` in them)."""
    return row.get(field) is not None


def fields_present(row: Mapping[str, Any], error: FieldError | None = None) -> str:
    """``fields present: a, b`` (the non-null fields of ``row``), for row errors; when ``error``
    is a missing field that is not even a key of the row, it adds that the data has no such
    column (no row has it: e.g. a CSV header or a Parquet schema without it)."""
    present = ", ".join(k for k, v in row.items() if v is not None) or "none"
    note = ""
    if error is not None and error.problem.startswith("missing field") and error.field not in row:
        note = f"; the data has no column '{error.field}'"
    return f"fields present: {present}{note}"


def required(row: Mapping[str, Any], field: str) -> Any:
    """``row[field]``; a missing or null field raises :class:`FieldError`."""
    value = row.get(field)
    if value is None:
        raise FieldError(field, "missing field")
    return value


def string(row: Mapping[str, Any], field: str) -> str:
    """``row[field]`` that must be a string."""
    value = required(row, field)
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}")
    return value


def chat(
    value: Any,
    field: str,
    role_key: str = "role",
    content_key: str = "content",
    role_map: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """A list of messages read from ``value`` (errors name ``field[i].key``); roles mapped by
    ``role_map`` (original -> canonical) and checked against the canonical roles."""
    if not isinstance(value, list) or not value:
        raise FieldError(field, "must be a non-empty list of messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if type(message) is not dict and not isinstance(message, Mapping):
            raise FieldError(f"{field}[{i}]", f"must be an object, got {type(message).__name__}")
        raw_role = message.get(role_key)
        role = role_map.get(raw_role, raw_role) if role_map and type(raw_role) is str else raw_role
        if type(role) is not str or role not in _ROLES:
            known = sorted({*ROLES, *(role_map or {})})
            raise FieldError(
                f"{field}[{i}].{role_key}", f"unknown role {raw_role!r}; known: {known}"
            )
        out.append(
            {
                "role": role,
                "content": text_content(message.get(content_key), f"{field}[{i}].{content_key}"),
            }
        )
    return out


TEXT_BLOCK_KEYS = ("text", "value")
"""Keys holding the text of a ``{"type": "text", ...}`` content block, tried in order."""


def text_content(content: Any, field: str) -> str:
    """A message's text: a string as is, or a list of content blocks (OpenAI / Hugging Face
    style, ``[{"type": "text", "text" | "value": ...}]``) joined without a separator, as chat
    templates concatenate them. Any other block type (``image``, ``image_url``, ...) raises
    :class:`FieldError` naming the block and its type: this is text-only training."""
    if type(content) is str:
        return content
    if not isinstance(content, list) or not content:
        kind = "an empty list" if isinstance(content, list) else type(content).__name__
        raise FieldError(field, f"must be a string or a list of text blocks, got {kind}")
    parts = []
    for j, block in enumerate(content):
        at = f"{field}[{j}]"
        if not isinstance(block, Mapping):
            raise FieldError(at, f"a content block must be an object, got {type(block).__name__}")
        kind = block.get("type")
        if kind != "text":
            raise FieldError(
                at, f"a content block of type {kind!r}; only 'text' blocks can be trained on"
            )
        text = next((block[k] for k in TEXT_BLOCK_KEYS if type(block.get(k)) is str), None)
        if text is None:
            raise FieldError(at, f"a text block needs a string under one of {TEXT_BLOCK_KEYS}")
        parts.append(text)
    return "".join(parts)


def validate_canonical(messages: Any) -> list[dict[str, str]]:
    """``messages`` with only ``role`` and ``content`` kept; :class:`FieldError` unless it is a
    canonical chat (with an assistant turn) or a single plain-text message."""
    out = chat(messages, "messages")
    roles = [m["role"] for m in out]
    if TEXT_ROLE in roles:
        if len(roles) != 1:
            raise FieldError("messages", "a 'text' message must be the only message of its row")
    elif "assistant" not in roles:
        raise FieldError("messages", "no assistant message to train on")
    return out


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict]:
    """``messages`` after a system message of ``system_prompt`` (unless empty or one is first)."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def system_of(row: Mapping[str, Any], field: str | None) -> str | None:
    """The optional top-level system prompt ``row[field]`` (a string or null)."""
    system = row.get(field) if field else None
    if system is not None and not isinstance(system, str):
        raise FieldError(str(field), f"must be a string, got {type(system).__name__}")
    return system


# --- Built-in transforms ----------------------------------------------------------------------


@register_transform("messages")
def messages_transform(
    row: Mapping[str, Any], field: str = "messages", role_map: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """OpenAI chat format: ``row[field]`` is a list of ``{"role", "content"}``; extra keys of a
    message are dropped, roles may be renamed with ``role_map`` (e.g. ``{developer: system}``)."""
    return {"messages": chat(required(row, field), field, role_map=role_map)}


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


@register_transform("sharegpt")
def sharegpt(
    row: Mapping[str, Any],
    field: str = "conversations",
    role_key: str = "from",
    content_key: str = "value",
    role_map: Mapping[str, str] | None = None,
    system_field: str | None = None,
) -> dict[str, Any]:
    """ShareGPT: ``row[field]`` is a list of ``{"from", "value"}``; ``from`` is mapped by
    :data:`SHAREGPT_ROLES` updated with ``role_map``; ``system_field`` names an optional
    top-level system prompt."""
    roles = {**SHAREGPT_ROLES, **(role_map or {})}
    messages = chat(required(row, field), field, role_key, content_key, roles)
    return {"messages": with_system(messages, system_of(row, system_field))}


ALPACA_FIELDS = (("input", "output"), ("context", "response"))
"""(input, output) field pairs :func:`alpaca` looks for, in order, when not told which to use:
Alpaca's ``input`` / ``output`` and Dolly's ``context`` / ``response`` (the pair whose output
field the row has; else the first)."""


@register_transform("alpaca")
def alpaca(
    row: Mapping[str, Any],
    instruction_field: str = "instruction",
    input_field: str | None = None,
    output_field: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Alpaca (``instruction`` / ``input`` / ``output``) or Dolly (``instruction`` / ``context``
    / ``response``), recognised by :data:`ALPACA_FIELDS` unless the fields are given: user =
    instruction, plus a blank line and the input (context) when it is non-empty; assistant =
    output (response); an optional constant ``system_prompt`` first."""
    if input_field is None or output_field is None:
        pair = next((p for p in ALPACA_FIELDS if has(row, p[1])), ALPACA_FIELDS[0])
        input_field = input_field or pair[0]
        output_field = output_field or pair[1]
    user = string(row, instruction_field)
    extra = row.get(input_field)
    if extra is not None and not isinstance(extra, str):
        raise FieldError(input_field, f"must be a string, got {type(extra).__name__}")
    if extra and extra.strip():
        user = f"{user}\n\n{extra}"
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": string(row, output_field)},
    ]
    return {"messages": with_system(messages, system_prompt)}


@register_transform("prompt_completion")
def prompt_completion(
    row: Mapping[str, Any],
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Prompt / completion: each a string (one user / one assistant message) or, as in TRL's
    conversational format, a list of messages (the completion's all assistant)."""
    prompt = required(row, prompt_field)
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = chat(prompt, prompt_field)
    completion = required(row, completion_field)
    if isinstance(completion, str):
        completion_messages = [{"role": "assistant", "content": completion}]
    else:
        completion_messages = chat(completion, completion_field)
        for i, message in enumerate(completion_messages):
            if message["role"] != "assistant":
                raise FieldError(
                    f"{completion_field}[{i}].role",
                    f"completion messages must be 'assistant', got {message['role']!r}",
                )
    return {"messages": with_system(prompt_messages + completion_messages, system_prompt)}


QA_FIELDS = (
    ("question", "answer"),
    ("input", "output"),
    ("query", "response"),
    ("prompt", "answer"),
)
"""Field pairs :func:`qa` looks for, in order, when not told which to use."""


@register_transform("qa")
def qa(
    row: Mapping[str, Any],
    question_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Question / answer: one user and one assistant message. A field not given is taken from
    the first pair of :data:`QA_FIELDS` whose two fields the row holds (non-null); when the row
    holds only one field of a pair, the error names the other one, the missing one."""
    if question_field is None or answer_field is None:
        pairs = list(dict.fromkeys((question_field or q, answer_field or a) for q, a in QA_FIELDS))
        pair = next((p for p in pairs if has(row, p[0]) and has(row, p[1])), None)
        if pair is None:
            half = next((p for p in pairs if has(row, p[0]) or has(row, p[1])), None)
            if half is None:
                looked = " or ".join(f"{q}/{a}" for q, a in pairs)
                raise FieldError(
                    question_field or "question", f"missing field (looked for {looked})"
                )
            missing, other = (half[1], half[0]) if has(row, half[0]) else half
            raise FieldError(missing, f"missing field (paired with '{other}')")
        question_field, answer_field = pair
    messages = [
        {"role": "user", "content": string(row, question_field)},
        {"role": "assistant", "content": string(row, answer_field)},
    ]
    return {"messages": with_system(messages, system_prompt)}


@register_transform("text")
def text(row: Mapping[str, Any], field: str = "text") -> dict[str, Any]:
    """Plain text, loss on every token: one ``{"role": "text"}`` message."""
    return {"messages": [{"role": TEXT_ROLE, "content": string(row, field)}]}


# --- Applying a transform to a dataset --------------------------------------------------------


def _locator(where: str | Locate) -> Locate:
    if callable(where):
        return where
    return lambda index: f"{where} row {index + 1}"


def apply_transform(
    ds: Dataset,
    name: str = "messages",
    args: Mapping[str, Any] | None = None,
    where: str | Locate = "dataset",
    keep_columns: Sequence[str] = (),
    source: str | None = None,
) -> Dataset:
    """Run transform ``name`` with ``args`` over every row of ``ds`` and validate the result.

    Returns a dataset with ``messages``, the ``keep_columns`` (taken from the transform's result
    when it has the key, else from the raw row, else null) and, when ``source`` is given, a
    ``source`` column holding it (unless ``source`` is itself kept from the raw rows). ``where``
    is a label (errors then name its 1-based ``row N``) or a function from row index to location
    used in errors, which name the row, the field and the fields the row has.
    """
    fn = get_transform(name)
    args = dict(args or {})
    locate = _locator(where)
    keep = list(dict.fromkeys(keep_columns))
    messages: list[list[dict[str, str]]] = []
    kept: dict[str, list[Any]] = {column: [] for column in keep}
    index = 0
    for batch in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            try:
                out = fn(row, **args)
                if not isinstance(out, Mapping) or "messages" not in out:
                    raise FieldError("messages", f"transform '{name}' returned no 'messages'")
                chat_messages = validate_canonical(out["messages"])
            except FieldError as err:
                raise DataError(
                    f"{locate(index)}: {err} (transform '{name}'; {fields_present(row, err)})"
                ) from None
            except DataError:
                raise
            except Exception as err:
                raise DataError(
                    f"{locate(index)}: transform '{name}' failed with {type(err).__name__}: {err} "
                    f"({fields_present(row)})"
                ) from err
            messages.append(chat_messages)
            for column in keep:
                kept[column].append(out[column] if column in out else row.get(column))
            index += 1
    columns: dict[str, pa.Array] = {"messages": pa.array(messages, MESSAGE_TYPE)}
    if source is not None and "source" not in keep:
        columns["source"] = pa.array([source] * len(messages), pa.string())
    for column, values in kept.items():
        if column == "source" and source is not None:
            values = [source if v is None else v for v in values]
        try:
            columns[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            raise DataError(
                f"{locate(0)}: kept column '{column}' holds values of incompatible types: {err}"
            ) from None
    return Dataset(InMemoryTable(pa.table(columns)), fingerprint=generate_random_fingerprint())
