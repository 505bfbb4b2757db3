"""Trainers: the shared loop (:class:`Trainer`) and one thin subclass per loss family."""

from post_training.trainers.base import Trainer, TrainOutcome
from post_training.trainers.sft import IRLTrainer, LNPLWTrainer, PLWTrainer, SFTTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "sft": SFTTrainer,
    "plw": PLWTrainer,
    "ln-plw": LNPLWTrainer,
    "irl": IRLTrainer,
}

__all__ = [
    "TRAINERS",
    "IRLTrainer",
    "LNPLWTrainer",
    "PLWTrainer",
    "SFTTrainer",
    "TrainOutcome",
    "Trainer",
]
