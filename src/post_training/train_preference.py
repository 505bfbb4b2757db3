"""Preference-optimisation entrypoint: QRPO and the DPO family.

    python -m post_training.train_preference [trainer=dpo|qrpo] [model=...] [dataset=...] ...

compose (Hydra) -> run dir + resume target -> tokenizer -> preference pairs -> policy (+ PEFT)
-> reference (dataset columns, precomputed once, a frozen model, or the adapter-less policy)
-> trainer -> final model -> exact-match evaluation on ``evaluation.dataset``. Exits with
``EXIT_CODE_STOPPED`` (75) when stopped by SIGUSR1/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from post_training.data_alignment.ref_logps import cached_reference_logps
from post_training.data_preference.encode import load_preference_data, require_columns
from post_training.errors import ConfigError
from post_training.exact_match import evaluate_final_model
from post_training.frame import apply_debug
from post_training.losses.dpo import REFERENCE_FREE
from post_training.modeling.loading import apply_peft, is_peft_model, load_model, load_tokenizer
from post_training.trainers.preference import PREFERENCE_TRAINERS, REF_KEYS
from post_training.utils.config import register_resolvers
from post_training.utils.run import setup_run
from post_training.utils.signals import EXIT_CODE_STOPPED
from post_training.utils.tracking import MetricsLogger

log = logging.getLogger(__name__)
register_resolvers()


def reference_mode(config: dict[str, Any], train: list[dict], peft: bool) -> str:
    """none (reference-free loss) | dataset (precomputed columns) | peft | model."""
    trainer = config["trainer"]
    if trainer["name"] == "dpo" and trainer["loss_type"] in REFERENCE_FREE:
        return "none"
    if all(k in train[0] for k in REF_KEYS):
        return "dataset"
    if peft and not config["reference"]["model_name_or_path"]:
        return "peft"
    return "model"


def load_reference_model(config: dict[str, Any], tokenizer) -> torch.nn.Module:
    """The frozen reference: ``reference.model_name_or_path``, else the policy's initial
    weights (the same ``model`` config)."""
    model_cfg = dict(config["model"])
    if config["reference"]["model_name_or_path"]:
        model_cfg.update(
            model_name_or_path=config["reference"]["model_name_or_path"], init_from_config=False
        )
    return load_model(model_cfg, tokenizer)


def run(cfg: DictConfig) -> int:
    """Train and evaluate; returns the process exit code."""
    apply_debug(cfg)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if cfg.trainer.name not in PREFERENCE_TRAINERS:
        raise ConfigError(
            f"trainer.name {cfg.trainer.name!r}: preference trainers {sorted(PREFERENCE_TRAINERS)}"
        )
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=int(cfg.training_args.gradient_accumulation_steps),
        mixed_precision=cfg.training_args.mixed_precision,
    )
    set_seed(int(cfg.seed))
    run_ctx = setup_run(cfg, accelerator)
    config = run_ctx.config

    tokenizer = load_tokenizer(config["model"])
    with accelerator.main_process_first():
        train, eval_pairs, reports = load_preference_data(config, tokenizer)
    log.info(
        "Preference pairs: %d train, %d eval; filters %s", len(train), len(eval_pairs), reports
    )
    if cfg.trainer.name == "qrpo":
        keys = ("chosen_quantile_reward", "rejected_quantile_reward")
        require_columns(train, keys, "dataset.train")
        require_columns(eval_pairs, keys, "dataset.eval")
    model_args = config["model_args"]
    model = apply_peft(load_model(config["model"], tokenizer, model_args), model_args)
    mode = reference_mode(config, train, is_peft_model(model))
    ref_model = load_reference_model(config, tokenizer) if mode == "model" else None
    log.info(
        "Reference log-probs: %s%s",
        mode,
        " (precomputed once)" if config["reference"]["precompute"] else "",
    )
    metrics = MetricsLogger(
        run_ctx.run_dir,
        config,
        run_id=f"{cfg.job_subdir}-{run_ctx.config_hash}",
        enabled=accelerator.is_main_process,
        tensorboard=bool(cfg.tensorboard),
        wandb_cfg=config["wandb"],
    )
    try:
        trainer = PREFERENCE_TRAINERS[cfg.trainer.name](
            config,
            model,
            tokenizer,
            train,
            eval_pairs,
            accelerator,
            run_ctx,
            metrics,
            ref_model=ref_model,
        )
        if config["reference"]["precompute"] and mode in ("model", "peft"):
            with accelerator.main_process_first():
                cached_reference_logps(trainer, config, tokenizer, train + eval_pairs)
            trainer.ref_model = None
            del ref_model
        outcome = trainer.train()
        if outcome.stopped_by_signal:
            return EXIT_CODE_STOPPED
        del trainer, model
        accelerator.free_memory()
        evaluation = config["evaluation"]
        if evaluation["at_end"] and evaluation.get("dataset") and accelerator.is_main_process:
            evaluate_final_model(
                outcome.final_model_dir,
                evaluation["dataset"],
                evaluation,
                cfg.model.torch_dtype,
                metrics,
                outcome.state.global_step,
            )
        return 0
    finally:
        metrics.close()
        accelerator.end_training()


@hydra.main(config_path="configs", config_name="train-preference", version_base=None)
def main(cfg: DictConfig) -> None:
    OmegaConf.set_struct(cfg, True)
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
