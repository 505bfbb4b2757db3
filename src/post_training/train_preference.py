"""Preference-optimisation entrypoint: QRPO, the DPO family, CPO and KTO.

    python -m post_training.train_preference [trainer=dpo|qrpo|cpo|kto] [model=...] [dataset=...]

validate -> run dir + resume target -> tokenizer -> tokenized pairs (the loss's columns checked)
-> policy (+ PEFT) -> reference (none, dataset columns, a frozen model or the adapter-less
policy; optionally precomputed once) -> trainer -> final model -> exact-match evaluation on
``evaluation.dataset``. Exit codes as ``train_sft``.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from post_training.frame import begin, entrypoint, finish, load_pairs, load_policy

log = logging.getLogger(__name__)


def check_launch(args: Any) -> None:
    """Before the run dir: TR-DPO (``trainer.sync_ref_model``) under a launch that shards the
    parameters is refused."""
    from post_training.utils.launch_env import TR_DPO, launch_sharding, refuse_sharded

    if getattr(args.trainer, "sync_ref_model", False):
        refuse_sharded(TR_DPO, launch_sharding())


def run(cfg: DictConfig) -> int:
    """Train and evaluate; returns the process exit code."""
    # before torch is imported: a duplicate launch exits at once (exit 73)
    frame = begin(cfg, check=check_launch)
    from post_training.data_preference.unpaired import label_balance
    from post_training.losses.table import PREFERENCE_LOSSES, build_loss, check_columns
    from post_training.modeling.loading import is_peft_model
    from post_training.trainers.preference import PreferenceTrainer
    from post_training.trainers.reference import Reference

    loss = build_loss(frame.args.trainer, PREFERENCE_LOSSES)
    kto = loss.name == "kto"
    train, eval_pairs = load_pairs(
        frame, "KTO examples (each with its KL completion)" if kto else "Preference pairs"
    )
    check_columns(loss, train, "dataset.train")
    check_columns(loss, eval_pairs, "dataset.eval")
    if kto:
        line, balanced = label_balance(train, loss.desirable_weight, loss.undesirable_weight)
        (log.info if balanced else log.warning)(line)
    model = load_policy(frame)
    reference = Reference.decide(loss, train, is_peft_model(model), frame.args)
    log.info("Reference log-probs: %s", reference.load(frame.config, frame.tokenizer).describe())
    return finish(
        frame,
        PreferenceTrainer,
        model,
        train,
        eval_pairs,
        loss=loss,
        reference=reference,
        evaluation_dataset=frame.config["evaluation"]["dataset"],
    )


main = entrypoint("train-preference", validated_by_run=True)(run)

if __name__ == "__main__":
    main()
