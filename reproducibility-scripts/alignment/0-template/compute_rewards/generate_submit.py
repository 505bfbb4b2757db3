#!/usr/bin/env python
"""Alignment data stage `compute_rewards` (SLURM submit generator).

Reward-model scores of the completions, per partition. Entrypoint (config
`src/post_training/configs/<stage with dashes>.yaml`):
`python -m post_training.data_alignment.compute_rewards`.
Copy the whole alignment/0-template folder, edit ../experiment.py and this file, then

    python <folder>/compute_rewards/generate_submit.py [--dry-run]
    bash <folder>/compute_rewards/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Partitioned stages are SLURM job arrays: task i runs partition.index=i of partition.count, and
each task requeues itself alone until it completes. Run the stages in order, each once the
previous one has completed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment  # ../experiment.py: the settings shared by the stages

STAGE = "compute_rewards"
TIME = "04:00:00"  # wall time of one attempt
PARTITIONS = experiment.PARTITIONS
HYPERPARAMETERS = {}
OVERRIDES = {"reward.function": "exact_match"}  # or reward.function: null and
# "reward.model.model_name_or_path": "<a sequence-classification reward model>"


def main(argv=None):
    return experiment.generate(
        __file__, STAGE, TIME, PARTITIONS, HYPERPARAMETERS, OVERRIDES, argv=argv
    )


if __name__ == "__main__":
    main()
