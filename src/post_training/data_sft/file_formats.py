"""Read local data files (JSON lines, JSON, Parquet, CSV, text) into Arrow tables.

Every reader returns a :class:`FileTable`: the rows as a ``pyarrow.Table`` and a ``locate``
function from a row index to a human location, 1-based (``data.jsonl:12``, ``data.json item 3``,
``data.parquet row 5``), used by error messages downstream. Malformed input raises
:class:`DataError` naming the file and the line (or item, or record). Text files must be UTF-8:
undecodable bytes are reported with the 1-based line and column of the first one
(:func:`decode_utf8`).

* ``.jsonl``: pyarrow's multi-threaded JSON reader is the fast path. If it fails (malformed line,
  a field whose type changes between lines) or infers a timestamp from a string (it does that
  for ISO dates, which would change the text), the file is re-read line by line with ``json``:
  the first malformed line is reported with its 1-based number, else the rows are converted
  column by column so that a field of incompatible types is named. Arrow accepts bytes that are
  not UTF-8, so the fast path's strings are validated too (a failure takes the exact path).
* ``.json``: a list of objects, an object whose ``json_field`` key holds that list, or JSON lines.
* ``.csv``: a header row, then one row per record; every cell is read as a string (empty cell:
  ``""``, missing trailing cell: null), so numbers-looking text is never converted.
* ``.txt``: ``text_split`` = ``file`` (default: one row per file, a document), ``line`` (one row
  per non-blank line) or ``paragraph`` (blocks separated by blank lines, stripped); the column is
  ``text``.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from post_training.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "csv", "text")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
TEXT_SPLITS = ("file", "line", "paragraph")
_JSON_BLOCK_SIZE = 16 << 20  # bytes per pyarrow JSON block (type inference looks at one block)

Locate = Callable[[int], str]


@dataclass(frozen=True)
class FileTable:
    """Rows of one or several files, and where each row came from."""

    table: pa.Table
    locate: Locate


def format_of(path: Path) -> str:
    """The format implied by a file's extension; :class:`DataError` when there is none."""
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'; "
            f"use one of {sorted(EXTENSIONS)} or a prefix such as jsonl:{path}"
        )
    return fmt


def read_files(
    paths: Sequence[Path], fmt: str, text_split: str = "file", json_field: str | None = None
) -> FileTable:
    """Rows of ``paths`` (in that order) read as ``fmt``; their schemas are unified."""
    parts = [read_file(p, fmt, text_split=text_split, json_field=json_field) for p in paths]
    if len(parts) == 1:
        return parts[0]
    try:
        table = pa.concat_tables([p.table for p in parts], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(
            f"{paths[0]} and the other matched files have incompatible columns ({err}); "
            "make the files agree or load them as separate sources"
        ) from None
    starts = [0]
    for part in parts[:-1]:
        starts.append(starts[-1] + part.table.num_rows)

    def locate(index: int) -> str:
        k = bisect.bisect_right(starts, index) - 1
        return parts[k].locate(index - starts[k])

    return FileTable(table, locate)


def read_file(
    path: Path, fmt: str, text_split: str = "file", json_field: str | None = None
) -> FileTable:
    """Rows of one file read as ``fmt`` (one of :data:`FORMATS`)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "json":
        return read_json(path, json_field)
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        return FileTable(table, lambda i: f"{path} row {i + 1}")
    if fmt == "csv":
        return read_csv(path)
    if fmt == "text":
        return read_text(path, text_split)
    raise DataError(f"{path}: unknown format '{fmt}'; known formats: {', '.join(FORMATS)}")


# --- UTF-8 ------------------------------------------------------------------------------------


def json_error(err: json.JSONDecodeError) -> str:
    """``Expecting ',' delimiter at column 12``; json's messages that end in "at" already
    expect a position (``Unterminated string starting at column 5``, never "at at")."""
    where = f"column {err.colno}"
    return f"{err.msg} {where}" if err.msg.endswith(" at") else f"{err.msg} at {where}"


def decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """``data`` (the text of ``path`` from line ``first_line`` on) decoded as UTF-8; undecodable
    bytes raise :class:`DataError` naming the 1-based line and column of the first one."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = first_line + data.count(b"\n", 0, err.start)
        column = len(data[line_start : err.start].decode("utf-8")) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "re-encode the file as UTF-8"
        ) from None


# --- JSON lines -------------------------------------------------------------------------------


def _has_timestamp(dtype: pa.DataType) -> bool:
    if pa.types.is_timestamp(dtype):
        return True
    if pa.types.is_struct(dtype):
        return any(_has_timestamp(dtype.field(i).type) for i in range(dtype.num_fields))
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _has_timestamp(dtype.value_type)
    return False


def _jsonl_locator(path: Path) -> Locate:
    """Row index -> ``path:line`` (blank lines hold no row); the file is scanned on first use."""
    line_numbers: list[int] = []

    def locate(index: int) -> str:
        if not line_numbers:
            with path.open("rb") as handle:
                line_numbers.extend(n for n, line in enumerate(handle, 1) if line.strip())
        return f"{path}:{line_numbers[index]}" if index < len(line_numbers) else f"{path}"

    return locate


