"""Shared utilities: config resolvers and hashing, run dirs and resuming, checkpoints, atomic
writes, signals, tracking, FLOPs. The bottom layer: imports nothing of the project but
:mod:`post_training.errors` (see ``tests/test_architecture.py``)."""
