"""`megatron-student evaluate`: did this distillation work? Teacher agreement on held-out data, router health,
Harmony generation behaviour and probes with checkable answers, for a student and its teacher through the same
code (see ``runner.py`` for the pipeline and ``suite.py`` for the suite file)."""
