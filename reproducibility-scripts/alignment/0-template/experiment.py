"""Settings shared by the alignment data stages of this experiment.

Each stage folder's generate_submit.py imports this file; edit it once per experiment. The
stages run the alignment data pipeline's entrypoints ``post_training.data_alignment.<stage>``;
every stage writes ``artifacts/<ARTIFACTS_SUBDIR>/alignment-data/<dataset>/<model>/<stage>/`` and
reads the previous stage's output there (see ``src/post_training/configs/alignment-data.yaml``).
"""

from post_training.launch.submit import Model, generate_alignment

PREFIX = "alignment-template"  # names submit folders, job_subdirs and a wandb tag
ARTIFACTS_SUBDIR = "shared"
MODELS = [  # the policy / reference model whose completions and log-probs are computed
    Model("tiny", nodes=1, accelerate="cpu"),
    # The reference is usually your SFT checkpoint:
    # Model("llama-3.1-8b-instruct", nodes=1, accelerate="ddp", overrides={
    #     "model.model_name_or_path": "<sft final-model>", "model.init_from_config": False}),
    # With several processes (ddp), each partition is split over them (contiguous shards).
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
