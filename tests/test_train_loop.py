"""The trainer on CPU with a tiny gpt-oss teacher, its initialised student and the bundled demo data (seq 256):
loss decreases on a repeated batch, stop-and-resume equals an uninterrupted run, freeze patterns and lr_scale 0
are honoured, the NaN guard skips a poisoned step and stops after N consecutive ones with a checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.data.storage import HarmonyPackedDataset
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from megatron_student.train.batches import eval_micro_batches, train_stream
from megatron_student.train.config import config_from_dict
from megatron_student.train.trainer import Trainer, TrainingStopped, distributed_context

ASSETS = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_teacher(root / "teacher", layers=2, dtype="fp32")
    init_student(root / "teacher", root / "student")
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), root / "data", 256, progress=False)
    return root


def make_config(root: Path, run: str, overrides=(), data: Path | None = None):
    base = {
        "stage": run, "steps": 4, "seed": 7,
        "student": {"hf": str(root / "student")}, "teacher": {"path": str(root / "teacher"), "dtype": "fp32"},
        "data": {"path": str(data or root / "data"), "seq_len": 256, "micro_batch": 1, "global_batch": 1},
        "optimizer": {"lr": 1e-3, "freeze": ["^embedding\\."]},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "losses": {"logits": [{"kind": "forward_kl", "weight": 1.0}, {"kind": "ce", "weight": 0.1}]},
        "checkpoint": {"dir": str(root / run / "ckpt")}, "logging": {"dir": str(root / run / "logs")},
    }
    return config_from_dict(base, list(overrides), source=f"<{run}>")


def copy_data(root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(root / "data", target)
    return target


def test_loss_decreases_on_repeated_batch(setup):
    data = copy_data(setup, "data_one")
    index = json.loads((data / "train" / "index.json").read_text())
    index["shards"] = [{**index["shards"][0], "samples": 1}]  # the reader sees only sample 0
    (data / "train" / "index.json").write_text(json.dumps(index))
    config = make_config(setup, "repeat", ["steps=6", "losses.hidden.weight=0.5", "losses.attention.weight=0.5",
                                           "logging.every=1"], data=data)
    with distributed_context():
        history = Trainer(config).fit()
    losses = [r.loss for r in history]
    assert not any(r.skipped for r in history)
    assert losses[-1] < 0.8 * losses[0], losses
    for name in ("forward_kl", "ce", "hidden", "attention"):
        assert history[-1].components[name] < history[0].components[name], name
    metrics = [json.loads(line) for line in (setup / "repeat" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and "router/layer_0/entropy" in metrics[0] and "train/tokens_per_s" in metrics[0]
    assert list((setup / "repeat" / "logs" / "tensorboard").iterdir())
    assert (setup / "repeat" / "ckpt" / "iter_0000006" / "config.yaml").is_file()


def test_stop_and_resume_equals_uninterrupted_run(setup):
    overrides = ["data.global_batch=2", "schedule.decay=cosine", "schedule.warmup_steps=1"]
    with distributed_context():
        full = Trainer(make_config(setup, "full", overrides)).fit()
        first = Trainer(make_config(setup, "split", overrides))
        part = [first.train_step(), first.train_step()]
        first.save_checkpoint()
        del first
        resumed = Trainer(make_config(setup, "split", overrides))
        assert resumed.step == 2
        rest = resumed.fit()
    assert [r.step for r in rest] == [2, 3]
    for a, b in zip(full, part + rest):
        assert a.step == b.step
        assert b.loss == pytest.approx(a.loss, rel=1e-6, abs=1e-7), (a.step, a.loss, b.loss)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)


def test_activation_recompute_reruns_each_layer_and_keeps_the_steps(setup):
    """recompute.granularity=full: every student layer's forward runs twice per micro-batch (forward + recompute in
    backward), and the losses and gradient norms equal the run without recompute."""
    def run(name, overrides):
        with distributed_context():
            trainer = Trainer(make_config(setup, name, ["steps=2", *overrides]))
            calls = []
            for layer in trainer.student.decoder.layers:
                layer.self_attention.register_forward_hook(lambda *_: calls.append(1))
            history = trainer.fit()
        return history, len(calls)

    plain, plain_calls = run("plain", [])
    for method, num_layers in (("uniform", 1), ("block", 2)):
        recomputed, calls = run(f"recompute_{method}", ["recompute.granularity=full", f"recompute.method={method}",
                                                         f"recompute.num_layers={num_layers}"])
        assert calls == 2 * plain_calls, (method, calls, plain_calls)
        for a, b in zip(plain, recomputed):
            assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)


def test_freeze_patterns_and_zero_lr_scale_are_honoured(setup):
    config = make_config(setup, "freeze", [
        "steps=2", "optimizer.freeze=['^embedding\\.', '\\.mlp\\.', 'layernorm']",
        "optimizer.param_groups=[{pattern: '^output_layer\\.', lr_scale: 0.0}]"])
    with distributed_context():
        trainer = Trainer(config)
        before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
        trainer.fit()
        after = dict(trainer.student.named_parameters())
    frozen = [n for n in before if n.startswith("embedding.") or ".mlp." in n or "layernorm" in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert torch.equal(before["output_layer.weight"], after["output_layer.weight"])
    attention = [n for n in before if ".self_attention." in n]
    assert attention and all(not torch.equal(before[n], after[n]) for n in attention)
    assert set(trainer.frozen) == set(frozen)


def _poison(data: Path, samples: list[int]) -> None:
    """NaN analysis weights for the tokens of the given packed samples (storage order = sample order)."""
    dataset = HarmonyPackedDataset(data, "train")
    starts = np.cumsum([0] + [dataset[i]["num_tokens"] for i in range(len(dataset))])
    weights = np.memmap(data / "train" / "shard_00000.weights.bin", dtype=np.float32, mode="r+")
    for i in samples:
        weights[starts[i]:starts[i + 1]] = np.nan
    weights.flush()


def test_nan_guard_skips_a_poisoned_step(setup):
    data = copy_data(setup, "data_poison_one")
    _poison(data, [1])
    config = make_config(setup, "nan_one", ["steps=3", "data.shuffle=false", "nan_guard.max_consecutive=1"], data=data)
    with distributed_context():
        trainer = Trainer(config)
        history = trainer.fit()
    assert [r.skipped for r in history] == [False, True, False]
    assert trainer.skipped_total == 1 and np.isfinite(history[2].loss)


def test_nan_guard_stops_after_consecutive_bad_steps_with_a_checkpoint(setup):
    data = copy_data(setup, "data_poison_all")
    _poison(data, list(range(len(HarmonyPackedDataset(data, "train")))))
    config = make_config(setup, "nan_all", ["steps=10", "nan_guard.max_consecutive=2"], data=data)
    with distributed_context():
        trainer = Trainer(config)
        with pytest.raises(TrainingStopped, match="3 consecutive non-finite steps"):
            trainer.fit()
    assert trainer.step == 3
    ckpt = setup / "nan_all" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpt / "iter_0000003" / "trainer" / "rank_00000.pt").is_file()


def test_micro_batches_name_the_samples_they_hold(setup):
    """Each DP rank's micro-batches carry the split and sample indices of their rows (what a teacher signal that
    looks rows up by sample reads), their tokens are those samples', and the two ranks draw disjoint samples."""
    config = make_config(setup, "batches", ["data.micro_batch=2", "data.global_batch=4", "data.shuffle=false",
                                            "eval.batches=2"])
    dataset = HarmonyPackedDataset(setup / "data", "train")
    drawn = []
    for rank in range(2):
        stream, accumulation = train_stream(config, rank, 2, torch.device("cpu"))
        assert accumulation == 1
        batches = [stream.next_micro_batch() for _ in range(3)]
        for mb in batches:
            assert mb.split == "train" and len(mb.samples) == 2
            assert torch.equal(mb.tokens[0], torch.cat([dataset[i]["input_ids"] for i in mb.samples]))
        drawn.append({i for mb in batches for i in mb.samples})
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    valid = HarmonyPackedDataset(setup / "data", "valid")
    batches = list(eval_micro_batches(config, 0, 2, torch.device("cpu")))
    assert batches and all(mb.split == "valid" and len(mb.samples) == 2 for mb in batches)
    assert torch.equal(batches[0].tokens[0], torch.cat([valid[i]["input_ids"] for i in batches[0].samples]))


def test_upcoming_samples_are_the_samples_drawn_next_across_epochs(setup):
    """What the offline teacher's reader thread decodes ahead is exactly what the stream draws next, also across an
    epoch boundary and after a resume, and peeking draws nothing."""
    config = make_config(setup, "upcoming", ["data.micro_batch=3", "data.global_batch=3"])
    stream, _ = train_stream(config, 0, 1, torch.device("cpu"))
    epoch_length = len(stream.sampler)
    for _ in range(2 * epoch_length // 3 + 1):
        ahead = stream.upcoming_samples(2)
        assert stream.upcoming_samples(2) == ahead
        assert [list(stream.next_micro_batch().samples) for _ in range(2)] == ahead
    state = stream.state_dict()
    ahead = stream.upcoming_samples(3)
    resumed, _ = train_stream(config, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    assert resumed.upcoming_samples(3) == ahead
    assert [list(resumed.next_micro_batch().samples) for _ in range(3)] == ahead
