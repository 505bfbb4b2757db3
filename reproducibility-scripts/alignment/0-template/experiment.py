"""Settings shared by the alignment data stages of this experiment.

Each stage folder's generate_submit.py imports this file; edit it once per experiment. The
stages target the alignment data pipeline's entrypoints
``post_training.data_alignment.<stage>`` (being built: issue 6).
"""

from post_training.utils.submit import Model

PREFIX = "alignment-template"  # names submit folders, job_subdirs and a wandb tag
ARTIFACTS_SUBDIR = "shared"
MODELS = [  # the policy / reference model whose completions and log-probs are computed
    Model("tiny", nodes=1, accelerate="cpu"),
    # Model("llama-3.1-8b-instruct", nodes=1, accelerate="ddp"),
]
DATASETS = ["tiny-tasks"]  # prompt datasets (configs/dataset/)
PARTITIONS = 4  # data partitions = SLURM array tasks of the partitioned stages
ENV = {}  # exported at the top of every submit.sh, e.g. {"MAX_RETRIES": "10"}
