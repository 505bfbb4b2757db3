#!/usr/bin/env bash
# Runs `accelerate launch <args>` on every node of a SLURM allocation, unattended:
#
#   sbatch [sbatch options] unattended-accelerate.sh [accelerate launch options] \
#       -m post_training.train_sft [hydra overrides...]
#
# The batch shell starts one task per node with srun (in the container or venv that setup.sh
# configures); each task runs `accelerate launch` with --num_machines, --num_processes
# (nodes × DEVICES_PER_NODE), --machine_rank and --main_process_ip/--main_process_port taken
# from SLURM's variables, followed by the arguments given here.
#
# Stopping before the wall time: SLURM sends USR1 to the batch shell (--signal=B:USR1@<s>); the
# batch shell forwards it to srun, which delivers it to every process of the step; on each node
# the task shell also sends it to the launcher's process group (and repeats it every
# STOP_RESEND_SECONDS while training runs, in case it arrived before the trainer was listening).
# The launcher itself ignores USR1; the trainer saves a checkpoint and exits 75, and this script
# exits 75 too. SIGTERM (preemption, scancel) is forwarded the same way.
#
# Outside a SLURM job, `bash unattended-accelerate.sh <args>` runs the launcher on this machine.
# recursive-unattended-accelerate.sh sources this file for its functions.
#
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300

ua_log() {
  printf '[%s %s] %s\n' "$(date '+%F %T')" "${UA_NAME:-unattended-accelerate}" "$*"
}

ua_die() {
  ua_log "error: $*" >&2
  exit 2
}

# The directory of the wrappers: SUBMIT_SCRIPTS_DIR (exported by setup.sh, which submit.sh
# sources), else this file's directory, else the script path SLURM recorded for the job (a
# batch job runs a spool copy of its script, so $0 does not point into the repository).
ua_scripts_dir() {
  if [[ -n ${SUBMIT_SCRIPTS_DIR:-} && -f $SUBMIT_SCRIPTS_DIR/setup.sh ]]; then
    printf '%s\n' "$SUBMIT_SCRIPTS_DIR"
    return 0
  fi
  local here
  here=$(dirname "${BASH_SOURCE[0]}")
  if [[ -f $here/setup.sh ]]; then
    (cd "$here" && pwd)
    return 0
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    local command
    command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')
    command="${command%%.sh*}.sh"
    if [[ -f $(dirname "$command")/setup.sh ]]; then
      dirname "$command"
      return 0
    fi
  fi
  return 1
}

ua_setup() {
  SUBMIT_SCRIPTS_DIR=$(ua_scripts_dir) ||
    ua_die "cannot find setup.sh: export SUBMIT_SCRIPTS_DIR=<repo>/cscs-shared-submit-scripts"
  export SUBMIT_SCRIPTS_DIR
  # shellcheck source=setup.sh
  source "$SUBMIT_SCRIPTS_DIR/setup.sh"
}

# Signal forwarding. UA_CHILD is the process the shell waits for; with UA_GROUP=1 it leads its
# own process group and the whole group is signalled.
UA_CHILD=""
UA_GROUP=0
UA_STOP_SIGNAL=""
UA_RESENDER=""

ua_install_traps() {
  trap 'ua_forward USR1' USR1
  trap 'ua_forward TERM' TERM
  trap 'ua_interrupt' INT
}

# Ctrl-C outside SLURM: the launcher runs in its own process group, so pass it on (no resume).
ua_interrupt() {
  if [[ -n $UA_CHILD ]]; then
    if ((UA_GROUP)); then
      kill -s INT -- "-$UA_CHILD" 2>/dev/null || true
    else
      kill -s INT "$UA_CHILD" 2>/dev/null || true
    fi
  else
    exit 130
  fi
}

ua_forward() {
  local sig=$1
  UA_STOP_SIGNAL=$sig
  if [[ -z $UA_CHILD ]]; then
    ua_log "received SIG$sig before the launch: not launching"
    return 0
  fi
  if ((UA_GROUP)); then
    ua_log "received SIG$sig: forwarding it to the launcher's process group $UA_CHILD"
    kill -s "$sig" -- "-$UA_CHILD" 2>/dev/null || true
    if [[ $sig == USR1 && -z $UA_RESENDER ]]; then
      # Repeat the stop request: one that came while the trainer was still starting up hit an
      # ignored handler. The trainer treats repeats as one request. (Own process group, so
      # that it goes away with its sleep.)
      set -m
      (
        trap '' USR1
        while sleep "${STOP_RESEND_SECONDS:-15}" && kill -0 "$UA_CHILD" 2>/dev/null; do
          kill -s USR1 -- "-$UA_CHILD" 2>/dev/null || true
        done
      ) &
      UA_RESENDER=$!
      set +m
    fi
  else
    ua_log "received SIG$sig: forwarding it to process $UA_CHILD"
    kill -s "$sig" "$UA_CHILD" 2>/dev/null || true
  fi
}

