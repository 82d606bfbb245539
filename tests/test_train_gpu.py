"""GPU (H100/H200): the trainer's GPU path on a tiny teacher/student and the bundled demo data (seq 256).

- Megatron-Core's optimizer (distributed optimizer, fp32 student) steps like the torch AdamW reference;
- a bf16 student with Megatron's optimizer: stop at step 2 and resume (model checkpoint + the per-rank optimizer
  state: inner AdamW and fp32 main weights) equals the uninterrupted run;
- activation recompute keeps the losses.
Skipped without CUDA (tests/conftest.py)."""

from pathlib import Path

import pytest

from megatron_student.train.trainer import Trainer, distributed_context

from test_train_loop import make_config, setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)

pytestmark = pytest.mark.gpu
REL = 2e-3  # GPU kernels (atomics in the MoE and KDA backward) are not bit-reproducible between runs
# Two micro-batches per step, weight decay with a no-decay half-LR group, warmup then cosine.
GPU_RUN = ["data.global_batch=2", "optimizer.weight_decay=0.01",
           "optimizer.param_groups=[{pattern: layernorm, weight_decay: 0.0, lr_scale: 0.5}]",
           "schedule.warmup_steps=1", "schedule.decay=cosine"]


def config(root: Path, run: str, overrides=()):
    return make_config(root, run, [*GPU_RUN, *overrides])


def fit(root, run, overrides=()):
    with distributed_context():
        trainer = Trainer(config(root, run, overrides))
        return trainer, trainer.fit()


def assert_same_steps(a, b):
    assert [r.step for r in a] == [r.step for r in b]
    for x, y in zip(a, b):
        assert not x.skipped and not y.skipped
        assert y.loss == pytest.approx(x.loss, rel=REL), (x.step, x.loss, y.loss)
        assert y.grad_norm == pytest.approx(x.grad_norm, rel=10 * REL), (x.step, x.grad_norm, y.grad_norm)


def test_megatron_optimizer_steps_like_torch_adamw(setup):
    fp32 = ["student.dtype=fp32"]
    trainer, megatron = fit(setup, "megatron_fp32", [*fp32, "optimizer.implementation=megatron"])
    assert type(trainer.optimizer).__name__ == "MegatronAdam"
    assert trainer.ddp.ddp_config.use_distributed_optimizer
    assert {g["group_index"] for g in trainer.optimizer.optimizer.param_groups} == {0, 1}
    _, torch_adamw = fit(setup, "torch_fp32", [*fp32, "optimizer.implementation=torch"])
    assert_same_steps(torch_adamw, megatron)


def test_bf16_student_stop_and_resume_equals_uninterrupted_run(setup):
    import torch

    trainer, full = fit(setup, "bf16_full")
    assert trainer.student.embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert trainer.student.decoder.layers[0].mlp.router.weight.dtype == torch.float32
    assert full[-1].loss < full[0].loss
    with distributed_context():
        first = Trainer(config(setup, "bf16_split"))
        part = [first.train_step(), first.train_step()]
        path = first.save_checkpoint()
        del first
        assert (path / "trainer" / "rank_00000.pt").is_file()
        resumed = Trainer(config(setup, "bf16_split"))
        assert resumed.step == 2
        rest = resumed.fit()
    assert_same_steps(full, part + rest)


def test_activation_recompute_keeps_the_steps_on_gpu(setup):
    _, plain = fit(setup, "plain", ["steps=2"])
    _, recomputed = fit(setup, "recomputed", ["steps=2", "recompute.granularity=full"])
    assert_same_steps(plain, recomputed)
