import os

# One intra-op thread per test process, set before torch loads: the suite runs as xdist workers on two cores
# and many tests start several ranks; more threads than cores makes small CPU ops wait at OpenMP barriers
# (measured: a tiny MoE layer 0.8 ms with one thread, 38 ms with two on a loaded 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests run offline: nothing may come from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The longest modules start first, one per xdist worker (`--dist loadscope` hands out modules in this order), so
# that the workers finish together instead of one waiting on a long module started last.
LONGEST_FIRST = ("test_demo.py", "test_slurm.py", "test_train_parallel.py", "test_offline_capture.py",
                 "test_checkpoint_safety.py", "test_context_parallel.py")


def _start_rank(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: the order inside a module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
