# shellcheck shell=bash
# launch/common.sh — the one home of the launch logic for megatron-student.
#
# Sourced by launch/stage_{a,b,c}.slurm and launch/torchrun.sh, which only set their defaults
# (config file, job name; the #SBATCH headers carry time and nodes) and then call
#   ms_launch_slurm "$@"      (stage scripts)   or   ms_launch_local "$@"   (torchrun.sh)
# where "$@" are extra key=value overrides handed to `megatron-student train CONFIG key=value ...`.
#
# Executed (not sourced) as `bash launch/common.sh _task rank|node CMD ...` it is the per-task wrapper
# that srun runs on every node: activate the Python env, export the rank variables, cd, exec CMD.
#
# Every setting below is an environment variable with a default; set it on the command line
# (VAR=value sbatch launch/stage_b.slurm key=value ...) or export it before sbatch (sbatch exports
# the submitting environment by default).
#
#   CONFIG            training config (relative paths are relative to REPO_DIR)      [per stage]
#   REPO_DIR          repository root; default: the directory above this file
#   LAUNCHER          srun     one task per GPU, ranks from SLURM_PROCID/NTASKS/LOCALID (default)
#                     torchrun one torchrun per node, c10d rendezvous on the first node
#   GPUS_PER_NODE     GPUs (= ranks) per node; default SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE, else 8
#   MASTER_ADDR       default: first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
#   MASTER_PORT       default: 61000 + SLURM_JOB_ID % 4536 (the enroot/pyxis convention)
#   LOG_DIR           default REPO_DIR/logs; each job gets LOG_DIR/<job name>-<job id>/ holding
#                     env.txt and command.txt (and rank-N.out files with PER_TASK_LOGS=1)
#   PER_TASK_LOGS     1: srun writes one file per task into the job's log directory (default 0:
#                     everything goes to logs/%x-%j.out, lines prefixed with the task id)
#   OUTPUT_DIR        when set, the trainer writes checkpoints to OUTPUT_DIR/checkpoints and logs to
#                     OUTPUT_DIR/logs (checkpoint.dir / logging.dir overrides; default: the config's)
#   ENV_ACTIVATE      script sourced in every task before training (a venv's bin/activate, a conda
#                     or module setup script); default REPO_DIR/.venv/bin/activate when it exists
#   CONTAINER_IMAGE   optional pyxis/enroot image (srun --container-image); CONTAINER_MOUNTS
#                     (default REPO_DIR:REPO_DIR), CONTAINER_WORKDIR (default REPO_DIR)
#   TRAIN_BIN         the trainer executable (default megatron-student)
#   SRUN_ARGS         extra srun arguments (word-split), e.g. "--mpi=pmix --cpu-bind=none"
#   TORCHRUN_ARGS     extra torchrun arguments (word-split)
#   OMP_NUM_THREADS   default SLURM_CPUS_PER_TASK, else 8 (16 CPU threads per GPU is typical)
#   CUDA_DEVICE_MAX_CONNECTIONS  1 (needed by Megatron's TP/SP communication overlap ordering)
#   NCCL_DEBUG        default WARN; NCCL_DEBUG_SUBSYS, NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
#                     NCCL_IB_GID_INDEX, NCCL_IB_TIMEOUT, NCCL_IB_SL, NCCL_NET_GDR_LEVEL,
#                     NCCL_CROSS_NIC, NCCL_NVLS_ENABLE … are passed through unchanged when set.
#                     NCCL_NVLS_ENABLE=0 (optional) turns NVLink SHARP/multicast off, for nodes or
#                     containers where multicast objects cannot be created (NCCL hangs or fails at init).
#   DEVICE            gpu (default) or cpu: CPU ranks with gloo (CUDA_VISIBLE_DEVICES empty, GPUS_PER_NODE
#                     counts tasks: SLURM_NTASKS_PER_NODE, OMP_NUM_THREADS default SLURM_CPUS_PER_TASK else 1).
#                     The stage scripts' #SBATCH headers request GPUs: submit with
#                     `DEVICE=cpu sbatch --gpus-per-node=0 --ntasks-per-node=N launch/stage_a.slurm ...`.
#   REQUEUE           1 (default): when the trainer stops gracefully (exit status 75: SIGTERM from preemption
#                     or `scancel --signal=TERM`, the early warning of `sbatch --signal=USR1@120`, or its
#                     exit.duration_minutes budget) after writing a checkpoint, requeue the job if Slurm lets it
#                     (`scontrol show job` says Requeue=1: `sbatch --requeue` or the cluster's JobRequeue=1);
#                     the requeued job resumes from the checkpoint. 0: never; the job ends with status 75 and
#                     the same sbatch command resumes it.
#   DRY_RUN           1: print the resolved environment and command(s), exit 0, launch nothing;
#                     works without Slurm (placeholders: one node, MASTER_ADDR=localhost).
#   CP                context-parallel size: passed as the override parallel.cp=CP (each packed sequence split
#                     into CP contiguous chunks, one per rank; README "Stage C with context parallelism"). The
#                     world size must be a multiple of CP (and of TP × CP; the trainer checks that). Unset: the
#                     config's parallel.cp.

