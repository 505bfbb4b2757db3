#!/usr/bin/env python
"""Alignment data stage `merge_partitions` (SLURM submit generator).

Merge the partitions into one training dataset. Entrypoint (config
`src/post_training/configs/<stage with dashes>.yaml`):
`python -m post_training.data_alignment.merge_partitions`.
Copy the whole alignment/0-template folder, edit ../experiment.py and this file, then

    python <folder>/merge_partitions/generate_submit.py [--dry-run]
    bash <folder>/merge_partitions/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh

Partitioned stages are SLURM job arrays: task i runs partition.index=i of partition.count, and
each task requeues itself alone until it completes. Run the stages in order, each once the
previous one has completed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment  # ../experiment.py: the settings shared by the stages

STAGE = "merge_partitions"
TIME = "04:00:00"  # wall time of one attempt
PARTITIONS = experiment.PARTITIONS  # merged by one job
HYPERPARAMETERS = {}
OVERRIDES = {"stage": "prepare_train_dataset"}  # the stage whose partitions are merged


def main(argv=None):
    return experiment.generate(
        __file__, STAGE, TIME, PARTITIONS, HYPERPARAMETERS, OVERRIDES, argv=argv
    )


if __name__ == "__main__":
    main()
