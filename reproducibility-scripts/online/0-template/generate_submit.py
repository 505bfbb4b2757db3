#!/usr/bin/env python
"""Online RL sweep template (train_online: GRPO and its variants, RLOO): copy this folder, edit
the sweep below, run this file, submit.

    cp -r reproducibility-scripts/online/0-template reproducibility-scripts/online/1-my-experiment
    # edit reproducibility-scripts/online/1-my-experiment/generate_submit.py
    python reproducibility-scripts/online/1-my-experiment/generate_submit.py [--dry-run]
    bash reproducibility-scripts/online/1-my-experiment/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Every run is one self-requeueing SLURM job, as the SFT template's (a run resumes from its last
checkpoint bit-identical, sampling included). GLOBAL_BATCH_SIZE counts *prompts* per optimizer
step (each sampled trainer.num_generations times); outputs go to
artifacts/<ARTIFACTS_SUBDIR>/outputs/train_online/<PREFIX>/<run>/.
"""

from post_training.launch.submit import Model, generate_sft

# ----------------------------------------------------------------------------- the sweep
PREFIX = "online-template"  # names the submit folder, every job_subdir and a wandb tag
TIME = "04:00:00"  # wall time of one attempt (the chain goes on until the run completes)
ARTIFACTS_SUBDIR = "shared"
GLOBAL_BATCH_SIZE = 8  # prompts per step; accumulation = global / (nodes × devices × per-device)
SFT_START = "artifacts/shared/outputs/train_sft/<sft-job>/final-model"  # the policy to start from

MODELS = [
    # Model(config name, nodes, per-device prompts, accelerate config, overrides)
    Model(
        "tiny",
        nodes=1,
        per_device_batch_size=4,
        accelerate="cpu",
        overrides={"model.model_name_or_path": SFT_START, "model.init_from_config": False},
    ),
]
DATASETS = ["tiny-tasks"]  # prompts: any SFT-format dataset (its answers feed the rewards)
HYPERPARAMETERS = {  # every combination is a run
    "trainer": ["grpo"],
    "trainer.loss_type": ["grpo", "dapo"],
    "training_args.learning_rate": [5e-5, 1e-4],
}
SHORT_NAMES = {"training_args.learning_rate": "lr", "trainer.loss_type": "loss"}
OVERRIDES = {  # the same for every run
    "training_args.max_steps": 200,
    "trainer.num_generations": 8,
}
ENV = {}  # exported at the top of submit.sh


def main(argv=None):
    return generate_sft(
        __file__,
        prefix=PREFIX,
        time=TIME,
        models=MODELS,
        datasets=DATASETS,
        hyperparameters=HYPERPARAMETERS,
        global_batch_size=GLOBAL_BATCH_SIZE,
        artifacts_subdir=ARTIFACTS_SUBDIR,
        overrides=OVERRIDES,
        short_names=SHORT_NAMES,
        env=ENV,
        argv=argv,
        module="post_training.train_online",
    )


if __name__ == "__main__":
    main()
