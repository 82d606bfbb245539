"""GPU: host synchronisations in the distillation trainer's step (issue 18), counted with torch's CUDA sync debug
mode (``megatron_student.host_syncs.HostSyncs``) on the tiny teacher/student of the trainer tests (2 layers: SWA +
TPA and KDA in the student, sliding and full softmax attention in the teacher; 4 experts top-2, packed documents of
the demo data, seq 256, bf16 student with Megatron's optimizer, bf16 online teacher).

- The micro-batch's work (online teacher forward, student forward, logit losses, backward) with the sorted token
  dispatch (``parallel.dispatcher: auto`` at EP = 1) reads the host only inside fla: its varlen KDA and short-conv
  kernels build their chunk tables from ``cu_seqlens_cpu`` with a blocking copy to the GPU, once per table and
  micro-batch (fla's ``tensor_cache`` serves the later layers and the backward): at most ``FLA_TABLES`` in the
  forward, none in the backward. Megatron's allgather dispatcher makes at least its two ``masked_select`` per MoE
  layer forward (the measurement sees what it should).
- The whole optimiser step adds at most ``STEP_BUDGET`` outside fla: the gradient norm (Megatron's optimizer reads
  the total norm once per chained part, dense and expert: 1–2) and the one read of the step's non-finite flag,
  token counts and loss components.

Warm-up steps first (FlexAttention compiles, Triton autotunes, the allocator fills); the counts are of the steps
after. Each count prints its table of sync sites (``pytest -s``), and a failure shows it. Skipped without CUDA."""

import pytest
import torch

from megatron_student.host_syncs import HostSyncs
from megatron_student.train.trainer import Trainer, distributed_context

from test_train_loop import make_config, setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)

pytestmark = pytest.mark.gpu
STEP_BUDGET = 3
FLA_TABLES = 4
WARMUP_STEPS = 2
RUN = ["teacher.dtype=bf16", "data.global_batch=2", "steps=10"]


def fla_sites(syncs: HostSyncs) -> int:
    return sum(n for site, n in syncs.sites.items() if site.startswith("fla/"))


def count(setup, run: str, dispatcher: str) -> dict:
    """Host syncs of one micro-batch's forward (teacher, student, losses) and backward, and of one whole
    optimiser step, after the warm-up steps; with the MoE layers run per micro-batch and the micro-batches per
    step."""
    with distributed_context():
        trainer = Trainer(make_config(setup, run, [*RUN, f"parallel.dispatcher={dispatcher}"]))
        try:
            for _ in range(WARMUP_STEPS):
                trainer.train_step()
            mb = trainer.stream.next_micro_batch()
            normaliser = torch.tensor(float(mb.num_tokens), dtype=torch.float64, device=trainer.device)
            torch.cuda.synchronize()
            with HostSyncs() as forward:
                loss, _ = trainer._micro_losses(mb, normaliser)
            with HostSyncs() as backward:
                loss.backward()
            torch.cuda.synchronize()
            with HostSyncs() as step:
                record = trainer.train_step()
            torch.cuda.synchronize()
            assert not record.skipped
            moe_layers = len(trainer.student.decoder.layers) + trainer.online.num_layers
            micro_batches = trainer.accumulation
        finally:
            trainer.close()
    print(f"\ndispatcher {dispatcher}: micro-batch forward {forward}\nbackward {backward}\nwhole step {step}")
    return {"forward": forward, "backward": backward, "step": step, "moe_layers": moe_layers,
            "micro_batches": micro_batches}


def test_distillation_step_host_syncs(setup):
    c = count(setup, "syncs_sorted", "auto")
    forward, backward, step = c["forward"], c["backward"], c["step"]
    assert forward.total == fla_sites(forward) <= FLA_TABLES, f"micro-batch forward: {forward}"
    assert backward.total == 0, f"micro-batch backward: {backward}"
    assert fla_sites(step) <= c["micro_batches"] * FLA_TABLES, f"optimiser step: {step}"
    assert step.total - fla_sites(step) <= STEP_BUDGET, f"optimiser step: {step}"


def test_megatron_dispatcher_syncs_are_counted(setup):
    c = count(setup, "syncs_allgather", "allgather")
    forward = c["forward"]
    assert forward.total - fla_sites(forward) >= 2 * c["moe_layers"], f"micro-batch forward: {forward}"
    assert any(site.startswith("megatron/core/transformer/moe/") for site in forward.sites), str(forward)
