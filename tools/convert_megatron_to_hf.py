#!/usr/bin/env python3
"""Same as `megatron-student convert-megatron-to-hf`."""
import sys

from megatron_student.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-megatron-to-hf", *sys.argv[1:]]))
