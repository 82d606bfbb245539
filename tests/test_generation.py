"""Generation with the HF student through transformers' own ``generate``: cached decoding, batched left-padded
prompts, loading through the Auto classes and the `generate` command. `.ci/run` runs this file a second time
under the lowest transformers version `pyproject.toml` allows (transformers renamed the cache of inputs and
outputs from ``past_key_values`` to ``cache`` in 5.24; generate must find it back under either name)."""

import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from megatron_student.student.modeling import CACHE_FIELD, HARMONY_STOP_TOKEN_IDS, StudentForCausalLM
from megatron_student.student.surgery import init_student
from megatron_student.teacher import make_tiny_teacher

PAD = HARMONY_STOP_TOKEN_IDS[-1]  # <|endoftext|>, gpt-oss's pad token


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    teacher = make_tiny_teacher(root / "teacher", layers=4, hidden=64, heads=8, kv_heads=2, head_dim=16, experts=4,
                                experts_per_token=2, intermediate=32, dtype="fp32", seed=3)
    # every attention kind: SWA+TPA (0, 2), KDA (1), a kept global softmax layer (3)
    out, _ = init_student(teacher, root / "student", plan={"overrides": {3: "softmax_full"}})
    return out


@pytest.fixture(scope="module")
def student(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    # non-trivial KDA gates and a fast decay, so that a wrong state or conv tail shows in the logits
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.kind == "kda":
                attn = layer.self_attn
                for weight in (attn.f_b_proj.weight, attn.b_proj.weight, attn.g_b_proj.weight, attn.q_conv_weight):
                    weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)
                attn.A_log.fill_(1.0)
    return model


def prompt(seed, length):
    return torch.randint(0, 199998, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, ids, steps):
    """The reference: every step a full forward over the whole sequence, no cache, argmax of the last logits."""
    ids, logits = ids[None], []
    for _ in range(steps):
        last = model(ids).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids[0], torch.cat(logits)


def generate(model, ids, attention_mask=None, steps=6):
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, eos_token_id=HARMONY_STOP_TOKEN_IDS, pad_token_id=PAD,
                          output_logits=True, return_dict_in_generate=True)


def test_loads_through_auto_classes_without_remote_code(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir)  # our classes are registered on import
    assert isinstance(model, StudentForCausalLM)


@torch.no_grad()
def test_cached_generate_equals_full_recompute(student):
    ids = prompt(1, 150)  # longer than the 128-token window: the SWA cache trims while decoding
    out = generate(student, ids[None], steps=6)
    expected, logits = greedy_without_cache(student, ids, 6)
    assert out.sequences[0].tolist() == expected.tolist(), transformers.__version__
    assert rel(torch.cat(out.logits), logits) < 1e-4


@torch.no_grad()
def test_batched_left_padded_generate_equals_each_prompt_alone(student):
    prompts = [prompt(2, 150), prompt(3, 23), prompt(4, 131)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = generate(student, ids, mask, steps=6)
    for row, p in enumerate(prompts):
        alone, logits = greedy_without_cache(student, p, 6)
        assert batched.sequences[row, width - len(p):].tolist() == alone.tolist(), (row, transformers.__version__)
        assert rel(torch.stack([s[row] for s in batched.logits]), logits) < 1e-4


@torch.no_grad()
def test_padded_forward_matches_unpadded_and_cache_keeps_rows(student):
    p = prompt(5, 40)
    padded = torch.cat([torch.full((9,), PAD), p])[None]
    mask = torch.cat([torch.zeros(9, dtype=torch.long), torch.ones(40, dtype=torch.long)])[None]
    out = student(padded, attention_mask=mask, use_cache=True)
    assert rel(out.logits[:, 9:], student(p[None]).logits) < 1e-5
    cache = getattr(out, CACHE_FIELD)
    assert cache.next_position.tolist() == [40]
    # position_ids that disagree with the mask are refused; the implied ones are accepted
    student(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with pytest.raises(ValueError, match="position_ids"):
        student(padded, attention_mask=mask, position_ids=torch.arange(49)[None])
    with pytest.raises(ValueError, match="only left padding"):
        holes = mask.clone()
        holes[0, 20] = 0
        student(padded, attention_mask=holes)


def test_generate_command(student_dir):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_student.cli", "generate", "--model", str(student_dir),
         "--prompt", "What is 2+2?", "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    count = re.search(r"\((\d+) tokens generated\)", result.stdout)
    assert count and 1 <= int(count.group(1)) <= 4, result.stdout


def test_teacher_on_sink_attention_equals_eager(student_dir):
    """Evaluation runs the teacher's attention through ops.attention (teacher.attention): logits of a prompt longer
    than the sliding window, cached greedy decoding and a left-padded batch (transformers' eager path) are those of
    transformers' own eager gpt-oss attention."""
    from megatron_student.teacher.attention import SINK_ATTENTION, use_sink_attention
    from megatron_student.teacher.checkpoint import load_teacher_model

    teacher = student_dir.parent / "teacher"
    eager, sink = load_teacher_model(teacher).eval(), load_teacher_model(teacher).eval()
    use_sink_attention(sink)
    assert sink.config._attn_implementation == SINK_ATTENTION and sink.config.sliding_window < 300
    ids = prompt(11, 300)[None]
    with torch.no_grad():
        assert rel(sink(input_ids=ids).logits, eager(input_ids=ids).logits) < 1e-5
    a, b = generate(eager, ids, steps=8), generate(sink, ids, steps=8)
    assert torch.equal(a.sequences, b.sequences)
    assert rel(torch.stack(b.logits), torch.stack(a.logits)) < 1e-5
    short, long = prompt(12, 40), prompt(13, 60)
    batch = torch.full((2, 60), PAD)
    batch[0, 20:], batch[1] = short, long
    mask = (torch.arange(60) >= torch.tensor([[20], [0]])).long()
    a, b = generate(eager, batch, mask), generate(sink, batch, mask)
    assert torch.equal(a.sequences, b.sequences)
