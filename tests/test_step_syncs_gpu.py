"""GPU: host synchronisations in the distillation trainer's step (issue 18), counted with torch's CUDA sync debug
mode (``megatron_student.host_syncs.HostSyncs``) on the tiny teacher/student of the trainer tests (2 layers: SWA +
TPA and KDA in the student, sliding and full softmax attention in the teacher; 4 experts top-2, packed documents of
the demo data, seq 256, bf16 student with Megatron's optimizer, bf16 online teacher).

- The micro-batch's work (online teacher forward, student forward, logit losses, backward) makes no host sync with
  the sorted token dispatch (``parallel.dispatcher: auto`` at EP = 1), and Megatron's allgather dispatcher makes at
  least its two ``masked_select`` per MoE layer forward (the measurement sees what it should).
- The whole optimiser step makes at most ``STEP_BUDGET``: the gradient norm (Megatron's optimizer reads the norm of
  each chained part, dense and expert: 1–2) and the one read of the step's flag, token counts and loss components.

Warm-up steps first (FlexAttention compiles, Triton autotunes, the allocator fills, fla's tables are cached);
the counts are of the steps after. Each failure prints the table of sync sites. Skipped without CUDA."""

import pytest
import torch

from megatron_student.host_syncs import HostSyncs
from megatron_student.train.trainer import Trainer, distributed_context

from test_train_loop import make_config, setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)

pytestmark = pytest.mark.gpu
STEP_BUDGET = 3
WARMUP_STEPS = 2
RUN = ["teacher.dtype=bf16", "data.global_batch=2", "steps=10"]


def count(setup, run: str, dispatcher: str) -> tuple[HostSyncs, HostSyncs, int]:
    """(syncs of one micro-batch's forward/backward, syncs of one whole optimiser step, MoE layers run per
    micro-batch) after the warm-up steps."""
    with distributed_context():
        trainer = Trainer(make_config(setup, run, [*RUN, f"parallel.dispatcher={dispatcher}"]))
        try:
            for _ in range(WARMUP_STEPS):
                trainer.train_step()
            mb = trainer.stream.next_micro_batch()
            normaliser = torch.tensor(float(mb.num_tokens), dtype=torch.float64, device=trainer.device)
            torch.cuda.synchronize()
            with HostSyncs() as micro:
                loss, _ = trainer._micro_losses(mb, normaliser)
                loss.backward()
            torch.cuda.synchronize()
            with HostSyncs() as step:
                record = trainer.train_step()
            torch.cuda.synchronize()
            assert not record.skipped
            layers = len(trainer.student.decoder.layers) + trainer.online.num_layers
        finally:
            trainer.close()
    print(f"dispatcher {dispatcher}: micro-batch forward/backward {micro}\nwhole step {step}")
    return micro, step, layers


def test_distillation_step_host_syncs(setup):
    micro, step, _ = count(setup, "syncs_sorted", "auto")
    assert micro.total == 0, f"micro-batch forward/backward: {micro}"
    assert step.total <= STEP_BUDGET, f"optimiser step: {step}"


def test_megatron_dispatcher_syncs_are_counted(setup):
    micro, _, moe_layers = count(setup, "syncs_allgather", "allgather")
    assert micro.total >= 2 * moe_layers, f"micro-batch forward/backward: {micro}"
    assert any("masked_select" in site or "moe_utils" in site for site in micro.sites), str(micro)
