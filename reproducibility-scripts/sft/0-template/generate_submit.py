#!/usr/bin/env python
"""SFT sweep template: copy this folder, edit the sweep below, run this file, submit.

    cp -r reproducibility-scripts/sft/0-template reproducibility-scripts/sft/1-my-experiment
    # edit reproducibility-scripts/sft/1-my-experiment/generate_submit.py
    python reproducibility-scripts/sft/1-my-experiment/generate_submit.py [--dry-run]
    bash reproducibility-scripts/sft/1-my-experiment/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Every run is one self-requeueing SLURM job (cscs-shared-submit-scripts/): it checkpoints before
its wall time and a pre-submitted successor resumes it until it completes. Runs are named from
their swept values; outputs go to artifacts/<ARTIFACTS_SUBDIR>/outputs/train_sft/<PREFIX>/<run>/.
Site settings (account, container, devices per node) live in cscs-shared-submit-scripts/setup.sh.
"""

from post_training.launch.submit import Model, generate_sft

# ----------------------------------------------------------------------------- the sweep
PREFIX = "sft-template"  # names the submit folder, every job_subdir and a wandb tag
TIME = "04:00:00"  # wall time of one attempt (the chain goes on until the run completes)
ARTIFACTS_SUBDIR = "shared"
GLOBAL_BATCH_SIZE = 32  # gradient accumulation = global / (nodes × devices × per-device batch)

MODELS = [
    # Model(config name, nodes, per-device batch, accelerate config)
    Model("tiny", nodes=1, per_device_batch_size=8, accelerate="cpu"),
    # Model("llama-3.2-1b-instruct", nodes=1, per_device_batch_size=8, accelerate="ds-zero2",
    #       overrides={"training_args.mixed_precision": "bf16"}),
]
DATASETS = ["tiny-tasks"]
HYPERPARAMETERS = {  # every combination is a run
    "trainer": ["sft", "plw"],
    "training_args.learning_rate": [1e-3, 2e-3],
}
SHORT_NAMES = {"training_args.learning_rate": "lr"}  # in run names
OVERRIDES = {  # the same for every run
    "training_args.num_train_epochs": 10,
}
ENV = {}  # exported at the top of submit.sh, e.g. {"MAX_RETRIES": "10", "SBATCH_QOS": "..."}


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
    )


if __name__ == "__main__":
    main()
