#!/usr/bin/env python3
"""Same as `megatron-student convert-hf-to-megatron`."""
import sys

from megatron_student.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-hf-to-megatron", *sys.argv[1:]]))
