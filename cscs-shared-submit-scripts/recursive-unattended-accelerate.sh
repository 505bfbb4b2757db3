#!/usr/bin/env bash
# unattended-accelerate.sh that requeues itself until the run completes:
#
#   sbatch --job-name=<name> --nodes=<n> --time=<wall time> --output=<out> --error=<err> \
#       recursive-unattended-accelerate.sh [accelerate launch options] \
#       -m post_training.train_sft resuming.resume=true [hydra overrides...]
#
# On start, attempt RETRY_COUNT (0 for the first job) submits its successor: a copy of this
# script with the same arguments and options, RETRY_COUNT+1, stdout/stderr suffixed -retry<N>,
# and --dependency=afternotok:<this job>, so it starts only if this job fails: stopped by the
# USR1 that SLURM sends before the wall time (--signal=B:USR1@<s>, default in setup.sh; the
# trainer checkpoints and exits 75), timed out, preempted, or crashed. The run then resumes
# from its last checkpoint (the command must resume: resuming.resume=true). When the run
# succeeds, the job cancels the successor. Attempt MAX_RETRIES submits none.
#
# Options carried over to the successor: job name, nodes, time limit, partition, account,
# QoS, reservation, stdout/stderr and the array index (each array task requeues alone); give
# any other option as an SBATCH_* variable in setup.sh (or at the top of submit.sh), which
# sbatch reads and every successor inherits.
# Stop a chain: `scancel --name=<name>` (the successor of a cancelled job would start).
#
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300

# This script runs as a spool copy: find the wrappers from the environment that setup.sh
# exported (submit.sh sources it), else from the path that SLURM recorded for the job.
rua_scripts_dir() {
  if [[ -n ${SUBMIT_SCRIPTS_DIR:-} ]]; then
    printf '%s\n' "$SUBMIT_SCRIPTS_DIR"
  elif [[ -f $(dirname "$0")/unattended-accelerate.sh ]]; then
    (cd "$(dirname "$0")" && pwd)
  else
    local command
    command=$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/^ *Command=//p')
    command="${command%%.sh*}.sh"
    dirname "$command"
  fi
}

# <dir>/<name>[-retryK][.ext] -> <dir>/<name>-retry<N>[.ext]. scontrol shows the file name as
# sbatch must be given it again (%j, %a expanded; a literal % still written %%).
rua_retry_path() {
  local path=$1 attempt=$2
  local dir="" base=$path stem ext=""
  if [[ $path == */* ]]; then
    dir="${path%/*}/"
    base=${path##*/}
  fi
  stem=$base
  if [[ $base == ?*.* ]]; then
    stem=${base%.*}
    ext=.${base##*.}
  fi
  [[ $stem =~ ^(.*)-retry[0-9]+$ ]] && stem=${BASH_REMATCH[1]}
  printf '%s\n' "$dir$stem-retry$attempt$ext"
}

rua_job_field() {
  scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n "s/^ *$1=//p" | head -n 1
}

rua_submit_successor() {
  local attempt=$1
  shift
  local stdout stderr time_limit
  stdout=$(rua_job_field StdOut)
  stderr=$(rua_job_field StdErr)
  time_limit=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
    sed -n 's/.*TimeLimit=\([^ ]*\).*/\1/p' | head -n 1)
  local options=(
    --parsable
    --dependency="afternotok:$SLURM_JOB_ID"
    --job-name="$SLURM_JOB_NAME"
    --nodes="$SLURM_JOB_NUM_NODES"
  )
  [[ -z $stdout ]] || options+=(--output="$(rua_retry_path "$stdout" "$attempt")")
  [[ -z $stderr ]] || options+=(--error="$(rua_retry_path "$stderr" "$attempt")")
  [[ -z $time_limit || $time_limit == UNLIMITED ]] || options+=(--time="$time_limit")
  [[ -z ${SLURM_JOB_PARTITION:-} ]] || options+=(--partition="$SLURM_JOB_PARTITION")
  [[ -z ${SLURM_JOB_ACCOUNT:-} ]] || options+=(--account="$SLURM_JOB_ACCOUNT")
  case ${SLURM_JOB_QOS:-} in
    "" | normal | "(null)") ;;
    *) options+=(--qos="$SLURM_JOB_QOS") ;;
  esac
  [[ -z ${SLURM_JOB_RESERVATION:-} ]] || options+=(--reservation="$SLURM_JOB_RESERVATION")
  # An array task is retried alone, as a one-task array with the same index.
  [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] || options+=(--array="$SLURM_ARRAY_TASK_ID")
  RETRY_COUNT=$attempt sbatch "${options[@]}" "$0" "$@"
}

rua_main() {
  UA_NAME=recursive-unattended-accelerate
  local dir
  dir=$(rua_scripts_dir)
  # shellcheck source=unattended-accelerate.sh
  source "$dir/unattended-accelerate.sh" || {
    echo "cannot source $dir/unattended-accelerate.sh" >&2
    exit 2
  }
  ua_install_traps # a stop signal from now on is forwarded, or prevents the launch
  SUBMIT_SCRIPTS_DIR=$dir
  ua_setup
  [[ -n ${SLURM_JOB_ID:-} ]] || ua_die "submit this script with sbatch"

  local attempt=${RETRY_COUNT:-0}
  [[ $attempt =~ ^[0-9]+$ && $MAX_RETRIES =~ ^[0-9]+$ ]] ||
    ua_die "RETRY_COUNT ($attempt) and MAX_RETRIES ($MAX_RETRIES) must be integers"
  if ((attempt > MAX_RETRIES)); then
    ua_log "attempt $attempt is past MAX_RETRIES=$MAX_RETRIES: not running, not requeueing"
    exit 1
  fi

  local successor=""
  if ((attempt < MAX_RETRIES)); then
    local reply
    if reply=$(rua_submit_successor "$((attempt + 1))" "$@"); then
      successor=${reply%%;*}
      ua_log "attempt $attempt of job $SLURM_JOB_ID: submitted successor $successor" \
        "(retry $((attempt + 1)) of $MAX_RETRIES, afternotok:$SLURM_JOB_ID)"
    else
      ua_log "attempt $attempt: could not submit a successor; this attempt is not requeued" >&2
    fi
  else
    ua_log "attempt $attempt of job $SLURM_JOB_ID is the last (MAX_RETRIES=$MAX_RETRIES):" \
      "no successor"
  fi

  local rc=0
  ua_all_nodes "$@" || rc=$?
  if ((rc == 0)); then
    if [[ -n $successor ]]; then
      scancel "$successor" && ua_log "run completed: cancelled successor $successor"
    else
      ua_log "run completed"
    fi
  elif ((rc == 73)); then
    # EXIT_CODE_LOCKED: another launch of this job holds its checkpoint dir and trains it (and
    # has its own successor); retrying would only be refused again.
    if [[ -n $successor ]]; then
      scancel "$successor" && ua_log "another launch holds this job (exit 73): cancelled $successor"
    else
      ua_log "another launch holds this job (exit 73)"
    fi
  elif [[ -n $successor ]]; then
    ua_log "attempt $attempt ended with exit code $rc: successor $successor takes over"
  else
    ua_log "attempt $attempt ended with exit code $rc: no retry left"
  fi
  exit "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -uo pipefail
  rua_main "$@"
fi
