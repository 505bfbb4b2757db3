"""Launching on a cluster: sweeps to self-requeueing ``sbatch`` lines (``submit``, the engine of
``reproducibility-scripts/``) and syncing offline wandb runs afterwards (``sync_wandb``).

Runs on a login node: nothing here imports torch or transformers.
"""
