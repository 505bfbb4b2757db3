"""Reward-model entrypoint: a one-label sequence classifier trained on preference pairs.

    python -m post_training.train_reward [model=...] [dataset=<preference pairs>] [key=value ...]

validate -> run dir + resume target -> tokenizer -> tokenized pairs (the preference formats and
presets, one padding-free row per pair) -> model (a causal LM checkpoint or config with a new
one-label head; + PEFT) -> trainer (Bradley–Terry, ``accuracy`` / ``margin`` on the eval split)
-> final model, which ``data_alignment.compute_rewards`` loads with
``reward.model.model_name_or_path=<final-model>``. Exit codes as ``train_sft``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from post_training.frame import begin, entrypoint, finish, load_pairs, load_policy


def run(cfg: DictConfig) -> int:
    """Train the reward model; returns the process exit code."""
    frame = begin(cfg)  # before torch is imported: a duplicate launch exits at once (exit 73)
    from post_training.losses.table import REWARD_LOSSES, build_loss
    from post_training.trainers.reward import RewardTrainer

    loss = build_loss(frame.args.trainer, REWARD_LOSSES)
    train, eval_pairs = load_pairs(frame)
    model = load_policy(frame, reward_head=True)
    return finish(
        frame, RewardTrainer, model, train, eval_pairs, loss=loss, evaluation_dataset=None
    )


main = entrypoint("train-reward", validated_by_run=True)(run)

if __name__ == "__main__":
    main()
