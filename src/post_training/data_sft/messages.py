"""Read chat-format SFT examples (``{"messages": [...]}``) with row-precise validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from post_training.data_sft.file_formats import decode_utf8, json_error
from post_training.errors import DataError

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any, where: str, field: str = "messages") -> None:
    """Raise :class:`DataError` unless ``messages`` is a well-formed chat with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        at = f"{where}: field '{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}' must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{at}.role' must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{at}.content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{field}' has no assistant message to train on")


def read_jsonl_messages(path: str | Path, messages_field: str = "messages") -> list[dict]:
    """All rows of a ``.jsonl`` file; errors name ``file:line`` and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[dict] = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            line = decode_utf8(raw, path, lineno)
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({json_error(err)})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: each line must be a JSON object")
            if messages_field not in row:
                raise DataError(f"{where}: missing field '{messages_field}'")
            validate_messages(row[messages_field], where, messages_field)
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows
