"""Model merging (linear, task arithmetic, TIES, DARE, SLERP, ...) with mergekit: ``plan``
validates a config and describes the merge; the entrypoint is ``python -m post_training.merge
model_merging=<method> ...`` (``model_merging.model_merging`` is its old alias).

Importing this package does not import mergekit (an optional dependency: the ``merge`` extra).
"""
