"""megatron-student: distil gpt-oss into a SWA+TPA / KDA student on Megatron-Core."""

__version__ = "0.1.0"
