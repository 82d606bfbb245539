"""`megatron-student train CONFIG [key.path=value ...]`: run one distillation stage.

Single process: run it directly. Several processes: start it under torchrun or one Slurm task per GPU (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the environment); see launch/.
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
    from .trainer import TrainingStopped, train

    try:
        train(config)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
