"""Trainers: the shared loop (:class:`Trainer`), one trainer per family (SFT, preference) holding
a loss object from :mod:`post_training.losses.table`, and the reference log-probs component."""

from post_training.trainers.base import Trainer, TrainerCallback, TrainerContext, TrainOutcome
from post_training.trainers.sft import SFTTrainer

__all__ = ["SFTTrainer", "TrainOutcome", "Trainer", "TrainerCallback", "TrainerContext"]
