"""The SFT data of a run: load the ``dataset`` config's splits, template + tokenize with masks,
filter, cache, and pack.

Flow: sources / mixture → canonical messages (``sources.py``, ``transforms.py``) → template +
tokens + masks + filters (``tokenize.py``) → [pack] (``packing.py``). The tokenized splits are
cached under ``data.cache_dir``, keyed by the sources' fingerprints, the dataset config
(transforms, mixture), the template, the tokenizer and the options; a second launch skips
tokenization. Under a multi-process launch the main process tokenizes and writes the cache while
the others wait, then load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from post_training.data_sft.dataset_config import dataset_specs, load_train_eval
from post_training.data_sft.packing import pack_examples, packing_efficiency
from post_training.data_sft.sources import load, source_fingerprint
from post_training.data_sft.templates import resolve_template
from post_training.data_sft.tokenize import (
    ChatEncoder,
    FilterReport,
    TokenizeOptions,
    make_example,
)
from post_training.errors import DataError
from post_training.utils.atomic import atomic_dir
from post_training.utils.config import config_hash
from post_training.utils.progress import ItemProgress

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: tokenizer-template masks from the full rendering, no text after EOT;
# 3: examples with an empty user / assistant turn dropped (empty_user_turn, empty_assistant_turn)
READ_BATCH = 2048


@dataclass
class SFTData:
    """Tokenized train / eval examples, the eval rows (for generation accuracy) and reports."""

    train: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]
    eval_rows: list[dict[str, Any]]
    reports: dict[str, Any] = field(default_factory=dict)


def tokenize_options(config: Mapping[str, Any]) -> TokenizeOptions:
    data = config.get("data") or {}
    special = config["model"].get("special_tokens") or {}
    return TokenizeOptions(
        max_seq_length=int(config["model"]["max_seq_length"]),
        truncation=data.get("truncation", "drop"),
        role_fix=data.get("non_alternating_roles", "merge"),
        add_bos=bool(special.get("add_bos", False)),
        train_on=data.get("train_on", "all_assistant_turns"),
    )


def iter_messages(ds: Any) -> Iterator[list[dict[str, str]]]:
    """The ``messages`` column of a ``datasets.Dataset``, in batches (fast)."""
    for batch in ds.iter(batch_size=READ_BATCH):
        yield from batch["messages"]


def spec_fingerprints(spec: Any) -> list[str]:
    if not isinstance(spec, Mapping):
        return []
    if "sources" in spec:
        return [source_fingerprint(s) for s in spec["sources"]]
    if "path" in spec:
        return [source_fingerprint(spec)]
    return []


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.chat_template).encode())
    for name in ("bos_token", "eos_token", "pad_token"):
        digest.update(str(getattr(tokenizer, name)).encode())
    return digest.hexdigest()[:16]


def cache_key(config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    dataset = config["dataset"]
    options = tokenize_options(config)
    return config_hash(
        {
            "version": CACHE_VERSION,
            "dataset": dataset,
            "fingerprints": spec_fingerprints(dataset.get("train"))
            + spec_fingerprints(dataset.get("eval")),
            "chat_template": config["model"].get("chat_template"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "options": vars(options),
        },
        ignore_keys=(),
    )


def _save_split(directory: Path, examples: list[dict[str, np.ndarray]], index: list[int]) -> None:
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    np.savez(
        directory / "tokens.npz",
        input_ids=np.concatenate([e["input_ids"] for e in examples]).astype(np.int32),
        completion_mask=np.concatenate([e["completion_mask"] for e in examples]).astype(np.uint8),
        lengths=lengths,
        index=np.asarray(index, dtype=np.int64),
    )


def _load_split(directory: Path) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    with np.load(directory / "tokens.npz") as arrays:
        ids = arrays["input_ids"].astype(np.int64)
        completion = arrays["completion_mask"].astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
        index = arrays["index"].tolist()
    examples = [
        make_example(ids[a:b], completion[a:b]) for a, b in itertools.pairwise(bounds.tolist())
    ]
    return examples, index


def row_locator(spec: Any, ds: Any, sources: Mapping[str, Any], where: str) -> Callable[[int], str]:
    """Where row ``index`` of a canonical split comes from, for errors: the source's own location
    (``file:line``) when the split is one source's rows in file order (no shuffle, no amount),
    else its source name and path and the 1-based row of the split. The encoder calls it for
    every row (its location string): an exact source is read once, on the first call."""
    exact = (
        isinstance(spec, Mapping)
        and "path" in spec
        and not spec.get("shuffle")
        and all(spec.get(k) is None for k in ("count", "fraction", "weight"))
    )

    loaded: list[Any] = []  # the source, read once on the first call (not once per row)

    def locate(index: int) -> str:
        if exact:
            if not loaded:
                loaded.append(load(spec, where))
            return f"{where}: {loaded[0].locate(index)}"
        name = ds[index].get("source") if "source" in ds.column_names else None
        path = (sources.get(name) or {}).get("path") if name is not None else None
        origin = f" (source '{name}': {path})" if path is not None else ""
        return f"{where}{origin}: row {index + 1} of the split"

    return locate


def _tokenize_splits(
    config: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Any,
    eval_ds: Any,
    load_report: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    template = resolve_template(config["model"].get("chat_template"))
    encoder = ChatEncoder(
        tokenizer, template if not isinstance(template, str) else None, tokenize_options(config)
    )
    out: dict[str, Any] = {}
    specs = dict(zip(("train", "eval"), dataset_specs(config["dataset"]), strict=True))
    load_report = load_report or {}
    for split, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is None:
            continue
        report = FilterReport()
        spec, part = specs[split], load_report.get(split) or {}
        if isinstance(spec, Mapping) and "from_train" in spec:  # rows of the train sources
            spec, part = None, load_report.get("train") or {}
        locate = row_locator(spec, ds, part.get("sources") or {}, f"dataset.{split}")
        log.info("Tokenizing the %s split: %d conversations", split, len(ds))
        progress = ItemProgress(f"tokenizing {split}", len(ds), "conversations")
        examples, index = encoder.encode(
            iter_messages(ds), f"dataset.{split}", report, locate, True, progress
        )
        log.info(report.summary(f"{split} split"))
        out[split] = (examples, index, report.as_dict())
    return out


def _write_cache(directory: Path, splits: dict[str, Any], key: str) -> None:
    # Another job may write the same key meanwhile: identical content, the first one stays.
    with atomic_dir(directory, if_exists="keep") as tmp:
        reports = {}
        for split, (examples, index, report) in splits.items():
            (tmp / split).mkdir()
            if examples:
                _save_split(tmp / split, examples, index)
            reports[split] = report
        (tmp / "meta.json").write_text(json.dumps({"key": key, "reports": reports}, indent=2))


def _read_cache(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / "meta.json").read_text())
    out = {}
    for split, report in meta["reports"].items():
        if (directory / split / "tokens.npz").exists():
            examples, index = _load_split(directory / split)
        else:
            examples, index = [], []
        out[split] = (examples, index, report)
    return out


def read_eval_rows(
    dataset_cfg: Mapping[str, Any], max_examples: int | None = None
) -> list[dict[str, Any]]:
    """Canonical eval rows with an assistant turn to predict (generation accuracy), the first
    ``max_examples`` of them when given."""
    _, eval_ds, _ = load_train_eval(dataset_cfg)
    if eval_ds is None:
        return []
    rows = [r for r in eval_ds if any(m["role"] == "assistant" for m in r["messages"])]
    return rows[: int(max_examples)] if max_examples else rows


def load_sft_data(
    config: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    packing: bool = False,
) -> SFTData:
    """Tokenized (and optionally packed) splits of ``config["dataset"]``, through the cache."""
    dataset_cfg = config["dataset"]
    data_cfg = config.get("data") or {}
    train_ds, eval_ds, load_report = load_train_eval(dataset_cfg)  # max_*_examples applied

    key = cache_key(config, tokenizer)
    cache_dir = Path(data_cfg["cache_dir"]) / key if data_cfg.get("cache", True) else None
    with main_process_first():
        if cache_dir is not None and (cache_dir / "meta.json").exists():
            log.info("Tokenized data from the cache %s", cache_dir)
            splits = _read_cache(cache_dir)
        else:
            splits = _tokenize_splits(config, tokenizer, train_ds, eval_ds, load_report)
            if cache_dir is not None:
                _write_cache(cache_dir, splits, key)
    train, _, train_report = splits["train"]
    if not train:
        raise DataError(
            f"dataset {dataset_cfg.get('name')}: no training example left after filtering "
            f"({train_report['dropped']})"
        )
    reports: dict[str, Any] = {"load": load_report, "train": train_report}
    eval_examples: list[dict[str, np.ndarray]] = []
    eval_rows: list[dict[str, Any]] = []
    if "eval" in splits:
        eval_examples, eval_index, reports["eval"] = splits["eval"]
        eval_rows = [eval_ds[i] for i in eval_index]
    if packing:
        capacity = int(config["model"]["max_seq_length"])
        train, _ = pack_examples(train, capacity)
        reports["packing"] = {
            "bins": len(train),
            "efficiency": packing_efficiency(train, capacity),
        }
        log.info(
            "Packed %d train examples into %d bins of %d tokens (%.1f%% full)",
            train_report["kept"],
            len(train),
            capacity,
            100 * reports["packing"]["efficiency"],
        )
    return SFTData(train=train, eval=eval_examples, eval_rows=eval_rows, reports=reports)
