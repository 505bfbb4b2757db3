#!/usr/bin/env python
"""Alignment data stage `filter_dataset_for_model` (SLURM submit generator).

Drop prompts the model cannot take (too long for its context, ...). Entrypoint (config
`src/post_training/configs/<stage with dashes>.yaml`):
`python -m post_training.data_alignment.filter_dataset_for_model`.
Copy the whole alignment/0-template folder, edit ../experiment.py and this file, then

    python <folder>/filter_dataset_for_model/generate_submit.py [--dry-run]
    bash <folder>/filter_dataset_for_model/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Partitioned stages are SLURM job arrays: task i runs partition.index=i of partition.count, and
each task requeues itself alone until it completes. Run the stages in order, each once the
previous one has completed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment  # ../experiment.py: the settings shared by the stages

STAGE = "filter_dataset_for_model"
TIME = "04:00:00"  # wall time of one attempt
PARTITIONS = 1  # one job over the whole dataset
HYPERPARAMETERS = {}
OVERRIDES = {}  # the same for every job of this stage


def main(argv=None):
    return experiment.generate(
        __file__, STAGE, TIME, PARTITIONS, HYPERPARAMETERS, OVERRIDES, argv=argv
    )


if __name__ == "__main__":
    main()
