"""Context parallelism on 2 GPUs (NCCL): fla's CP kernels (``chunk_kda(cp_context=…)``, ``causal_conv1d_cp``) and the
SWA + TPA halo with FlexAttention, at CP = 2, against the whole sequence — the float64 CPU reference (our pure-torch
algorithm without CP) and the same float32 kernels on one GPU — and our pure-torch CP algorithm in float64 over
NCCL against the same reference. Marked ``gpu``; skipped without two GPUs.

Run on a 2-GPU machine: ``NCCL_NVLS_ENABLE=0 python3 -m pytest -q -s tests/test_context_parallel_gpu.py``
(``-s`` prints the measured errors)."""

import pytest
import torch

from context_parallel_workers import gpu_layers_worker, run_layer
from megatron_harness import rel, run_distributed

pytestmark = pytest.mark.gpu

TOTAL, HIDDEN, HEAD_DIM = 4096, 256, 64  # chunks [0, 2048) and [2048, 4096)
LAYOUTS = {
    "one_document": None,
    # 700..2046 ends 2 tokens before the boundary, 2046..2100 crosses it with 2 tokens on rank 0 (partial halos)
    "packed": [0, 700, 2046, 2100, 4096],
}
KINDS = ["kda", "swa_tpa"]
FP64_TOL = 1e-9  # the pure-torch algorithm over NCCL: only reduction order differs
# fla's kernels run fp32 matmuls in TF32; CP may add at most this much to the one-GPU error (relative to the fp64
# reference), plus a small absolute slack
CP_EXCESS, SLACK = 2.0, 1e-4


@pytest.fixture(scope="module")
def distributed(monkeypatch_module):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    monkeypatch_module.setenv("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (as the launchers do)
    cases = [(kind, layout) for kind in KINDS for layout in LAYOUTS]
    results = run_distributed(gpu_layers_worker, 2, [(k, 1 + i, LAYOUTS[lay]) for i, (k, lay) in enumerate(cases)],
                              TOTAL, HIDDEN, HEAD_DIM, backend="nccl")
    return {case: (1 + i, [r[i] for r in results]) for i, case in enumerate(cases)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _joined(ranks: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in ranks], dim=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_on_two_gpus(distributed, kind, layout):
    seed, ranks = distributed[kind, layout]
    reference = run_layer(kind, seed, LAYOUTS[layout], TOTAL, hidden=HIDDEN, head_dim=HEAD_DIM)  # fp64, CPU
    one_gpu = ranks[0]["fp32_one_gpu"]
    for key in ("out", "x_grad"):
        cp64 = _joined([r["fp64"] for r in ranks], key)
        cp32 = _joined([r["fp32"] for r in ranks], key)
        one, cp = rel(one_gpu[key], reference[key]), rel(cp32, reference[key])
        print(f"{kind} {layout} {key}: fp64 CP {rel(cp64, reference[key]):.1e}, fp32 one GPU {one:.1e}, "
              f"fp32 CP=2 {cp:.1e}")
        assert rel(cp64, reference[key]) < FP64_TOL
        assert cp < CP_EXCESS * one + SLACK
    for i, grad in enumerate(reference["param_grads"]):
        for r in ranks:
            assert rel(r["fp64"]["param_grads"][i], grad) < FP64_TOL, f"parameter {i}"
            one = rel(one_gpu["param_grads"][i], grad)
            assert rel(r["fp32"]["param_grads"][i], grad) < CP_EXCESS * one + SLACK, f"parameter {i}"
