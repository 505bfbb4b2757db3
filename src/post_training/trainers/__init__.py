"""Trainers: the shared loop (:class:`Trainer`) and one thin subclass per loss family."""

from post_training.trainers.base import Trainer, TrainOutcome
from post_training.trainers.sft import SFTTrainer

TRAINERS: dict[str, type[Trainer]] = {"sft": SFTTrainer}

__all__ = ["TRAINERS", "SFTTrainer", "TrainOutcome", "Trainer"]
