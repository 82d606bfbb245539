#!/usr/bin/env python3
"""Same as `megatron-student init-student`: initialise an HF student from a gpt-oss teacher."""
import sys

from megatron_student.cli import main

if __name__ == "__main__":
    sys.exit(main(["init-student", *sys.argv[1:]]))
