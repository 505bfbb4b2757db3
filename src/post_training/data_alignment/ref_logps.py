"""Reference log-probs computed once before training and cached (``reference.precompute``).

The cache file is keyed by everything that determines the numbers: the dataset config, the
tokenizer, the chat template and tokenization options, and the reference model (its path, or the
policy's initial config); a re-launch (e.g. a SLURM retry that resumes) reads it instead of
loading the reference model again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post_training.data_sft.training_data import tokenize_options, tokenizer_fingerprint
from post_training.utils.atomic import atomic_file
from post_training.utils.config import config_hash

log = logging.getLogger(__name__)


def reference_cache_file(config: Mapping[str, Any], tokenizer: Any) -> Path:
    key = config_hash(
        {
            "dataset": config["dataset"],
            "options": vars(tokenize_options(config)),
            "max_prompt_length": config["training_args"].get("max_prompt_length"),
            "chat_template": config["model"].get("chat_template"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "reference": config["reference"]["model_name_or_path"] or config["model"],
            "peft": config["model_args"] if config["model_args"].get("use_peft") else None,
        },
        ignore_keys=(),
    )
    return Path(config["data"]["cache_dir"]) / "ref-logps" / f"{key}.npz"


def cached_reference_logps(
    trainer: Any, config: Mapping[str, Any], tokenizer: Any, examples: list[dict[str, Any]]
) -> Path:
    """Set ``ref_chosen_logps`` / ``ref_rejected_logps`` on every pair, from the cache or by
    one pass of the reference model (then written to the cache atomically)."""
    path = reference_cache_file(config, tokenizer)
    if path.is_file():
        with np.load(path) as arrays:
            chosen, rejected = arrays["chosen"], arrays["rejected"]
        if len(chosen) == len(examples):
            for example, c, r in zip(examples, chosen, rejected, strict=True):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = float(c), float(r)
            log.info("Reference log-probs from the cache %s", path)
            return path
        log.warning("Reference log-prob cache %s has another length; recomputing", path)
    batch_size = int(config["training_args"]["per_device_eval_batch_size"])
    trainer.precompute_reference(examples, batch_size)
    if trainer.accelerator.is_main_process:
        with atomic_file(path) as tmp:
            np.savez(
                tmp,
                chosen=np.array([e["ref_chosen_logps"] for e in examples]),
                rejected=np.array([e["ref_rejected_logps"] for e in examples]),
            )
        log.info("Reference log-probs of %d pairs written to %s", len(examples), path)
    return path


@torch.no_grad()
def summed_logps(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    chunk_size: int = 0,
) -> np.ndarray:
    """Summed completion log-probs under ``model``, with the forward and masks of training:
    ``[n, 2]`` (chosen, rejected) for tokenized pairs (``encode_pairs``), ``[n]`` for single
    tokenized conversations (``ChatEncoder.encode``)."""
    from post_training.data_sft.collate import pad_collate
    from post_training.trainers.preference import pair_statistics
    from post_training.trainers.sft import sft_forward

    model_device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start : start + batch_size], pad_token_id)
        batch = {k: v.to(model_device) for k, v in batch.items()}
        result = sft_forward(model, batch, chunk_size)
        if "position_ids" in batch:
            stats = pair_statistics(result, batch)
            out.append(torch.stack([stats["chosen_logps"], stats["rejected_logps"]], -1))
        else:
            out.append((result["logps"] * result["completion"].to(result["logps"].dtype)).sum(-1))
    return torch.cat(out).double().cpu().numpy()