# Wait for UA_CHILD while forwarding USR1/TERM; returns its exit code, or 75 (EX_TEMPFAIL, as
# the trainer) when it was stopped by a forwarded signal and did not exit 0.
ua_wait_forwarding() {
  UA_CHILD=$1
  UA_GROUP=$2
  ua_install_traps
  # A stop requested while the child was being started.
  [[ -z $UA_STOP_SIGNAL ]] || ua_forward "$UA_STOP_SIGNAL"
  local rc again
  while :; do
    wait "$UA_CHILD"
    rc=$?
    if ! kill -0 "$UA_CHILD" 2>/dev/null; then
      # A signal may have interrupted `wait` just as the child ended: collect its status.
      if ((rc > 128)); then
        wait "$UA_CHILD" 2>/dev/null
        again=$?
        ((again == 127)) || rc=$again
      fi
      break
    fi
  done
  if ((UA_GROUP)) && [[ -n $UA_STOP_SIGNAL ]]; then
    # Stopping: wait for every process of the launcher's group (the trainer may outlive a
    # launcher that died of the signal) before the step may end.
    while kill -0 -- "-$UA_CHILD" 2>/dev/null; do
      sleep 1
    done
  fi
  trap - USR1 TERM INT
  if [[ -n $UA_RESENDER ]]; then
    kill -- "-$UA_RESENDER" 2>/dev/null || true
    UA_RESENDER=""
  fi
  if [[ -n $UA_STOP_SIGNAL ]] && ((rc != 0)); then
    ua_log "stopped by SIG$UA_STOP_SIGNAL (exit code $rc): exiting 75 so that a successor resumes"
    rc=75
  fi
  UA_CHILD=""
  return "$rc"
}

# One node: accelerate launch in its own process group, USR1 and TERM ignored by the launcher.
ua_node() {
  if [[ $RUNTIME == venv ]]; then
    [[ -f $VENV_DIR/bin/activate ]] || ua_die "no venv at VENV_DIR=$VENV_DIR"
    # shellcheck source=/dev/null
    source "$VENV_DIR/bin/activate"
  fi
  local machines=${SLURM_NNODES:-1}
  local rank=${SLURM_NODEID:-0}
  local launch=(
    accelerate launch
    --num_machines "$machines"
    --num_processes "$((machines * DEVICES_PER_NODE))"
    --machine_rank "$rank"
    --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}"
    --main_process_port "${MAIN_PROCESS_PORT:-29500}"
  )
  ua_log "node $rank of $machines on $(hostname): ${launch[*]} $*"
  ua_stopped_before_launch && return 75
  # The launcher inherits ignored USR1 and TERM: it must outlive the trainer, which handles
  # them (checkpoint, exit 75), or the step would end and SLURM kill the trainer mid-save.
  # (torchrun's agent handles TERM itself: it forwards it and kills the workers 30 s later.)
  # It gets a process group of its own, which the forwarding signals as a whole.
  trap '' USR1 TERM
  set -m
  "${launch[@]}" "$@" &
  local pid=$!
  set +m
  ua_wait_forwarding "$pid" 1
}

ua_stopped_before_launch() {
  [[ -n $UA_STOP_SIGNAL ]] || return 1
  ua_log "stopped by SIG$UA_STOP_SIGNAL before the launch: exiting 75 so that a successor runs"
}

# The batch shell: one task per node with srun.
ua_all_nodes() {
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  if [[ -z ${MAIN_PROCESS_IP:-} ]]; then
    MAIN_PROCESS_IP=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)
    MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(hostname)}
  fi
  MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 40000))}
  export MAIN_PROCESS_IP MAIN_PROCESS_PORT
  local srun_options=(--nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  case $RUNTIME in
    venv) ;;
    container)
      if [[ -n $CONTAINER_ENVIRONMENT ]]; then
        srun_options+=(--environment="$CONTAINER_ENVIRONMENT")
      elif [[ -n $CONTAINER_IMAGE ]]; then
        srun_options+=(--container-image="$CONTAINER_IMAGE")
        srun_options+=(--container-workdir="$CONTAINER_WORKDIR")
        [[ -z $CONTAINER_MOUNTS ]] || srun_options+=(--container-mounts="$CONTAINER_MOUNTS")
      else
        ua_die "RUNTIME=container needs CONTAINER_ENVIRONMENT or CONTAINER_IMAGE (setup.sh)"
      fi
      ;;
    *) ua_die "RUNTIME must be venv or container, got '$RUNTIME' (setup.sh)" ;;
  esac
  ua_log "job ${SLURM_JOB_ID:-?}: $nodes node(s) × $DEVICES_PER_NODE device(s), $RUNTIME," \
    "rendezvous $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
  ua_stopped_before_launch && return 75
  srun "${srun_options[@]}" bash "$SUBMIT_SCRIPTS_DIR/unattended-accelerate.sh" --node "$@" &
  ua_wait_forwarding "$!" 0
}

ua_main() {
  ua_install_traps
  ua_setup
  if [[ ${1:-} == --node ]]; then
    shift
    ua_node "$@"
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    ua_all_nodes "$@"
  else
    ua_node "$@"
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -uo pipefail
  ua_main "$@"
  exit $?
fi
