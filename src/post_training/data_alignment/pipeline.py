"""The stages of the alignment data pipeline, in the order they run; each is the entrypoint
``python -m post_training.data_alignment.<stage>`` (a leaf: the launcher reads it on a login node
without importing the stages)."""

ALIGNMENT_STAGES = (
    "filter_dataset_for_model",
    "generate_ref_completions",
    "compute_ref_logprobs",
    "compute_rewards",
    "prepare_train_dataset",
    "merge_partitions",
)
