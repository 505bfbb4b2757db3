"""What every alignment data stage shares: the config frame, the stage frame, the chat encoder.

A stage's ``run(cfg)`` reads top to bottom::

    config, partition = begin(cfg)                         # config errors before any work
    source = read_stage(config["input"])                   # all input rows + their identity
    settings = {...}                                       # what determines the output rows
    with open_stage(config, STAGE, settings, [source.source]) as out:
        if out.done:                                       # a re-run skips a finished partition
            return out.path
        rows = partition.select(source.rows)
        ... compute (shard_map(items, fn, out.accelerator) for the heavy part) ...
        out.rows, out.report = rows, report
    return out.path                                        # written on leaving the block

:func:`open_stage` is the one place for what used to be repeated in every stage: the partition's
hash (settings, inputs' identity, partition count), the skip of a complete partition (logged
once, there), the start time, the accelerator (made once the skip is decided, before any model is
placed), and the write on a clean exit: the partition and its manifest atomically, from the main
process only (the other processes of an ``accelerate launch`` compute their shards and write
nothing). If the block raises, nothing is written.

Rows carry a stable ``id`` from the first stage on, so that partitions can be merged and checked.
Heavy work inside a partition is split over the launched processes (``accelerate launch``):
contiguous shards, gathered back in order on every rank; only the main process writes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig

from post_training.data_alignment.partitions import (
    Partition,
    StageOutput,
    partition_from_config,
    remove_partition_temporaries,
)
from post_training.data_sft.tokenize import ChatEncoder, TokenizeOptions
from post_training.errors import DataError
from post_training.utils import job_lock
from post_training.utils.config import config_hash, register_resolvers, to_container
from post_training.utils.progress import labelled, launch_rank, silence_known_warnings
from post_training.utils.run import lock_settings

log = logging.getLogger(__name__)
register_resolvers()

T = TypeVar("T")
R = TypeVar("R")


def begin(cfg: DictConfig) -> tuple[dict[str, Any], Partition]:
    """Resolve the config and the partition of this run (errors before any work)."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    silence_known_warnings()
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


def lock_partition(config: Mapping[str, Any], output: StageOutput, create: bool = False) -> None:
    """One run per partition: the main process takes the partition's lock in the output dir
    (``.lock-<partition>``; :mod:`post_training.utils.job_lock`), then removes what a killed
    run of this partition left (its ``.tmp-<pid>-...`` temporaries). Other partitions of the
    same stage run alongside, each under its own lock. A run that fails leaves no output dir:
    without ``create`` (at the start) a missing output dir is not created — no earlier run, so
    nothing to clean — and the lock is taken before the write (``create``) instead."""
    if launch_rank() != 0 or (not create and not output.output_dir.is_dir()):
        return
    resuming = config.get("resuming") or {}
    name = output.partition.name
    job_lock.acquire(output.output_dir, lock_settings(resuming), name=f".lock-{name}")
    removed = remove_partition_temporaries(output.output_dir, name)
    if removed:
        log.info("Removed %d temporaries of %s left by a killed run", removed, name)


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


def stage_accelerator() -> Any:
    """The accelerator of a stage run: one process, or several under ``accelerate launch`` (CPU
    processes on gloo when there is no GPU)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class OpenStage:
    """The partition a stage run writes (see :func:`open_stage`): ``done`` when it is complete
    already; else the stage sets ``rows`` and ``report``, written on leaving the block."""

    output: StageOutput
    done: bool
    accelerator: Any = None
    started: float = 0.0
    rows: Sequence[Mapping[str, Any]] | None = None
    report: Mapping[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.output.path


@contextmanager
def open_stage(
    config: Mapping[str, Any],
    stage: str,
    settings: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
) -> Iterator[OpenStage]:
    """The frame of one stage run (see the module docstring): refuses partitions of another
    config, skips a complete one (``out.done``: the caller returns ``out.path``), else records the
    start, makes the accelerator, and on a clean exit writes ``out.rows`` with the manifest
    (``settings``, ``inputs``, ``out.report``) from the main process only."""
    output = stage_output(config, stage, settings, inputs)
    lock_partition(config, output)
    if output.is_complete():
        log.info("%s: %s is complete; skipping", stage, output.path)
        yield OpenStage(output, done=True)
        return
    out = OpenStage(output, done=False, started=time.time())
    out.accelerator = stage_accelerator()
    with labelled(f"{stage} {output.path.name}"):
        yield out  # an exception in the block propagates from here: nothing is written
    if out.rows is None or out.report is None:
        raise RuntimeError(f"{stage}: the stage left its block without setting rows and report")
    if out.accelerator.is_main_process:
        lock_partition(config, output, create=True)  # idempotent: taken at the start if it could
        output.write(
            out.rows, settings=settings, inputs=inputs, report=out.report, started=out.started
        )


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
