"""Supervised fine-tuning entrypoint.

    python -m post_training.train_sft [model=...] [dataset=...] [trainer=sft|plw|ln-plw|irl] ...

validate -> run dir + resume target -> tokenizer -> tokenized data -> model (+ PEFT) -> trainer
with the loss of ``trainer.name`` -> final model -> exact-match evaluation. Exits with 75 when
stopped by SIGUSR1/SIGTERM after saving a checkpoint (a pre-submitted SLURM successor resumes
it), with 2 and one line on a config or data error.
"""

from __future__ import annotations

from omegaconf import DictConfig

from post_training.frame import begin, entrypoint, finish, load_policy


def run(cfg: DictConfig) -> int:
    """Train and evaluate; returns the process exit code."""
    frame = begin(cfg)  # before torch is imported: a duplicate launch exits at once (exit 73)
    from post_training.data_sft.training_data import load_sft_data
    from post_training.losses.table import SFT_LOSSES, build_loss
    from post_training.trainers.sft import SFTTrainer

    loss = build_loss(frame.args.trainer, SFT_LOSSES)
    data = load_sft_data(
        frame.config,
        frame.tokenizer,
        frame.accelerator.main_process_first,
        packing=frame.args.training_args.packing,
    )
    model = load_policy(frame)
    return finish(
        frame,
        SFTTrainer,
        model,
        data.train,
        data.eval,
        loss=loss,
        evaluation_dataset=frame.config["dataset"] if data.eval_rows else None,
    )


main = entrypoint("train-sft", validated_by_run=True)(run)

if __name__ == "__main__":
    main()
