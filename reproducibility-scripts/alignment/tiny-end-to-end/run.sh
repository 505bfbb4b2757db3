#!/usr/bin/env bash
# The whole alignment chain on the embedded tiny task, on CPU, in a few minutes:
#   SFT the tiny model -> filter prompts -> 4 reference completions per prompt (2 partitions)
#   -> reference log-probs -> rewards (tiny-task partial credit) -> QRPO pairs (the task's answer
#   vs the worst of the 4 completions; quantile rewards from the 4 completions' rewards)
#   -> merge -> QRPO training on the precomputed columns -> held-out exact match vs the SFT start.
# QRPO runs at beta 0.5 for 3 epochs at lr 1e-3: with TRL-like beta 0.1, beta*logZ is 0.77, so an
# answer a reward model ranks at quantile 0.5 of the 4 completions is pushed DOWN by 2.7 nats (and
# one epoch leaves the answer's log-ratio short of its target); at 0.5 every target is within
# +-0.84 nats of the reference.
#
#   bash reproducibility-scripts/alignment/tiny-end-to-end/run.sh
#
# Environment: POST_TRAINING_ARTIFACTS_DIR (default <repo>/artifacts), PYTHON (default: the
# repo's .venv/bin/python when it exists, else the python on PATH),
# NUM_PROMPTS (4000), SFT_STEPS (300), PARTITIONS (2), SFT_MODEL (skip SFT: use this checkpoint),
# REWARD_MODEL (score completions with this reward model, e.g. a train_reward final-model/,
# instead of the rule-based tiny_task_partial), SEED (42: QRPO's training seed).
# Re-running resumes: finished partitions are skipped. Prints one JSON line of results last.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
NUM_PROMPTS=${NUM_PROMPTS:-4000}
SFT_STEPS=${SFT_STEPS:-300}
SEED=${SEED:-42}
PARTITIONS=${PARTITIONS:-2}
JOB=tiny-end-to-end
COMMON=(wandb.mode=disabled tensorboard=false)
STAGE=(artifacts_subdir=tiny-end-to-end "dataset.max_train_examples=${NUM_PROMPTS}" wandb.mode=disabled)
ARTIFACTS=$("$PYTHON" -c 'from post_training.utils.config import default_artifacts_dir as d; print(d())')
ALIGNMENT_DIR="${ARTIFACTS}/tiny-end-to-end/alignment-data/tiny-tasks/tiny"

if [[ -z "${SFT_MODEL:-}" ]]; then
  "$PYTHON" -m post_training.train_sft "${COMMON[@]}" artifacts_subdir=tiny-end-to-end \
    job_subdir="$JOB-sft" resuming.resume=true training_args.num_train_epochs=null \
    "training_args.max_steps=${SFT_STEPS}" training_args.logging_steps=50
  SFT_MODEL=$(find "${ARTIFACTS}/tiny-end-to-end/outputs/train_sft/$JOB-sft" -type d -name final-model -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
fi
REFERENCE=("model.model_name_or_path=${SFT_MODEL}" model.init_from_config=false)

"$PYTHON" -m post_training.data_alignment.filter_dataset_for_model "${STAGE[@]}" "${REFERENCE[@]}"
for ((i = 0; i < PARTITIONS; i++)); do  # on SLURM: one array task each
  "$PYTHON" -m post_training.data_alignment.generate_ref_completions "${STAGE[@]}" "${REFERENCE[@]}" \
    generation.num_completions=4 generation.batch_size=256 \
    "partition.index=$i" "partition.count=${PARTITIONS}"
done
"$PYTHON" -m post_training.data_alignment.compute_ref_logprobs "${STAGE[@]}" "${REFERENCE[@]}"
REWARD=(reward.function=tiny_task_partial)
if [[ -n "${REWARD_MODEL:-}" ]]; then
  REWARD=(reward.function=null "reward.model.model_name_or_path=${REWARD_MODEL}")
fi
"$PYTHON" -m post_training.data_alignment.compute_rewards "${STAGE[@]}" "${REFERENCE[@]}" \
  "${REWARD[@]}"
"$PYTHON" -m post_training.data_alignment.prepare_train_dataset "${STAGE[@]}" "${REFERENCE[@]}" \
  'prepare.pairs=[answer_worst]' prepare.require_ref_logps=true
"$PYTHON" -m post_training.data_alignment.merge_partitions "${STAGE[@]}" "${REFERENCE[@]}" \
  stage=prepare_train_dataset

"$PYTHON" -m post_training.train_preference "${COMMON[@]}" artifacts_subdir=tiny-end-to-end \
  job_subdir="$JOB-qrpo" resuming.resume=true trainer=qrpo "seed=${SEED}" "${REFERENCE[@]}" \
  dataset=alignment-prepared \
  "dataset.train.path=${ALIGNMENT_DIR}/prepare_train_dataset/merged/rows.jsonl" \
  trainer.beta=0.5 training_args.learning_rate=1e-3 training_args.num_train_epochs=3 \
  training_args.logging_steps=5

QRPO_MODEL=$(find "${ARTIFACTS}/tiny-end-to-end/outputs/train_preference/$JOB-qrpo" -type d -name final-model -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
"$PYTHON" - "$SFT_MODEL" "$QRPO_MODEL" "$ALIGNMENT_DIR" <<'PY'
import json, sys
from pathlib import Path

sft, qrpo, alignment = (Path(p) for p in sys.argv[1:4])
def accuracy(model):
    path = model / "eval-tiny-tasks.json"
    if not path.is_file():
        from post_training.exact_match import evaluate_checkpoint
        from post_training.utils.config import asset_path
        dataset = {"name": "tiny-tasks", "train": {"path": asset_path("tiny-tasks/train.jsonl")},
                   "eval": {"path": asset_path("tiny-tasks/eval.jsonl")}}
        return evaluate_checkpoint(model, dataset)["accuracy"]
    return json.loads(path.read_text())["accuracy"]
merged = json.loads((alignment / "prepare_train_dataset/merged/manifest.json").read_text())
print(json.dumps({"sft_accuracy": accuracy(sft), "qrpo_accuracy": accuracy(qrpo),
                  "pairs": merged["rows"], "sft_model": str(sft), "qrpo_model": str(qrpo)}))
PY
