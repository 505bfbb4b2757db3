"""Model merging (linear, task arithmetic, TIES, DARE, SLERP, ...) with mergekit, driven by a Hydra
config: ``python -m post_training.model_merging.model_merging model_merging=<method> ...``.

Importing this package does not import mergekit (an optional dependency: the ``merge`` extra).
"""
