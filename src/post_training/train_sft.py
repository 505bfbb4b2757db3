"""Supervised fine-tuning entrypoint.

    python -m post_training.train_sft [model=...] [dataset=...] [trainer=...] [key=value ...]

compose (Hydra) -> run dir + resume target -> tokenizer -> data -> model -> trainer -> final model
-> exact-match evaluation. Exits with ``EXIT_CODE_STOPPED`` (75) when stopped by SIGUSR1/SIGTERM
after saving a checkpoint, so a pre-submitted SLURM successor resumes it.
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from post_training.data_sft.training_data import load_sft_data
from post_training.errors import ConfigError
from post_training.exact_match import evaluate_final_model
from post_training.frame import apply_debug
from post_training.modeling.loading import apply_peft, load_model, load_tokenizer
from post_training.trainers import TRAINERS
from post_training.utils.config import register_resolvers
from post_training.utils.run import setup_run
from post_training.utils.signals import EXIT_CODE_STOPPED
from post_training.utils.tracking import MetricsLogger

log = logging.getLogger(__name__)
register_resolvers()


def run(cfg: DictConfig) -> int:
    """Train and evaluate; returns the process exit code."""
    apply_debug(cfg)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if cfg.trainer.name not in TRAINERS:
        raise ConfigError(f"trainer.name {cfg.trainer.name!r}: known trainers {sorted(TRAINERS)}")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (gloo) under torchrun
        gradient_accumulation_steps=int(cfg.training_args.gradient_accumulation_steps),
        mixed_precision=cfg.training_args.mixed_precision,
    )
    set_seed(int(cfg.seed))
    run_ctx = setup_run(cfg, accelerator)

    tokenizer = load_tokenizer(run_ctx.config["model"])
    data = load_sft_data(
        run_ctx.config,
        tokenizer,
        accelerator.main_process_first,
        packing=bool(cfg.training_args.packing),
    )
    model_args = run_ctx.config["model_args"]
    model = apply_peft(load_model(run_ctx.config["model"], tokenizer, model_args), model_args)
    metrics = MetricsLogger(
        run_ctx.run_dir,
        run_ctx.config,
        run_id=f"{cfg.job_subdir}-{run_ctx.config_hash}",
        enabled=accelerator.is_main_process,
        tensorboard=bool(cfg.tensorboard),
        wandb_cfg=run_ctx.config["wandb"],
    )
    try:
        trainer = TRAINERS[cfg.trainer.name](
            run_ctx.config, model, tokenizer, data.train, data.eval, accelerator, run_ctx, metrics
        )
        outcome = trainer.train()
        if outcome.stopped_by_signal:
            return EXIT_CODE_STOPPED
        del trainer, model  # evaluation scores the saved final model, as `evaluate` would
        accelerator.free_memory()
        if cfg.evaluation.at_end and data.eval_rows and accelerator.is_main_process:
            evaluate_final_model(
                outcome.final_model_dir,
                run_ctx.config["dataset"],
                run_ctx.config["evaluation"],
                cfg.model.torch_dtype,
                metrics,
                outcome.state.global_step,
            )
        return 0
    finally:
        metrics.close()
        accelerator.end_training()


@hydra.main(config_path="configs", config_name="train-sft", version_base=None)
def main(cfg: DictConfig) -> None:
    OmegaConf.set_struct(cfg, True)
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
