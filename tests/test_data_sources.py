"""Loading raw rows from every source form: files, globs, saved datasets, the Hub cache."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from post_training.data_sft.mixing import load_dataset_split
from post_training.data_sft.sources import load, load_source, source_fingerprint, source_name
from post_training.errors import DataError

ROWS = [
    {"question": "add 1+2", "answer": "3"},
    {"question": "sort 321", "answer": "123"},
    {"question": "reverse ab", "answer": "ba"},
]


def write_jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_plain_and_short_form(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ROWS, blank_lines=True)
    assert load_source({"path": str(path)}).to_list() == ROWS
    # The prefix names the format whatever the extension.
    other = tmp_path / "data.log"
    shutil.copy(path, other)
    assert load_source({"path": f"jsonl:{other}"}).to_list() == ROWS


def test_jsonl_rows_are_located_by_line_number_across_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ROWS, blank_lines=True)
    assert load({"path": str(path)}).locate(2) == f"{path}:5"


def test_jsonl_keeps_date_like_strings_as_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "2024-01-01T00:00:00"}])
    assert load_source({"path": str(path)})[0]["text"] == "2024-01-01T00:00:00"


def test_json_list_object_field_and_json_lines(tmp_path: Path) -> None:
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS, indent=2))
    assert load_source({"path": str(as_list)}).to_list() == ROWS
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert load_source({"path": f"json:{nested}", "json_field": "data"}).to_list() == ROWS
    with pytest.raises(DataError, match="set json_field"):
        load_source({"path": str(nested)})
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_source({"path": str(lines)}).to_list() == ROWS


def test_parquet_plain_and_short_form(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_source({"path": str(path)}).to_list() == ROWS
    assert load_source({"path": f"parquet:{path}"}).to_list() == ROWS


def test_csv_cells_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('question,answer\n"add 1,2",007\nempty,\n')
    rows = load_source({"path": f"csv:{path}"}).to_list()
    assert rows == [{"question": "add 1,2", "answer": "007"}, {"question": "empty", "answer": ""}]
    assert load_source({"path": str(path)}).to_list() == rows


def test_text_is_one_document_per_file_unless_split(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    body = "First para\nstill first.\n\n  \nSecond para.\n"
    path.write_text(body)
    assert load_source({"path": str(path)})["text"] == [body]
    assert load_source({"path": f"text:{path}", "text_split": "line"})["text"] == [
        "First para",
        "still first.",
        "Second para.",
    ]
    assert load_source({"path": str(path), "text_split": "paragraph"})["text"] == [
        "First para\nstill first.",
        "Second para.",
    ]


def test_glob_reads_matched_files_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "part-b.jsonl", ROWS[2:])
    write_jsonl(tmp_path / "part-a.jsonl", ROWS[:2])
    (tmp_path / "notes.txt").write_text("not matched")
    loaded = load({"path": str(tmp_path / "part-*.jsonl")})
    assert loaded.dataset.to_list() == ROWS
    assert loaded.locate(2) == f"{tmp_path / 'part-b.jsonl'}:1"
    with pytest.raises(DataError, match="no file matches"):
        load_source({"path": str(tmp_path / "nothing-*.jsonl")})


def test_saved_dataset_and_dataset_dict_splits(tmp_path: Path) -> None:
    single = tmp_path / "single"
    Dataset.from_list(ROWS).save_to_disk(str(single))
    assert load_source({"path": str(single)}).to_list() == ROWS
    assert load_source({"path": f"local:{single}"}).to_list() == ROWS
    both = tmp_path / "both"
    DatasetDict(
        {"train": Dataset.from_list(ROWS[:2]), "eval": Dataset.from_list(ROWS[2:])}
    ).save_to_disk(str(both))
    assert load_source({"path": f"local:{both}"}).to_list() == ROWS[:2]
    assert load_source({"path": str(both), "split": "eval"}).to_list() == ROWS[2:]
    with pytest.raises(DataError, match="no split 'test'; splits: train, eval"):
        load_source({"path": str(both), "split": "test"})


def test_bad_paths_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"not a dataset saved with save_to_disk.*glob"):
        load_source({"path": str(tmp_path / "folder")})
    for missing in (str(tmp_path / "missing.jsonl"), "no-such-dir/train.jsonl"):
        with pytest.raises(DataError, match="is no file, directory, glob or Hub id"):
            load_source({"path": missing})
    (tmp_path / "data.xyz").write_text("{}")
    with pytest.raises(DataError, match=r"cannot tell the format.*jsonl:"):
        load_source({"path": str(tmp_path / "data.xyz")})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_source({"path": str(empty)})


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"a": 1}', "", '{"a": 2'], "bad.jsonl:3: invalid JSON (Expecting ',' delimiter"),
        (['{"a": 1}', "[1, 2]"], "bad.jsonl:2: each line must be a JSON object"),
        (['{"a": 1}', '{"a": "x"}'], "bad.jsonl:2: field 'a' is a str but a number at "),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_source({"path": str(path)}, where="dataset.train")
    assert message in str(err.value)
    assert str(err.value).startswith("dataset.train: ")


def test_malformed_line_found_in_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(20000)]
    lines[15000] = '{"text": "unterminated}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl:15001: invalid JSON"):
        load_source({"path": str(path)})


def test_malformed_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n')
    with pytest.raises(DataError, match=r"bad.json:3: invalid JSON"):
        load_source({"path": str(path)})


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "bad.jsonl",
            b'{"a": "x"}\n\n{"a": "\xc3\xa9\xff"}\n',
            "bad.jsonl:3: not UTF-8 text (byte 0xff at column 9)",
        ),
        (
            "bad.json",
            b'[\n  {"a": "x"},\n  {"a": "\xff"}\n]\n',
            "bad.json:3: not UTF-8 text (byte 0xff at column 10)",
        ),
        (
            "bad.csv",
            b"question,answer\nq,a\nq\xff,a\n",
            "bad.csv:3: not UTF-8 text (byte 0xff at column 2)",
        ),
        ("bad.txt", b"fine\nnot \xfe fine\n", "bad.txt:2: not UTF-8 text (byte 0xfe at column 5)"),
    ],
)
def test_bytes_that_are_not_utf8_name_file_line_and_column(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_source({"path": str(path)}, where="dataset.train")
    assert str(err.value) == f"dataset.train: {tmp_path}/{message}; re-encode the file as UTF-8"


def test_bytes_that_are_not_utf8_in_a_mixture_source(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "\xff"}\n')
    spec = {
        "sources": [{"path": str(good), "transform": "qa"}, {"path": str(bad), "transform": "qa"}]
    }
    with pytest.raises(DataError, match=rf"{bad}:1: not UTF-8 text \(byte 0xff at column 30\)"):
        load_dataset_split(spec, where="dataset.train")


def test_row_locations_are_one_based_in_every_format(tmp_path: Path) -> None:
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    assert load({"path": str(parquet)}).locate(0) == f"{parquet} row 1"
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(ROWS))
    assert load({"path": str(as_json)}).locate(2) == f"{as_json} item 3"
    as_csv = tmp_path / "data.csv"
    as_csv.write_text("question,answer\nq,a\nr,b\n")
    assert load({"path": str(as_csv)}).locate(1) == f"{as_csv}:3"  # line 1 is the header
    saved = tmp_path / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert load({"path": str(saved)}).locate(0) == f"{saved}[train] row 1"
    as_json.write_text(json.dumps([ROWS[0], "not an object"]))
    with pytest.raises(DataError, match=r"data.json item 2: each item must be a JSON object"):
        load({"path": str(as_json)})


def test_fingerprint_follows_the_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "part-a.jsonl", ROWS)
    spec = {"path": str(tmp_path / "part-*.jsonl")}
    first = source_fingerprint(spec)
    assert source_fingerprint(dict(spec)) == first
    assert load(spec).fingerprint == first
    write_jsonl(tmp_path / "part-b.jsonl", ROWS)
    second = source_fingerprint(spec)
    assert second != first
    write_jsonl(path, ROWS[:1])
    assert source_fingerprint(spec) != second
    saved = tmp_path / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert source_fingerprint({"path": str(saved)}) == load({"path": str(saved)}).fingerprint


def test_default_names() -> None:
    assert source_name({"path": "/data/tiny-tasks/train.jsonl"}) == "tiny-tasks/train"
    assert source_name({"path": "jsonl:/data/x/part-*.jsonl"}) == "x/part-*"
    assert source_name({"path": "hf:org/set", "config_name": "en"}) == "org/set:en"
    assert source_name({"path": "org/set"}) == "org/set"
    assert source_name({"path": "/a/b.jsonl", "name": "mine"}) == "mine"


def test_uncached_hub_dataset_offline_is_a_clear_error(tmp_path: Path) -> None:
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    for path in ("post-training-tests/not-cached", "hf:post-training-tests/not-cached"):
        with pytest.raises(DataError) as err:
            load_source({"path": path, "cache_dir": str(tmp_path / "cache")}, where="dataset.eval")
        text = str(err.value)
        assert "dataset.eval: cannot load Hub dataset 'post-training-tests/not-cached'" in text
        assert "is not in the local Hugging Face cache" in text
        assert "downloads are off (HF_HUB_OFFLINE=1); fetch it once with: HF_HUB_OFFLINE=0" in text


def _cache_hub_dataset(cache: Path, repo_id: str, data: Path) -> None:
    """Put ``data`` into ``cache`` the way ``datasets`` caches a Hub dataset it has loaded."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    builder = Json(
        cache_dir=str(cache / "build"),
        dataset_name=name,
        hash="0123abcd",
        data_files={"train": str(data)},
    )
    builder.download_and_prepare()
    built = [
        p for p in glob.glob(str(cache / "build" / name / "*" / "*" / "*")) if os.path.isdir(p)
    ]
    version, digest = Path(built[0]).parts[-2:]
    target = cache / f"{namespace}___{name}" / "default" / version
    target.mkdir(parents=True)
    shutil.move(built[0], target / digest)


def test_hub_dataset_loads_from_the_local_cache_offline(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "hub.jsonl", ROWS)
    cache = tmp_path / "cache"
    _cache_hub_dataset(cache, "post-training-tests/tiny", data)
    spec = {"path": "hf:post-training-tests/tiny", "cache_dir": str(cache)}
    assert load_source(spec).to_list() == ROWS
    assert load_source({**spec, "path": "post-training-tests/tiny"}).to_list() == ROWS
    assert source_fingerprint(spec) == source_fingerprint(dict(spec))
    assert load(spec).locate(1) == "post-training-tests/tiny[train] row 2"  # 1-based
    with pytest.raises(DataError, match="split 'test'") as err:
        load_source({**spec, "split": "test"})
    assert "not in the local cache" not in str(err.value)
