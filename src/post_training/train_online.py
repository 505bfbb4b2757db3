"""Online RL entrypoint: GRPO (and its variants) and RLOO with verifiable rewards.

    python -m post_training.train_online [trainer=grpo|rloo] [model=...] [dataset=<prompts>]

validate -> run dir + resume target -> tokenizer -> prompts (the SFT formats' conversations
before their last assistant turn, with their answers; prompts leaving no room for
``generation.max_new_tokens`` are dropped and counted) -> policy (+ PEFT) -> trainer (sample,
reward, optimise; held-out exact match every ``eval_steps``) -> final model -> exact match on
``evaluation.dataset``. Exit codes as ``train_sft``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig

from post_training.frame import Frame, begin, entrypoint, finish, load_policy

log = logging.getLogger(__name__)


def load_prompts(frame: Frame) -> list[dict[str, Any]]:
    """The training prompts: ``{"input_ids", "row"}`` per kept row (``row``: the alignment row
    with ``id``, ``prompt`` messages and ``answer``)."""
    from post_training.data_alignment.rows import filter_rows, read_rows
    from post_training.data_alignment.stage import chat_encoder, prompt_ids
    from post_training.errors import DataError

    config = frame.config
    with frame.accelerator.main_process_first():
        rows = read_rows(config["dataset"], "train")  # dataset.max_train_examples applied
    encoder = chat_encoder(config, frame.tokenizer)
    max_new = int(config["generation"]["max_new_tokens"])
    kept, report = filter_rows(rows, encoder, encoder.options.max_seq_length - max_new, max_new)
    if not kept:
        raise DataError(f"dataset.train: no prompt leaves room for {max_new} new tokens ({report})")
    ids = prompt_ids(encoder, [r["prompt"] for r in kept])
    log.info(
        "Prompts: %d of %d kept (dropped: %s)",
        len(kept),
        report["rows_in"],
        report["dropped"] or "none",
    )
    return [
        {"input_ids": np.array(p, dtype=np.int64), "row": row}
        for p, row in zip(ids, kept, strict=True)
    ]


def check_online(args: Any) -> None:
    """Before the run dir: a launch that shards the policy is refused (each rank samples with
    the whole policy), and each ``trainer.rewards`` function resolves (a registered name or
    ``pkg.mod:fn``): a ConfigError naming the entry otherwise."""
    from post_training.utils.launch_env import ONLINE_SAMPLING, launch_sharding, refuse_sharded

    refuse_sharded(ONLINE_SAMPLING, launch_sharding())
    from post_training.data_alignment.rewards import resolve_reward_function
    from post_training.errors import ConfigError

    for i, spec in enumerate(args.trainer.rewards):
        if spec.function is not None:
            try:
                resolve_reward_function(spec.function, spec.module)
            except ConfigError as error:
                raise ConfigError(f"trainer.rewards[{i}].function: {error}") from None


def run(cfg: DictConfig) -> int:
    """Train and evaluate; returns the process exit code."""
    # before torch is imported: a duplicate launch exits at once (exit 73); the reward names
    # are resolved right after validation, before the run dir is written
    frame = begin(cfg, check=check_online)
    from post_training.data_sft.training_data import read_eval_rows
    from post_training.online.trainer import OnlineTrainer

    prompts = load_prompts(frame)
    evaluation = frame.config["evaluation"]
    dataset = evaluation.get("dataset")
    eval_rows = read_eval_rows(dataset, evaluation.get("max_examples")) if dataset else []
    model = load_policy(frame)
    return finish(
        frame,
        OnlineTrainer,
        model,
        prompts,
        eval_rows,
        loss=None,
        evaluation_dataset=evaluation["dataset"],
    )


main = entrypoint("train-online", validated_by_run=True)(run)

if __name__ == "__main__":
    main()
