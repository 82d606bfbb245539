"""GPU (H100/H200): the trainer's GPU path on a tiny teacher/student and the bundled demo data (seq 256).

- Megatron-Core's optimizer (distributed optimizer, fp32 student) steps like the torch AdamW reference;
- a bf16 student with Megatron's optimizer: stop at step 2 and resume (model checkpoint + the per-rank optimizer
  state: inner AdamW and fp32 main weights) equals the uninterrupted run;
- activation recompute keeps the losses.
Skipped without CUDA (tests/conftest.py)."""

from pathlib import Path

import pytest

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from megatron_student.train.config import config_from_dict
from megatron_student.train.trainer import Trainer, distributed_context

pytestmark = pytest.mark.gpu
ASSETS = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"
REL = 2e-3  # GPU kernels (atomics in the MoE and KDA backward) are not bit-reproducible between runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_gpu")
    make_tiny_teacher(root / "teacher", layers=2, dtype="fp32")
    init_student(root / "teacher", root / "student")
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), root / "data", 256, progress=False)
    return root


def config(root: Path, run: str, overrides=()):
    base = {
        "stage": run, "steps": 4, "seed": 7,
        "student": {"hf": str(root / "student")}, "teacher": {"path": str(root / "teacher"), "dtype": "fp32"},
        "data": {"path": str(root / "data"), "seq_len": 256, "micro_batch": 1, "global_batch": 2},
        "optimizer": {"lr": 1e-3, "freeze": ["^embedding\\."], "weight_decay": 0.01,
                      "param_groups": [{"pattern": "layernorm", "weight_decay": 0.0, "lr_scale": 0.5}]},
        "schedule": {"warmup_steps": 1, "decay": "cosine"},
        "losses": {"logits": [{"kind": "forward_kl", "weight": 1.0}, {"kind": "ce", "weight": 0.1}]},
        "checkpoint": {"dir": str(root / run / "ckpt")}, "logging": {"dir": str(root / run / "logs")},
    }
    return config_from_dict(base, list(overrides), source=f"<{run}>")


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
