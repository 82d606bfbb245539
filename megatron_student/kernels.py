"""GPU kernel compilation: where its caches live, fixed launch configurations instead of autotuning, and a
notice while the first step compiles.

On a fresh GPU machine the first forward/backward compiles every Triton kernel (fla's KDA, conv and norm
kernels; FlexAttention through torch.compile) and autotunes fla's kernels, each over up to a few dozen
launch configurations that are compiled and timed one by one. That is minutes of silence inside step 1.
Three things cut it or make it visible:

- **Caches in one place** (``configure_caches``): Triton's compiled kernels and autotuning results
  (``TRITON_CACHE_DIR``) and TorchInductor's compiled graphs (``TORCHINDUCTOR_CACHE_DIR``, FX-graph and
  autograd caches on) go under ``$MEGATRON_STUDENT_CACHE/kernels`` (default ``~/.cache/megatron_student``).
  Point ``MEGATRON_STUDENT_CACHE`` at a shared file system and every later job of the cluster starts warm.
  Variables the user set already are left alone.
- **Fixed launch configurations** (``use_fixed_configs``): ``assets/kernel_configs.json`` records, per GPU model,
  the configuration fla's autotuner chose for each kernel at our shapes (written on the GPU by
  ``benchmarks/kernel_configs.py``). Each recorded kernel is restricted to that one configuration, so it is
  compiled once and never timed. Kernels without a record, or whose record is not among their candidates
  (another fla or Triton version), keep full autotuning. ``MEGATRON_STUDENT_AUTOTUNE=full`` turns this off.
- **A notice** (``first_step_notice``): the first step says what is happening and how long it has taken.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from .harmony_vocab import cache_home

CONFIG_TABLE = Path(__file__).with_name("assets") / "kernel_configs.json"
AUTOTUNE_ENV = "MEGATRON_STUDENT_AUTOTUNE"  # "fixed" (default) or "full"


def cache_root() -> Path:
    return cache_home() / "kernels"


def configure_caches() -> Path:
    """Point Triton's and TorchInductor's on-disk caches under ``cache_root()`` (unless already set); returns it."""
    root = cache_root()
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return root


def _autotuners() -> dict[str, object]:
    """Every Triton autotuner of the fla modules imported so far, by the name of the kernel it tunes."""
    from triton.runtime.autotuner import Autotuner

    found: dict[str, object] = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            seen = 0
            while obj is not None and not isinstance(obj, Autotuner) and seen < 4:  # through @heuristics wrappers
                obj, seen = getattr(obj, "fn", None), seen + 1
            if isinstance(obj, Autotuner):
                base = obj.base_fn
                found[f"{base.__module__}.{base.__name__}"] = obj
    return found


def _config_record(config) -> dict:
    return {key: value for key, value in sorted(config.all_kwargs().items()) if value is not None}


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


@functools.lru_cache(maxsize=1)
def use_fixed_configs() -> tuple[int, int]:
    """Restrict each recorded fla kernel to its recorded launch configuration on this GPU model (once per
    process, after fla's kernels are imported). Returns (kernels fixed, kernels left to autotune)."""
    import fla.modules.fused_norm_gate  # noqa: F401  (the modules whose kernels the student runs)
    import fla.modules.causal_conv1d.ops  # noqa: F401
    import fla.ops.kda  # noqa: F401

    tuners = _autotuners()
    if os.environ.get(AUTOTUNE_ENV, "fixed") == "full" or not CONFIG_TABLE.is_file():
        return 0, len(tuners)
    table = json.loads(CONFIG_TABLE.read_text()).get("devices", {}).get(gpu_name(), {}).get("kernels", {})
    fixed = 0
    for name, tuner in tuners.items():
        record = table.get(name)
        chosen = [c for c in tuner.configs if record is not None and _config_record(c) == record]
        if chosen:
            tuner.configs = chosen[:1]
            fixed += 1
    return fixed, len(tuners) - fixed


def triton_runs_on(t) -> bool:
    """Whether our own Triton kernels run on tensor ``t``'s device: CUDA, or the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1``, set before triton is imported: how the CPU tests run them)."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fla_kernels_used() -> bool:
    """Whether this process has run one of fla's GPU kernels (every such call goes through
    ``use_fixed_configs`` first), for reports."""
    return use_fixed_configs.cache_info().currsize > 0


def record_autotune_choices() -> dict[str, dict]:
    """The configuration fla's autotuners chose for each kernel run so far (the most frequent choice when a
    kernel was tuned for several shapes): the body of one device's entry in ``kernel_configs.json``."""
    choices = {}
    for name, tuner in sorted(_autotuners().items()):
        picked = Counter(json.dumps(_config_record(c), sort_keys=True) for c in tuner.cache.values())
        if picked:
            choices[name] = json.loads(picked.most_common(1)[0][0])
    return choices


@contextlib.contextmanager
def first_step_notice(say, what: str = "step 1", every_s: float = 30.0):
    """While the body runs, ``say`` every ``every_s`` seconds that GPU kernels are being compiled (where the
    caches are, how long so far); afterwards, how long it took. Without CUDA it only runs the body."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    start, done = time.perf_counter(), threading.Event()
    root = cache_root()

    def heartbeat():
        while not done.wait(every_s):
            say(f"{what}: compiling and autotuning GPU kernels (fla Triton, FlexAttention), "
                f"{time.perf_counter() - start:.0f} s so far; cached for later runs under {root}")

    say(f"{what}: the first forward/backward compiles GPU kernels (once per shape and GPU model; caches under {root})")
    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        say(f"{what} took {time.perf_counter() - start:.1f} s including kernel compilation")
