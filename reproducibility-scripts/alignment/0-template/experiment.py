"""Settings shared by the alignment data stages of this experiment.

Each stage folder's generate_submit.py imports this file; edit it once per experiment. The
stages target the alignment data pipeline's entrypoints
``post_training.data_alignment.<stage>`` (being built: issue 6).
"""

from post_training.utils.submit import Model, generate_alignment

PREFIX = "alignment-template"  # names submit folders, job_subdirs and a wandb tag
ARTIFACTS_SUBDIR = "shared"
MODELS = [  # the policy / reference model whose completions and log-probs are computed
    Model("tiny", nodes=1, accelerate="cpu"),
    # Model("llama-3.1-8b-instruct", nodes=1, accelerate="ddp"),
]
DATASETS = ["tiny-tasks"]  # prompt datasets (configs/dataset/)
PARTITIONS = 4  # data partitions = SLURM array tasks of the partitioned stages
ENV = {}  # exported at the top of every submit.sh, e.g. {"MAX_RETRIES": "10"}


def generate(script, stage, time, partitions, hyperparameters, overrides, argv=None):
    """Write the stage's submit.sh from its own settings plus the shared ones above."""
    return generate_alignment(
        script,
        stage=stage,
        prefix=PREFIX,
        time=time,
        models=MODELS,
        datasets=DATASETS,
        hyperparameters=hyperparameters,
        partitions=partitions,
        artifacts_subdir=ARTIFACTS_SUBDIR,
        overrides=overrides,
        env=ENV,
        argv=argv,
    )
