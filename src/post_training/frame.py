"""What every training entrypoint does around its own work (shared by ``train_sft`` and
``train_preference``, which never import each other)."""

from __future__ import annotations

from omegaconf import DictConfig

from post_training.modeling.loading import check_quantization
from post_training.trainers.base import check_eval_strategy, check_training_length


def apply_debug(cfg: DictConfig) -> None:
    """Check the training length and evaluation schedule before anything loads; with
    ``debug.enabled``, a few steps (the output root is already ``outputs-debug``)."""
    check_training_length(cfg.training_args)
    check_eval_strategy(cfg.training_args)
    check_quantization(cfg.model, cfg.get("model_args"))
    if cfg.debug.enabled:
        for key in ("num_train_epochs", "num_training_samples", "num_training_tokens"):
            cfg.training_args[key] = None
        cfg.training_args.max_steps = cfg.debug.max_steps
        cfg.evaluation.max_examples = 20
