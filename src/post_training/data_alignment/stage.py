"""What every alignment data stage shares: the config frame, the chat encoder, the partition run.

A stage's ``run(cfg)`` reads top to bottom::

    config, partition = begin(cfg)
    source = read_stage(config["input"])                   # all input rows + their identity
    output = stage_output(config, STAGE, settings, [source.source])
    if output.is_complete(): return output.path            # a re-run skips a finished partition
    rows = partition.select(source.rows)
    ... compute ...
    return output.write(rows, ...)

Rows carry a stable ``id`` from the first stage on, so that partitions can be merged and checked.
Heavy work inside a partition is split over the launched processes (``accelerate launch``):
contiguous shards, gathered back in order on every rank; only the main process writes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig

from post_training.data_alignment.partitions import Partition, StageOutput, partition_from_config
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.errors import DataError
from post_training.utils.config import config_hash, register_resolvers, to_container

log = logging.getLogger(__name__)
register_resolvers()

T = TypeVar("T")
R = TypeVar("R")


def begin(cfg: DictConfig) -> tuple[dict[str, Any], Partition]:
    """Resolve the config and the partition of this run (errors before any work)."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    config = to_container(cfg)
    return config, partition_from_config(config)


def stage_output(
    config: Mapping[str, Any],
    stage: str,
    settings: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
) -> StageOutput:
    """The partition this run writes, keyed by a hash of what determines its rows: the stage's
    settings, the identity of its inputs and the partition count (not the index: all
    partitions of one run share the hash)."""
    from pathlib import Path

    partition = partition_from_config(config)
    identity = [{k: v for k, v in i.items() if k != "path"} for i in inputs]
    digest = config_hash(
        {"stage": stage, "settings": settings, "inputs": identity, "count": partition.count},
        ignore_keys=(),
    )
    output = StageOutput(
        Path(config["output_dir"]), stage, partition, digest, bool(config.get("overwrite"))
    )
    output.check_siblings()
    return output


def model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What determines a model's outputs (not its display name)."""
    keys = (
        "model_name_or_path",
        "tokenizer_name_or_path",
        "init_from_config",
        "init_seed",
        "chat_template",
        "torch_dtype",
        "max_seq_length",
        "special_tokens",
    )
    return {k: model_cfg.get(k) for k in keys}


def now() -> float:
    return time.time()


def chat_encoder(config: Mapping[str, Any], tokenizer: Any, **overrides: Any) -> ChatEncoder:
    """The training encoder of ``config`` (template, tokenization options), so that lengths and
    masks here are those of training; ``overrides`` replace tokenization options."""
    from post_training.data_sft.templates import ChatTemplate, resolve_template
    from post_training.data_sft.training_data import tokenize_options

    options = vars(tokenize_options(config)) | overrides
    template = resolve_template(config["model"].get("chat_template"))
    return ChatEncoder(
        tokenizer,
        template if isinstance(template, ChatTemplate) else None,
        TokenizeOptions(**options),
    )


def prompt_ids(
    encoder: ChatEncoder, prompts: Sequence[Sequence[Mapping[str, Any]]]
) -> list[list[int]]:
    """Token ids of each rendered prompt plus generation prompt, exactly as training starts a
    reply (BOS added when the tokenization options say so)."""
    texts = [encoder.render_prompt([dict(m) for m in p]) for p in prompts]
    encodings = encoder.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for enc in encodings:
        ids = list(enc.ids)
        if encoder.options.add_bos and (not ids or ids[0] != encoder.bos_id):
            ids = [encoder.bos_id, *ids]
        out.append(ids)
    return out


def row_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (e.g. a row id and a sample
    index), never on batching or partitioning."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def check_user_turn(rows: Sequence[Mapping[str, Any]], where: str) -> None:
    for row in rows:
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not any(
            isinstance(m, Mapping) and m.get("role") == "user" for m in prompt
        ):
            raise DataError(f"{where}: row {row.get('id')!r}: the prompt has no user turn")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shard_map(
    items: Sequence[T], fn: Callable[[list[T]], list[R]], accelerator: Any | None = None
) -> list[R]:
    """``fn`` over ``items`` split into contiguous shards across the launched processes, the
    results gathered back in order on every rank (one process: ``fn(items)``)."""
    if accelerator is None or accelerator.num_processes == 1:
        return fn(list(items))
    from accelerate.utils import gather_object

    start = len(items) * accelerator.process_index // accelerator.num_processes
    stop = len(items) * (accelerator.process_index + 1) // accelerator.num_processes
    return list(gather_object(fn(list(items[start:stop]))))


def finite(value: float, what: str) -> float:
    if not np.isfinite(value):
        raise DataError(f"{what} is {value} (NaN or infinite)")
    return float(value)
