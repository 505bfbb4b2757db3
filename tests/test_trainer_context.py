"""A trainer built in-process from the run frame, with step hooks (no subprocess, no patching)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training.data_sft.training_data import load_sft_data
from post_training.frame import begin, finish, load_policy
from post_training.losses.table import SFT_LOSSES, build_loss
from post_training.trainers import SFTTrainer, TrainerCallback
from post_training.utils.config import CONFIGS_DIR


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_step_begin(self, trainer) -> None:
        self.events.append(("begin", trainer.state.global_step))

    def on_step_end(self, trainer, step) -> None:
        self.events.append(("end", trainer.state.global_step, step["tokens"], step["examples"]))

    def on_log(self, trainer, metrics, step) -> None:
        self.events.append(("log", step, "loss" in metrics or "eval_loss" in metrics))

    def on_save(self, trainer, path: Path) -> None:
        self.events.append(("save", path.name))


def test_frame_builds_a_trainer_in_process_and_calls_the_hooks(tmp_path: Path) -> None:
    overrides = [
        f"artifacts_dir={tmp_path}",
        "wandb.mode=disabled",
        "tensorboard=false",
        "trainer=plw",
        "training_args.num_train_epochs=null",
        "training_args.max_steps=3",
        "training_args.per_device_train_batch_size=4",
        "training_args.gradient_accumulation_steps=2",
        "training_args.logging_steps=2",
        "training_args.save_steps=2",
        "training_args.eval_steps=null",
        "dataset.max_train_examples=64",
        "dataset.max_eval_examples=8",
        "data.cache=false",
        "evaluation.at_end=false",
    ]
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose("train-sft", overrides=overrides)
    OmegaConf.set_struct(cfg, True)
    frame = begin(cfg)
    assert frame.args.trainer.plw_args.prompt_loss_weight == 0.1  # typed, from the YAML
    loss = build_loss(frame.args.trainer, SFT_LOSSES)
    assert loss.name == "plw" and loss.linear_in_logps
    data = load_sft_data(frame.config, frame.tokenizer)
    recorder = Recorder()
    code = finish(
        frame,
        SFTTrainer,
        load_policy(frame),
        data.train,
        data.eval,
        loss=loss,
        evaluation_dataset=None,
        callbacks=[recorder],
    )
    assert code == 0
    kinds = [e[0] for e in recorder.events]
    assert kinds.count("begin") == 3 and kinds.count("end") == 3
    ends = [e for e in recorder.events if e[0] == "end"]
    assert [e[1] for e in ends] == [1, 2, 3]
    assert all(e[2] > 0 and e[3] == 8 for e in ends)  # tokens seen, global batch 4 × 2
    assert ("save", "checkpoint-2") in recorder.events
    assert ("save", "checkpoint-3") in recorder.events
    logs = [e for e in recorder.events if e[0] == "log"]
    assert [e[1] for e in logs if e[2]][:2] == [2, 3]  # logging_steps=2, and the last step
    assert (frame.run.checkpoint_dir / "final-model" / "model.safetensors").is_file()
