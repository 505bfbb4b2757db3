#!/usr/bin/env python
"""Alignment data stage `prepare_train_dataset` (SLURM submit generator).

Chosen / rejected pairs and reference rewards, per partition. Entrypoint (config
`src/post_training/configs/<stage with dashes>.yaml`):
`python -m post_training.data_alignment.prepare_train_dataset`.
Copy the whole alignment/0-template folder, edit ../experiment.py and this file, then

    python <folder>/prepare_train_dataset/generate_submit.py [--dry-run]
    bash <folder>/prepare_train_dataset/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Partitioned stages are SLURM job arrays: task i runs partition.index=i of partition.count, and
each task requeues itself alone until it completes. Run the stages in order, each once the
previous one has completed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment  # ../experiment.py: the settings shared by the stages

STAGE = "prepare_train_dataset"
TIME = "04:00:00"  # wall time of one attempt
PARTITIONS = experiment.PARTITIONS
HYPERPARAMETERS = {}
OVERRIDES = {}  # the same for every job of this stage


def main(argv=None):
    return experiment.generate(
        __file__, STAGE, TIME, PARTITIONS, HYPERPARAMETERS, OVERRIDES, argv=argv
    )


if __name__ == "__main__":
    main()
