"""`megatron-student train CONFIG [key.path=value ...]`: run one distillation stage.

Single process: run it directly. Several processes: start it under torchrun or one Slurm task per GPU (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the environment); see launch/.

Exit status: 0 done, 2 bad config, 3 stopped by the NaN guard, 75 stopped on a signal or the time budget with a
checkpoint (``exit`` section; resumable: the same command continues from it).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="stage YAML (configs/stage_*.yaml, configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides, values parsed as YAML (e.g. optimizer.lr=1e-4 data.micro_batch=2)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from .graceful_stop import RESUMABLE_EXIT_CODE, GracefulStop, TrainingInterrupted
    from .trainer import TrainingStopped, train

    try:
        with GracefulStop(config.exit.signals, config.exit.duration_minutes) as stop:
            train(config, stop)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted:
        return RESUMABLE_EXIT_CODE  # the trainer logged why and where the checkpoint is
    return 0
