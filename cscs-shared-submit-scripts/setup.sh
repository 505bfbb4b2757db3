# shellcheck shell=bash
# Site settings of the SLURM wrappers: the ONE file to edit for a cluster.
#
# Sourced (never executed) by every generated submit.sh on the login node, before its sbatch
# lines, and again by every job. It only sets and exports variables, so sourcing it twice is
# harmless. Every value keeps one already set in the environment (`VAR=x bash submit.sh`
# overrides a default). sbatch reads the exported SBATCH_* variables as default options, and
# jobs inherit the environment of their submitter, so a requeued job gets the same ones.

# Where the wrappers and the repository are (the directory of this file and its parent).
SUBMIT_SCRIPTS_DIR="${SUBMIT_SCRIPTS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
REPO_DIR="${REPO_DIR:-$(dirname "$SUBMIT_SCRIPTS_DIR")}"

# ---------------------------------------------------------------------------- how jobs run
# RUNTIME=venv: activate VENV_DIR on every node (the repository's .venv by default).
# RUNTIME=container: srun runs each node's launcher in a container, either a CSCS Container
# Engine environment (CONTAINER_ENVIRONMENT: an EDF name or .toml path, `srun --environment`;
# see installation/container/env.toml) or, with plain pyxis/enroot, CONTAINER_IMAGE (a squashfs
# or registry reference, `srun --container-image`) with CONTAINER_MOUNTS (src:dst[,src:dst...]).
# In both cases mount the repository at the same path inside the container.
RUNTIME="${RUNTIME:-venv}"
VENV_DIR="${VENV_DIR:-$REPO_DIR/.venv}"
CONTAINER_ENVIRONMENT="${CONTAINER_ENVIRONMENT:-}"
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
CONTAINER_WORKDIR="${CONTAINER_WORKDIR:-$REPO_DIR}"

# Accelerator devices per node: accelerate starts DEVICES_PER_NODE processes per node, and
# generate_submit.py reads this value to compute gradient accumulation (1 on a CPU machine).
DEVICES_PER_NODE="${DEVICES_PER_NODE:-1}"

# --------------------------------------------------------------------------- requeueing
# A recursive job is attempt RETRY_COUNT (0 first); at most MAX_RETRIES successors follow it.
MAX_RETRIES="${MAX_RETRIES:-5}"
# SLURM signals the batch shell this many seconds before the wall time (B:USR1@<seconds>); the
# trainer then saves a checkpoint and exits 75. Leave enough time to write a full checkpoint.
# SLURM checks time limits every ~30 s, so the signal can come up to 30 s earlier.
export SBATCH_SIGNAL="${SBATCH_SIGNAL:-B:USR1@300}"
# Seconds between repeats of a stop signal that reached a node before the trainer was ready.
STOP_RESEND_SECONDS="${STOP_RESEND_SECONDS:-15}"

# ------------------------------------------------------------------- cluster and account
# Any other sbatch option as an SBATCH_* variable (see `man sbatch`, INPUT ENVIRONMENT
# VARIABLES), e.g. on CSCS Alps (GH200 nodes, 4 GPUs each):
#   export SBATCH_ACCOUNT=a-myproject
#   export SBATCH_PARTITION=normal
#   export SBATCH_GPUS_PER_NODE=4
#   DEVICES_PER_NODE=4
#   RUNTIME=container
#   CONTAINER_ENVIRONMENT=post-training        # ~/.edf/post-training.toml

# ------------------------------------------------------------------ environment of jobs
export POST_TRAINING_ARTIFACTS_DIR="${POST_TRAINING_ARTIFACTS_DIR:-$REPO_DIR/artifacts}"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" # compute nodes read models from the cache only
export WANDB_CACHE_DIR="${WANDB_CACHE_DIR:-$HOME/.cache/wandb}"
export WANDB_CONFIG_DIR="${WANDB_CONFIG_DIR:-$HOME/.config/wandb}"
# wandb runs are written into each run dir (offline unless WANDB_API_KEY is set); sync them
# later with `python -m post_training.launch.sync_wandb`.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONUNBUFFERED=1

export SUBMIT_SCRIPTS_DIR REPO_DIR RUNTIME VENV_DIR CONTAINER_ENVIRONMENT CONTAINER_IMAGE \
  CONTAINER_MOUNTS CONTAINER_WORKDIR DEVICES_PER_NODE MAX_RETRIES STOP_RESEND_SECONDS
