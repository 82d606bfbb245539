"""Document boundaries on the host (issue 18: no layer reads ``cu_seqlens`` back from the GPU): ``PackedDocuments``
carries them next to the device tensor, the ops read that copy (``cu_seqlens_cpu``) and give the same results;
micro-batches carry them and check their labels on the host. CPU; the GPU side is tests/test_step_syncs_gpu.py."""

import pytest
import torch

from megatron_harness import MIXED_PLAN, rel, run_distributed
from megatron_harness_workers import packed_documents_worker
from megatron_student.megatron.attention import PackedDocuments
from megatron_student.ops.kda import causal_short_conv, kda
from megatron_student.ops.rope import token_positions


def test_packed_documents_keep_the_boundaries_on_the_host():
    cu = torch.tensor([0, 5, 12, 30], dtype=torch.int32)
    packed = PackedDocuments.of(cu, torch.device("cpu"))
    assert packed.qkv_format == "thd" and packed.cu_seqlens_q is packed.cu_seqlens_kv
    assert packed.cu_seqlens_q.dtype == torch.int32 and torch.equal(packed.cu_seqlens_q, cu)
    assert packed.cu_seqlens_cpu.dtype == torch.int64 and packed.cu_seqlens_cpu.tolist() == [0, 5, 12, 30]
    assert packed.max_seqlen_q == packed.max_seqlen_kv == 18


def test_model_gives_the_same_results_with_host_boundaries():
    (plain_logits, plain_grads), (host_logits, host_grads) = run_distributed(
        packed_documents_worker, 1, "student", MIXED_PLAN, 3)[0]
    assert torch.equal(host_logits, plain_logits)
    for name, grad in plain_grads.items():
        assert torch.equal(host_grads[name], grad), name


def test_kda_ops_read_the_host_boundaries():
    g = torch.Generator().manual_seed(0)
    T, H, K = 37, 2, 8
    cu = torch.tensor([0, 9, 30, T], dtype=torch.int32)
    x, w = torch.randn(1, T, 16, generator=g), torch.randn(16, 4, generator=g)
    assert torch.equal(causal_short_conv(x, w, cu_seqlens=cu, cu_seqlens_cpu=cu.long())[0],
                       causal_short_conv(x, w, cu_seqlens=cu)[0])
    q, k, v = (torch.randn(1, T, H, K, generator=g) for _ in range(3))
    decay = -torch.rand(1, T, H, K, generator=g)
    beta = torch.rand(1, T, H, generator=g)
    assert torch.equal(kda(q, k, v, decay, beta, cu_seqlens=cu, cu_seqlens_cpu=cu.long())[0],
                       kda(q, k, v, decay, beta, cu_seqlens=cu)[0])
    # the host copy is what is checked: a wrong one is refused by name, not silently used
    with pytest.raises(ValueError, match="causal_short_conv: cu_seqlens must start at 0 and end at T=37"):
        causal_short_conv(x, w, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 9, 30, 36]))
    with pytest.raises(ValueError, match=r"kda: cu_seqlens_cpu \[3\] and cu_seqlens \[4\] differ"):
        kda(q, k, v, decay, beta, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 9, T]))


def test_token_positions_restart_per_document():
    cu = torch.tensor([0, 3, 7, 8])
    assert token_positions(8, "cpu", cu).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_micro_batches_carry_host_boundaries_and_check_labels_on_the_host(tmp_path):
    from megatron_student.data.manifest import load_manifest
    from megatron_student.data.prepare import prepare
    from megatron_student.data.storage import HarmonyPackedDataset
    from megatron_student.train.batches import read_micro_batch
    from megatron_student.train.config import ChannelSection

    from test_train_loop import ASSETS

    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), tmp_path / "data", 256, progress=False)
    dataset = HarmonyPackedDataset(tmp_path / "data", "train")
    mb = read_micro_batch(dataset, [0, 1], ChannelSection(), torch.device("cpu"), vocab_size=201088)
    assert isinstance(mb.packed, PackedDocuments)
    assert mb.packed.cu_seqlens_cpu.tolist() == mb.packed.cu_seqlens_q.tolist()
    assert mb.packed.cu_seqlens_cpu[-1] == mb.tokens.shape[1] == 512
    largest = int(mb.targets.max())
    with pytest.raises(ValueError, match=rf"samples \[0, 1\]: label id {largest} is outside the student's vocabulary "
                                         rf"\[0, {largest}\)"):
        read_micro_batch(dataset, [0, 1], ChannelSection(), torch.device("cpu"), vocab_size=largest)
