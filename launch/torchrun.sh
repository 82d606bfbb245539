#!/bin/bash
# One-node launch: torchrun with GPUS ranks (default: all GPUs nvidia-smi lists, else 1).
#
#   GPUS=8 launch/torchrun.sh [key=value ...]                      # CONFIG defaults to stage B
#   CONFIG=configs/stage_a_attn_only.yaml GPUS=4 launch/torchrun.sh training.train_iters=100
#   DRY_RUN=1 GPUS=8 launch/torchrun.sh                            # print the resolved command only
#   CONFIG=configs/stage_c_long_context.yaml GPUS=2 CP=2 launch/torchrun.sh   # context parallelism (parallel.cp)
#
# MASTER_PORT set: --master_addr/--master_port instead of --standalone. Logs: LOG_DIR/<name>-<time>/.
# All variables (CONFIG, CP, LOG_DIR, OUTPUT_DIR, ENV_ACTIVATE, NCCL_*, ...) are documented in launch/common.sh.

: "${CONFIG:=configs/stage_b_full_distill.yaml}"
MS_DEFAULT_JOB_NAME=ms-torchrun
# shellcheck source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
ms_launch_local "$@"