def parse_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Objects of a JSON-lines file and their 1-based line numbers, validated line by line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            text = decode_utf8(raw, path, lineno)
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({json_error(err)})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def read_jsonl(path: Path) -> FileTable:
    """A JSON-lines file (fast Arrow path, exact line-by-line fallback; see module docs)."""
    try:
        table = pa_json.read_json(
            path, read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK_SIZE)
        )
        if not any(_has_timestamp(field.type) for field in table.schema):
            table.validate(full=True)  # strings must be UTF-8 (ArrowInvalid otherwise)
            return FileTable(table, _jsonl_locator(path))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        pass
    rows, lines = parse_jsonl(path)

    def locate(index: int) -> str:
        return f"{path}:{lines[index]}"

    return FileTable(rows_to_table(rows, locate, str(path)), locate)


def _kind(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


def find_type_conflict(name: str, values: Sequence[Any]) -> tuple[int, str, str, int, str] | None:
    """First value of column ``name`` whose type (at any nesting depth) differs from the type
    seen first at the same place: ``(row, field path, its type, first row, first type)``."""
    seen: dict[str, tuple[str, int]] = {}

    def walk(value: Any, generic: str, concrete: str, row: int) -> tuple | None:
        if value is None:
            return None
        kind = _kind(value)
        first_kind, first_row = seen.setdefault(generic, (kind, row))
        if first_kind != kind:
            return row, concrete, kind, first_row, first_kind
        if isinstance(value, dict):
            items = ((f"{generic}.{k}", f"{concrete}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            items = ((f"{generic}[]", f"{concrete}[{i}]", v) for i, v in enumerate(value))
        else:
            return None
        for sub_generic, sub_concrete, sub in items:
            found = walk(sub, sub_generic, sub_concrete, row)
            if found:
                return found
        return None

    for row, value in enumerate(values):
        found = walk(value, name, name, row)
        if found:
            return found
    return None


def rows_to_table(rows: Sequence[dict[str, Any]], locate: Locate, what: str) -> pa.Table:
    """Arrow table of Python rows, built column by column; a field whose type changes between
    rows is reported with the row and the exact field path (``messages[1].content``)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            conflict = find_type_conflict(name, values)
            if conflict is None:
                raise DataError(f"{what}: field '{name}' cannot be stored: {err}") from None
            row, path, kind, first_row, first_kind = conflict
            raise DataError(
                f"{locate(row)}: field '{path}' is a {kind} but a {first_kind} at "
                f"{locate(first_row)}; a field must have one type in all rows"
            ) from None
    return pa.table(columns) if columns else pa.table({"_": pa.nulls(len(rows))}).drop(["_"])


# --- JSON -------------------------------------------------------------------------------------


def read_json(path: Path, json_field: str | None = None) -> FileTable:
    """A JSON file: a list of objects, ``{json_field: [objects]}``, or JSON lines."""
    text = decode_utf8(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl(path)  # one object per line
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({json_error(err)})") from None
    if isinstance(data, dict):
        if json_field is None:
            raise DataError(
                f"{path}: the top level is an object (keys: {', '.join(map(str, data))}); "
                "set json_field to the key that holds the list of rows"
            )
        if json_field not in data:
            raise DataError(
                f"{path}: no key '{json_field}' (json_field) at the top level; "
                f"keys: {', '.join(map(str, data))}"
            )
        data = data[json_field]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(
                f"{path} item {index + 1}: each item must be a JSON object, "
                f"got {type(item).__name__}"
            )

    def locate(index: int) -> str:
        return f"{path} item {index + 1}"

    return FileTable(rows_to_table(data, locate, str(path)), locate)


# --- CSV and text -----------------------------------------------------------------------------


def read_csv(path: Path) -> FileTable:
    """A CSV file with a header row; every cell a string (see module docs)."""
    with io.StringIO(decode_utf8(path.read_bytes(), path), newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{path}: no header row")
        columns: dict[str, list[str | None]] = {name: [] for name in header}
        lines: list[int] = []
        for record in reader:
            if None in record:
                raise DataError(
                    f"{path}:{reader.line_num}: more cells than the {len(header)} header columns"
                )
            for name in header:
                columns[name].append(record[name])
            lines.append(reader.line_num)
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    return FileTable(table, lambda i: f"{path}:{lines[i]}")


def read_text(path: Path, text_split: str = "file") -> FileTable:
    """A text file as rows of ``text``: one per file, per non-blank line, or per paragraph."""
    if text_split not in TEXT_SPLITS:
        raise DataError(f"{path}: text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    text = decode_utf8(path.read_bytes(), path).replace("\r\n", "\n").replace("\r", "\n")
    if text_split == "file":
        return FileTable(pa.table({"text": pa.array([text], pa.string())}), lambda i: str(path))
    if text_split == "line":
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        table = pa.table({"text": pa.array([line for _, line in numbered], pa.string())})
        return FileTable(table, lambda i: f"{path}:{numbered[i][0]}")
    paragraphs = [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]
    table = pa.table({"text": pa.array(paragraphs, pa.string())})
    return FileTable(table, lambda i: f"{path} paragraph {i + 1}")
