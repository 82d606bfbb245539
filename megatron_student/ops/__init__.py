"""The one home of the math: plain functions on tensors, shared by the HF and Megatron-Core modules.

Every function takes the heads that are local to the caller, so tensor-parallel modules call them on
their shard unchanged.
"""