set -euo pipefail

MS_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MS_COMMON="$MS_LAUNCH_DIR/common.sh"
MS_RESUMABLE_EXIT=75   # megatron-student train: stopped gracefully with a checkpoint (train/graceful_stop.py)

ms_die() { echo "launch error: $*" >&2; exit 1; }
ms_log() { echo "[launch] $*" >&2; }

# NCCL/network variables shown and passed through when the user sets them.
MS_NCCL_PASSTHROUGH=(NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_NVLS_ENABLE NCCL_SOCKET_IFNAME NCCL_IB_HCA
  NCCL_IB_GID_INDEX NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_IB_SL NCCL_IB_QPS_PER_CONNECTION
  NCCL_NET_GDR_LEVEL NCCL_CROSS_NIC NCCL_ALGO NCCL_PROTO NCCL_P2P_LEVEL NCCL_ASYNC_ERROR_HANDLING
  TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT GLOO_SOCKET_IFNAME UCX_NET_DEVICES)

# ---------------------------------------------------------------------------------------------------
# Common resolution: repo, config, overrides, environment.
# ---------------------------------------------------------------------------------------------------
ms_resolve_common() {
  ms_resolve_env
  [[ -n "${CONFIG:-}" ]] || ms_die "CONFIG is not set"
  if [[ "$CONFIG" != /* ]]; then CONFIG="$REPO_DIR/$CONFIG"; fi
  [[ -f "$CONFIG" ]] || ms_die "config file not found: $CONFIG (set CONFIG=path/to/config.yaml)"

  local kv
  for kv in "${MS_OVERRIDES[@]+"${MS_OVERRIDES[@]}"}"; do
    [[ "$kv" == *=* && "$kv" != =* ]] || ms_die "override '$kv' is not of the form key=value"
  done
  if [[ -n "${CP:-}" ]]; then
    [[ "$CP" =~ ^[1-9][0-9]*$ ]] || ms_die "CP must be a positive integer (the context-parallel size), got '$CP'"
    MS_OVERRIDES+=("parallel.cp=$CP")
  fi
  if [[ -n "${OUTPUT_DIR:-}" ]]; then
    MS_OVERRIDES+=("checkpoint.dir=$OUTPUT_DIR/checkpoints" "logging.dir=$OUTPUT_DIR/logs")
  fi
  MS_TRAIN_CMD=("$TRAIN_BIN" train "$CONFIG" "${MS_OVERRIDES[@]+"${MS_OVERRIDES[@]}"}")
}

# Repository, Python environment and the exported runtime variables (every launch).
ms_resolve_env() {
  REPO_DIR="${REPO_DIR:-$(dirname "$MS_LAUNCH_DIR")}"
  REPO_DIR="$(cd "$REPO_DIR" && pwd)" || ms_die "REPO_DIR does not exist: $REPO_DIR"
  DRY_RUN="${DRY_RUN:-0}"
  TRAIN_BIN="${TRAIN_BIN:-megatron-student}"
  DEVICE="${DEVICE:-gpu}"
  [[ "$DEVICE" == gpu || "$DEVICE" == cpu ]] || ms_die "DEVICE must be gpu or cpu, got '$DEVICE'"
  LOG_DIR="${LOG_DIR:-$REPO_DIR/logs}"
  if [[ -z "${ENV_ACTIVATE+x}" && -f "$REPO_DIR/.venv/bin/activate" ]]; then
    ENV_ACTIVATE="$REPO_DIR/.venv/bin/activate"
  fi
  ENV_ACTIVATE="${ENV_ACTIVATE:-}"
  if [[ -n "$ENV_ACTIVATE" && ! -f "$ENV_ACTIVATE" && -z "${CONTAINER_IMAGE:-}" ]]; then
    ms_die "ENV_ACTIVATE file not found: $ENV_ACTIVATE"
  fi

  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  [[ "$CUDA_DEVICE_MAX_CONNECTIONS" == 1 ]] || \
    ms_log "warning: CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS (Megatron's TP/SP overlap expects 1)"
  if [[ "$DEVICE" == cpu ]]; then
    export CUDA_VISIBLE_DEVICES=""     # torch sees no GPU: CPU tensors, gloo process groups
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
  fi
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export PYTHONUNBUFFERED=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
  export REPO_DIR ENV_ACTIVATE DEVICE
}

# Print the resolved environment (the variables this launcher sets or passes through).
ms_print_env() {
  local v
  echo "# environment"
  for v in REPO_DIR CONFIG DEVICE LAUNCHER JOB_NAME JOB_ID NNODES GPUS_PER_NODE WORLD_SIZE CP MASTER_ADDR MASTER_PORT \
           NODELIST LOG_DIR JOB_LOG_DIR ENV_ACTIVATE CONTAINER_IMAGE CONTAINER_MOUNTS CONTAINER_WORKDIR \
           CUDA_VISIBLE_DEVICES CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS PYTHONUNBUFFERED "${MS_NCCL_PASSTHROUGH[@]}"; do
    if [[ -n "${!v+x}" && -n "${!v}" ]]; then printf '%s=%q\n' "$v" "${!v}"; fi
  done
}

# The world size must split into context-parallel groups of CP ranks.
ms_check_cp() {
  if [[ -n "${CP:-}" ]] && (( WORLD_SIZE % CP )); then
    ms_die "CP=$CP does not divide the world size $WORLD_SIZE (ranks = nodes x GPUs per node)"
  fi
}

ms_quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# Write env.txt/command.txt into the job's log directory (real launches only).
ms_record() {
  mkdir -p "$JOB_LOG_DIR"
  ms_print_env > "$JOB_LOG_DIR/env.txt"
  ms_quote "$@" > "$JOB_LOG_DIR/command.txt"
  ms_log "job log directory: $JOB_LOG_DIR"
}

# ---------------------------------------------------------------------------------------------------
# Multi-node launch under Slurm (stage scripts).
# ---------------------------------------------------------------------------------------------------
ms_launch_slurm() {
  MS_OVERRIDES=("$@")
  ms_resolve_common
  LAUNCHER="${LAUNCHER:-srun}"
  [[ "$LAUNCHER" == srun || "$LAUNCHER" == torchrun ]] || ms_die "LAUNCHER must be srun or torchrun, got '$LAUNCHER'"

  local in_slurm=0
  [[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
  if [[ $in_slurm == 0 && "$DRY_RUN" != 1 ]]; then
    ms_die "not inside a Slurm allocation (SLURM_JOB_ID unset): submit with sbatch, use DRY_RUN=1," \
           "or launch/torchrun.sh for one node"
  fi

  # Placeholders for a dry run outside Slurm: one node, localhost.
  JOB_ID="${SLURM_JOB_ID:-dryrun}"
  JOB_NAME="${JOB_NAME:-${SLURM_JOB_NAME:-$MS_DEFAULT_JOB_NAME}}"
  NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
  NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}"
  if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "$DEVICE" == gpu ]]; then GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE%%(*}"
    elif [[ -n "${SLURM_NTASKS:-}" ]]; then GPUS_PER_NODE=$(( SLURM_NTASKS / NNODES ))
    else GPUS_PER_NODE=8; fi
  fi
  WORLD_SIZE=$(( NNODES * GPUS_PER_NODE ))
  if [[ -n "${SLURM_NTASKS:-}" && "$LAUNCHER" == srun && "$SLURM_NTASKS" != "$WORLD_SIZE" ]]; then
    ms_log "warning: SLURM_NTASKS=$SLURM_NTASKS but NNODES*GPUS_PER_NODE=$WORLD_SIZE; using $WORLD_SIZE tasks"
  fi
  ms_check_cp

  if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ $in_slurm == 1 ]] && command -v scontrol >/dev/null 2>&1; then
      local hosts; hosts="$(scontrol show hostnames "$NODELIST")" || ms_die "scontrol show hostnames '$NODELIST' failed"
      MASTER_ADDR="${hosts%%$'\n'*}"
    elif [[ "$NODELIST" =~ ^[A-Za-z0-9._-]+$ ]]; then
      MASTER_ADDR="$NODELIST"            # a single plain host name needs no expansion
    elif [[ "$DRY_RUN" == 1 ]]; then
      MASTER_ADDR="localhost"; ms_log "dry run: scontrol unavailable, MASTER_ADDR placeholder localhost"
    else
      ms_die "cannot resolve MASTER_ADDR from '$NODELIST' (scontrol not found); set MASTER_ADDR"
    fi
  fi
  [[ -n "$MASTER_ADDR" ]] || ms_die "MASTER_ADDR resolved to an empty string from '$NODELIST'"
  if [[ -z "${MASTER_PORT:-}" ]]; then
    if [[ "$JOB_ID" =~ ^[0-9]+$ ]]; then MASTER_PORT=$(( 61000 + JOB_ID % 4536 )); else MASTER_PORT=29500; fi
  fi
  JOB_LOG_DIR="$LOG_DIR/$JOB_NAME-$JOB_ID"
  export MASTER_ADDR MASTER_PORT WORLD_SIZE GPUS_PER_NODE NNODES

  local srun_cmd=(srun "--nodes=$NNODES" --kill-on-bad-exit=1)
  if [[ "$LAUNCHER" == srun ]]; then
    srun_cmd+=("--ntasks=$WORLD_SIZE" "--ntasks-per-node=$GPUS_PER_NODE")
  else
    srun_cmd+=("--ntasks=$NNODES" --ntasks-per-node=1)
  fi
  if [[ "${PER_TASK_LOGS:-0}" == 1 ]]; then
    srun_cmd+=("--output=$JOB_LOG_DIR/rank-%t.out")
  else
    srun_cmd+=(--label)
  fi
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
    CONTAINER_WORKDIR="${CONTAINER_WORKDIR:-$REPO_DIR}"
    srun_cmd+=("--container-image=$CONTAINER_IMAGE" "--container-mounts=$CONTAINER_MOUNTS"
               "--container-workdir=$CONTAINER_WORKDIR")
  fi
  # shellcheck disable=SC2206
  [[ -n "${SRUN_ARGS:-}" ]] && srun_cmd+=($SRUN_ARGS)

  local inner
  if [[ "$LAUNCHER" == srun ]]; then
    inner=(bash "$MS_COMMON" _task rank "${MS_TRAIN_CMD[@]}")
  else
    local torchrun_cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
      --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" --max-restarts 0)
    # shellcheck disable=SC2206
    [[ -n "${TORCHRUN_ARGS:-}" ]] && torchrun_cmd+=($TORCHRUN_ARGS)
    inner=(bash "$MS_COMMON" _task node "${torchrun_cmd[@]}" --no-python "${MS_TRAIN_CMD[@]}")
  fi

  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# megatron-student launch — DRY RUN (nothing is started)"
    ms_print_env
    if [[ "$LAUNCHER" == srun ]]; then
      echo "# per task (set by the task wrapper): RANK=\$SLURM_PROCID WORLD_SIZE=$WORLD_SIZE" \
           "LOCAL_RANK=\$SLURM_LOCALID NODE_RANK=\$SLURM_NODEID LOCAL_WORLD_SIZE=$GPUS_PER_NODE"
      if [[ -n "${SLURM_PROCID:-}" ]]; then
        echo "# this task: RANK=$SLURM_PROCID LOCAL_RANK=${SLURM_LOCALID:-0} WORLD_SIZE=$WORLD_SIZE"
      fi
    else
      echo "# per node: torchrun starts $GPUS_PER_NODE ranks and sets RANK/LOCAL_RANK/WORLD_SIZE=$WORLD_SIZE"
    fi
    [[ -n "$ENV_ACTIVATE" ]] && echo "# each task first sources: $ENV_ACTIVATE"
    echo "# command"
    ms_quote "${srun_cmd[@]}" "${inner[@]}"
    return 0
  fi

  ms_record "${srun_cmd[@]}" "${inner[@]}"
  ms_log "$JOB_NAME job $JOB_ID: $NNODES node(s) x $GPUS_PER_NODE ${DEVICE^^} rank(s), launcher $LAUNCHER," \
         "master $MASTER_ADDR:$MASTER_PORT${SLURM_RESTART_COUNT:+, restart $SLURM_RESTART_COUNT}"
  # Rank 0 writes MS_STOP_FILE after a graceful stop's checkpoint: srun's status can be another rank's 143, as
  # --kill-on-bad-exit terminates the ranks still exiting when the first one leaves with 75.
  export MS_STOP_FILE="$JOB_LOG_DIR/graceful-stop-${SLURM_RESTART_COUNT:-0}"
  rm -f "$MS_STOP_FILE"
  local rc=0
  "${srun_cmd[@]}" "${inner[@]}" || rc=$?
  if [[ $rc != 0 && -f "$MS_STOP_FILE" ]]; then
    ms_log "$(cat "$MS_STOP_FILE")"
    ms_requeue
    exit "$MS_RESUMABLE_EXIT"
  fi
  exit "$rc"
}

# The trainer stopped gracefully with a checkpoint (train/graceful_stop.py): put the job back in the queue when
# allowed (see REQUEUE above). A job being cancelled or preempted refuses the requeue; it ends.
ms_requeue() {
  if [[ "${REQUEUE:-1}" != 1 ]]; then
    ms_log "REQUEUE=$REQUEUE: not requeueing; resubmit to resume"
    return 0
  fi
  if ! scontrol show job "$SLURM_JOB_ID" | grep -qw 'Requeue=1'; then
    ms_log "job $SLURM_JOB_ID is not requeueable (sbatch --requeue): resubmit to resume"
    return 0
  fi
  ms_log "requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || ms_log "scontrol requeue $SLURM_JOB_ID refused: resubmit to resume"
}

# ---------------------------------------------------------------------------------------------------
# Export of a stage's checkpoint to the HF bundle under Slurm (launch/export.slurm): one process.
# ---------------------------------------------------------------------------------------------------
ms_launch_export() {
  ms_resolve_env
  [[ -n "${MEGATRON:-}" ]] || ms_die "MEGATRON is not set (a stage's checkpoint dir, e.g. OUTPUT_DIR/checkpoints)"
  [[ -n "${HF_OUTPUT:-}" ]] || ms_die "HF_OUTPUT is not set (the HF bundle directory to write)"
  JOB_ID="${SLURM_JOB_ID:-dryrun}"
  JOB_NAME="${JOB_NAME:-${SLURM_JOB_NAME:-$MS_DEFAULT_JOB_NAME}}"
  JOB_LOG_DIR="$LOG_DIR/$JOB_NAME-$JOB_ID"
  local cmd=(srun --nodes=1 --ntasks=1 bash "$MS_COMMON" _task node
             "$TRAIN_BIN" convert-megatron-to-hf --megatron "$MEGATRON" --output "$HF_OUTPUT" "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# megatron-student export — DRY RUN (nothing is started)"
    ms_print_env
    echo "# command"
    ms_quote "${cmd[@]}"
    return 0
  fi
  [[ -n "${SLURM_JOB_ID:-}" ]] || ms_die "not inside a Slurm allocation (SLURM_JOB_ID unset): submit with sbatch"
  ms_record "${cmd[@]}"
  "${cmd[@]}"
}

# ---------------------------------------------------------------------------------------------------
# Single-node launch with torchrun (launch/torchrun.sh).
# ---------------------------------------------------------------------------------------------------
ms_launch_local() {
  MS_OVERRIDES=("$@")
  ms_resolve_common
  LAUNCHER=torchrun
  if [[ -z "${GPUS:-}" && "$DEVICE" == cpu ]]; then
    GPUS=1
  elif [[ -z "${GPUS:-}" ]]; then
    GPUS=0
    command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$GPUS" -ge 1 ]] 2>/dev/null || GPUS=1
  fi
  [[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || ms_die "GPUS must be a positive integer, got '$GPUS'"
  GPUS_PER_NODE="$GPUS"; NNODES=1; WORLD_SIZE="$GPUS"
  ms_check_cp
  JOB_NAME="${JOB_NAME:-$MS_DEFAULT_JOB_NAME}"
  JOB_ID="${JOB_ID:-$(date +%Y%m%d-%H%M%S)-$$}"
  JOB_LOG_DIR="$LOG_DIR/$JOB_NAME-$JOB_ID"
  local torchrun_cmd=(torchrun --nnodes 1 "--nproc_per_node=$GPUS")
  if [[ -n "${MASTER_PORT:-}" ]]; then
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    torchrun_cmd+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  else
    torchrun_cmd+=(--standalone)          # picks a free port on this node
  fi
  # shellcheck disable=SC2206
  [[ -n "${TORCHRUN_ARGS:-}" ]] && torchrun_cmd+=($TORCHRUN_ARGS)
  torchrun_cmd+=(--no-python "${MS_TRAIN_CMD[@]}")

  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# megatron-student launch — DRY RUN (nothing is started)"
    ms_print_env
    [[ -n "$ENV_ACTIVATE" ]] && echo "# first sources: $ENV_ACTIVATE"
    echo "# command"
    ms_quote "${torchrun_cmd[@]}"
    return 0
  fi
  ms_record "${torchrun_cmd[@]}"
  if [[ -n "$ENV_ACTIVATE" ]]; then
    # shellcheck disable=SC1090
    source "$ENV_ACTIVATE"
  fi
  cd "$REPO_DIR"
  "${torchrun_cmd[@]}" 2>&1 | tee "$JOB_LOG_DIR/launch.out"
  return "${PIPESTATUS[0]}"
}

# ---------------------------------------------------------------------------------------------------
# Per-task wrapper, run by srun on each node: bash launch/common.sh _task rank|node CMD ...
# ---------------------------------------------------------------------------------------------------
ms_task() {
  local mode="$1"; shift
  if [[ -n "${ENV_ACTIVATE:-}" ]]; then
    [[ -f "$ENV_ACTIVATE" ]] || ms_die "ENV_ACTIVATE file not found on $(hostname): $ENV_ACTIVATE"
    # shellcheck disable=SC1090
    set +u; source "$ENV_ACTIVATE"; set -u
  fi
  cd "${REPO_DIR:-$(dirname "$MS_LAUNCH_DIR")}"
  if [[ "$mode" == rank ]]; then
    [[ -n "${SLURM_PROCID:-}" ]] || ms_die "_task rank: SLURM_PROCID is not set (run it through srun)"
    export RANK="$SLURM_PROCID"
    export WORLD_SIZE="${SLURM_NTASKS:-$WORLD_SIZE}"
    export LOCAL_RANK="${SLURM_LOCALID:-0}"
    export NODE_RANK="${SLURM_NODEID:-0}"
    export LOCAL_WORLD_SIZE="${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
  elif [[ "$mode" != node ]]; then
    ms_die "_task mode must be rank or node, got '$mode'"
  fi
  exec "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  [[ "${1:-}" == _task ]] || ms_die "common.sh is sourced by the launch scripts; run launch/stage_*.slurm or launch/torchrun.sh"
  shift
  ms_task "$@"
fi
