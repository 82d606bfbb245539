"""Harmony data pipeline: schema, rendering with masks and weights, packing, storage, format checks.

Modules are imported directly (e.g. ``megatron_student.data.storage``) so the CLI stays light."""
