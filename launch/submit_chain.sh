#!/bin/bash
# Submit the stages as one Slurm dependency chain: A → B (→ C) → export. Each job waits for the previous one to
# succeed (--dependency=afterok) and each stage starts from the previous stage's final checkpoint
# (student.megatron=RUN_DIR/stage_<prev>/checkpoints); the export converts the last stage to an HF bundle.
#
#   RUN_DIR=runs/my-run launch/submit_chain.sh [a:key=value ...] [b:key=value ...] [key=value ...]
#
# "a:key=value" goes to stage A only (b:, c: likewise), "key=value" to every stage. Prints one line per job,
# "<name> <job id>" (stage_a, stage_b, ..., export). If a stage fails, the jobs after it stay pending with reason
# DependencyNeverSatisfied (scancel them). Submitting the same chain again resumes: each stage continues from
# its own checkpoints (checkpoint.resume), a finished stage returns at once.
#
#   RUN_DIR       required. Stage X writes RUN_DIR/stage_X/{checkpoints,logs} (OUTPUT_DIR), the export
#                 RUN_DIR/student_hf, Slurm output files RUN_DIR/logs/%x-%j.out.
#   STAGES        stages in order (default "a b"; "a b c" adds long context, "b c" starts from CONFIG_B's student)
#   CONFIG_A, CONFIG_B, CONFIG_C   per-stage configs (default: the stage scripts' configs/stage_*.yaml)
#   EXPORT        1 (default): an export job after the last stage (launch/export.slurm); 0: none
#   TEACHER_DIR   gpt-oss HF dir whose tokenizer files the export copies into the bundle (--teacher-dir)
#   AFTER         a job id the first stage waits for (afterok)
#   SBATCH_ARGS   extra sbatch arguments for every job (word-split), e.g.
#                 "--account=proj --partition=gpu --requeue --signal=USR1@120 --time=12:00:00"
#   DEVICE=cpu    CPU ranks (launch/common.sh): stage jobs are submitted with --gpus-per-node=0 and
#                 --ntasks-per-node=TASKS_PER_NODE (default 2)
# Other launch variables (ENV_ACTIVATE, LAUNCHER, NCCL_*, ...) reach the jobs through sbatch's environment export.
set -euo pipefail

die() { echo "submit_chain: error: $*" >&2; exit 1; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export REPO_DIR="${REPO_DIR:-$(dirname "$here")}"
[[ -n "${RUN_DIR:-}" ]] || die "RUN_DIR is not set (the directory of this run's stages and export)"
mkdir -p "$RUN_DIR/logs"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
export LOG_DIR="${LOG_DIR:-$RUN_DIR/logs}"
read -r -a stages <<< "${STAGES:-a b}"
[[ ${#stages[@]} -ge 1 ]] || die "STAGES is empty"

common=()
declare -A per_stage=()
for arg in "$@"; do
  if [[ "$arg" =~ ^([A-Za-z]):(.+)$ ]]; then
    [[ " ${stages[*]} " == *" ${BASH_REMATCH[1]} "* ]] ||
      die "'$arg': stage ${BASH_REMATCH[1]} is not in STAGES='${stages[*]}'"
    per_stage[${BASH_REMATCH[1]}]+="${BASH_REMATCH[2]}"$'\n'
  elif [[ "$arg" == *=* && "$arg" != =* ]]; then
    common+=("$arg")
  else
    die "argument '$arg' is neither key=value nor a:key=value / b:key=value / c:key=value"
  fi
done

sbatch_args=(--parsable "--output=$RUN_DIR/logs/%x-%j.out")
# shellcheck disable=SC2206
[[ -n "${SBATCH_ARGS:-}" ]] && sbatch_args+=($SBATCH_ARGS)
stage_args=()
[[ "${DEVICE:-gpu}" == cpu ]] && stage_args+=(--gpus-per-node=0 "--ntasks-per-node=${TASKS_PER_NODE:-2}")

previous="" dependency="${AFTER:+--dependency=afterok:$AFTER}"
unset CONFIG OUTPUT_DIR
for stage in "${stages[@]}"; do
  [[ "$stage" =~ ^[abc]$ ]] || die "STAGES: unknown stage '$stage' (a, b or c)"
  config_var="CONFIG_${stage^^}"
  overrides=("${common[@]+"${common[@]}"}")
  if [[ -n "$previous" ]]; then
    overrides+=("student.hf=null" "student.megatron=$RUN_DIR/stage_$previous/checkpoints")
  fi
  if [[ -n "${per_stage[$stage]:-}" ]]; then
    mapfile -t own < <(printf '%s' "${per_stage[$stage]}")
    overrides+=("${own[@]}")
  fi
  job=$(env ${!config_var:+CONFIG="${!config_var}"} OUTPUT_DIR="$RUN_DIR/stage_$stage" \
        sbatch "${sbatch_args[@]}" "${stage_args[@]+"${stage_args[@]}"}" ${dependency:+"$dependency"} \
        "$REPO_DIR/launch/stage_$stage.slurm" "${overrides[@]+"${overrides[@]}"}")
  job="${job%%;*}"
  echo "stage_$stage $job"
  previous="$stage" dependency="--dependency=afterok:$job"
done

if [[ "${EXPORT:-1}" == 1 ]]; then
  export_args=()
  [[ -n "${TEACHER_DIR:-}" ]] && export_args+=(--teacher-dir "$TEACHER_DIR")
  job=$(env MEGATRON="$RUN_DIR/stage_$previous/checkpoints" HF_OUTPUT="$RUN_DIR/student_hf" \
        sbatch "${sbatch_args[@]}" "$dependency" "$REPO_DIR/launch/export.slurm" \
        "${export_args[@]+"${export_args[@]}"}")
  echo "export ${job%%;*}"
fi
