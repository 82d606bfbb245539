"""Weight surgery: a gpt-oss teacher checkpoint → an HF student checkpoint, one layer at a time.

Embeddings, lm_head, norms, router and experts are copied bit-exactly; attention is initialised per the
plan; every student tensor is reported as copied, derived (from what, how) or fresh (which init).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import DTYPES, dtype_name
from ..hf_io import StreamingCheckpointWriter
from ..ops.tpa import tpa_from_gqa, tpa_from_heads_svd
from ..teacher import TeacherCheckpoint
from .config import StudentConfig, load_plan_file
from .modeling import KdaAttention, StudentForCausalLM, init_kda_extras, write_bundle_files
from .spec import KdaSpec, SoftmaxSpec, SwaTpaSpec, layer_specs

FP32_PARAMETERS = ("A_log", "dt_bias")  # decay math stays fp32 whatever the checkpoint dtype


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    origin: str  # copied | derived | fresh
    detail: str


class Surgery:
    """Produces the student's tensors layer by layer from a teacher checkpoint."""

    def __init__(self, teacher: TeacherCheckpoint, config: StudentConfig, dtype: torch.dtype | None, seed: int):
        self.teacher, self.config = teacher, config
        self.dtype = dtype or teacher.get("model.norm.weight").dtype  # default: the teacher's own dtype
        self.generator = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            self.expected = {n: p.shape for n, p in StudentForCausalLM(config).state_dict().items()}
        self.specs = layer_specs(config)
        self.records: list[TensorRecord] = []
        self.tpa_errors: dict[str, float] = {}

    def _emit(self, name: str, tensor: torch.Tensor, origin: str, detail: str):
        if name not in self.expected:
            raise KeyError(f"surgery produced {name}, which the student does not have")
        if tuple(tensor.shape) != tuple(self.expected[name]):
            raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, student expects {tuple(self.expected[name])}")
        if name.split(".")[-1] in FP32_PARAMETERS:
            tensor = tensor.float()
        elif tensor.dtype != self.dtype:
            if origin == "copied":
                detail += f" (cast to {dtype_name(self.dtype)})"
            tensor = tensor.to(self.dtype)
        self.records.append(TensorRecord(name, tuple(tensor.shape), dtype_name(tensor.dtype), origin, detail))
        return name, tensor

    def copy(self, name: str, source: str | None = None):
        source = source or name
        return self._emit(name, self.teacher.get(source), "copied", f"from {source}")

    def tensors(self):
        """Yield (name, tensor) in checkpoint order; checks at the end that every student tensor was made."""
        yield self.copy("model.embed_tokens.weight")
        for layer in range(self.config.num_hidden_layers):
            yield from self.layer(layer)
        yield self.copy("model.norm.weight")
        yield self.copy("lm_head.weight")
        missing = sorted(set(self.expected) - {r.name for r in self.records})
        if missing:
            raise RuntimeError(f"surgery did not produce {len(missing)} student tensor(s): {missing[:5]}")

    def layer(self, i: int):
        p = f"model.layers.{i}."
        yield self.copy(p + "input_layernorm.weight")
        spec = self.specs[i]
        match spec:
            case SoftmaxSpec():
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    for part in ("weight", "bias"):
                        yield self.copy(f"{p}self_attn.{proj}.{part}")
                yield self.copy(p + "self_attn.sinks")
            case SwaTpaSpec():
                yield from self.swa_tpa(p + "self_attn.", spec)
            case KdaSpec():
                yield from self.kda(p + "self_attn.", spec, i)
            case _:
                raise TypeError(f"layer {i}: no surgery for {type(spec).__name__}")
        yield self.copy(p + "post_attention_layernorm.weight")
        for name in ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                     "experts.down_proj", "experts.down_proj_bias"):
            yield self.copy(p + "mlp." + name)

    def swa_tpa(self, p: str, spec: SwaTpaSpec):
        H, D = spec.num_heads, spec.head_dim
        if spec.q_rank is None:
            yield self.copy(p + "q_proj.weight")
            yield self.copy(p + "q_proj.bias")
        for name, rank in spec.ranks.items():
            if rank is None:
                continue
            weight, bias = self.teacher.get(f"{p}{name}_proj.weight"), self.teacher.get(f"{p}{name}_proj.bias")
            groups = weight.shape[0] // D
            if rank == groups:
                init = tpa_from_gqa(weight, bias, H, D)
                how = f"exact: A0 = {groups}·group mask, B = {name}_proj rows per head group"
                origin_b = "copied"
            else:
                init = tpa_from_heads_svd(weight, bias, H, D, rank)
                how = f"rank-{rank} SVD of {name}_proj (+bias) unfolded by heads, relative error {init.relative_error:.3e}"
                origin_b = "derived"
                self.tpa_errors[p + name] = init.relative_error
            yield self._emit(f"{p}{name}_a0", init.a0, "derived", how)
            if spec.contextual:
                yield self._emit(f"{p}{name}_a_proj.weight", torch.zeros(rank * H, spec.hidden_size), "fresh",
                                 "zeros: contextual head factor W_A starts off, so step 0 equals A0")
            if origin_b == "copied":
                yield self._emit(f"{p}{name}_b_proj.weight", init.b_weight, "copied", f"from {p}{name}_proj.weight")
                yield self._emit(f"{p}{name}_b_proj.bias", init.b_bias, "copied", f"from {p}{name}_proj.bias")
            else:
                yield self._emit(f"{p}{name}_b_proj.weight", init.b_weight, "derived", how)
                yield self._emit(f"{p}{name}_b_proj.bias", init.b_bias, "derived", how)
        yield self.copy(p + "o_proj.weight")
        yield self.copy(p + "o_proj.bias")
        yield self.copy(p + "sinks")
        if spec.grape:
            yield self._emit(p + "rope_freq", spec.rope.inv_freq(), "derived",
                             "GRAPE-M plane frequencies = the teacher's YaRN inv_freq (exact RoPE at step 0)")
            if spec.grape_learned_basis:
                yield self._emit(p + "plane_skew", torch.zeros(D, D), "fresh", "zeros: learned plane basis starts at I")

    def kda(self, p: str, spec: KdaSpec, layer: int):
        H, D, G = spec.num_heads, spec.head_dim, spec.num_kv_heads
        group = H // G
        mapping = spec.head_mapping
        q_w, q_b = self.teacher.get(p + "q_proj.weight"), self.teacher.get(p + "q_proj.bias")
        k_w, k_b = self.teacher.get(p + "k_proj.weight"), self.teacher.get(p + "k_proj.bias")
        v_w, v_b = self.teacher.get(p + "v_proj.weight"), self.teacher.get(p + "v_proj.bias")
        o_w = self.teacher.get(p + "o_proj.weight")

        def per_head(t):  # rows → [heads, D, ...]
            return t.reshape(-1, D, *t.shape[1:])

        def repeat(t):  # GQA → MHA: each KV head serves its `group` query heads (GQA order)
            return per_head(t).repeat_interleave(group, dim=0).reshape(-1, *t.shape[1:])

        def collapse(t):  # one q head per group: the mean of the group's query heads
            return per_head(t).reshape(G, group, D, *t.shape[1:]).double().mean(1).reshape(-1, *t.shape[1:])

        if mapping == "A":
            yield self.copy(p + "q_proj.weight")
            yield self.copy(p + "q_proj.bias")
            for name, w, b in (("k", k_w, k_b), ("v", v_w, v_b)):
                how = f"{name}_proj rows repeated ×{group} per KV head (GQA→MHA, option A)"
                yield self._emit(f"{p}{name}_proj.weight", repeat(w), "derived", how)
                yield self._emit(f"{p}{name}_proj.bias", repeat(b), "derived", how)
        else:
            how = f"mean of each group's {group} query heads (option {mapping}, lossy)"
            yield self._emit(p + "q_proj.weight", collapse(q_w), "derived", how)
            yield self._emit(p + "q_proj.bias", collapse(q_b), "derived", how)
            yield self.copy(p + "k_proj.weight")
            yield self.copy(p + "k_proj.bias")
            if mapping == "B":
                how = f"v_proj rows repeated ×{group} per KV head (GVA value heads, option B)"
                yield self._emit(p + "v_proj.weight", repeat(v_w), "derived", how)
                yield self._emit(p + "v_proj.bias", repeat(v_b), "derived", how)
            else:
                yield self.copy(p + "v_proj.weight")
                yield self.copy(p + "v_proj.bias")
        if mapping == "C":
            summed = o_w.double().reshape(o_w.shape[0], G, group, D).sum(2).reshape(o_w.shape[0], G * D)
            yield self._emit(p + "o_proj.weight", summed, "derived",
                             "o_proj columns of each group's query heads summed (option C: one value head per group)")
        else:
            yield self.copy(p + "o_proj.weight")
        yield self.copy(p + "o_proj.bias")
        module = KdaAttention(spec, layer)
        init_kda_extras(module, self.generator)
        fresh = {
            "q_conv_weight": "identity short conv (delta on the current tap)",
            "k_conv_weight": "identity short conv (delta on the current tap)",
            "v_conv_weight": "identity short conv (delta on the current tap)",
            "f_a_proj.weight": "N(0, 1/hidden): low-rank forget-gate input",
            "f_b_proj.weight": "zeros: decay starts from dt_bias alone",
            "b_proj.weight": "zeros: β = ½",
            "A_log": "zeros: exp(A_log) = 1",
            "dt_bias": "softplus⁻¹ of dt ~ logU(1e-4, 1e-2): per-token decay 0.99–0.9999 (long memory)",
            "g_a_proj.weight": "N(0, 1/hidden): low-rank output gate input",
            "g_b_proj.weight": "zeros: output gate constant at start",
            "g_b_proj.bias": "+4: output gate σ ≈ 0.98, near pass-through",
            "o_norm_weight": "ones: per-head RMSNorm",
        }
        state = module.state_dict()
        for name, detail in fresh.items():
            yield self._emit(p + name, state[name], "fresh", detail)


def format_report(records: list[TensorRecord]) -> str:
    rows = [("tensor", "shape", "dtype", "origin", "detail")] + [
        (r.name, "×".join(map(str, r.shape)), r.dtype, r.origin, r.detail) for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4] for row in rows]
    counts = {o: sum(r.origin == o for r in records) for o in ("copied", "derived", "fresh")}
    lines.append(f"\n{len(records)} tensors: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    return "\n".join(lines)


def init_student(
    teacher_dir: str | Path,
    output_dir: str | Path,
    plan: dict | str | Path | None = None,
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    allow_nonfinite: bool = False,
) -> tuple[Path, list[TensorRecord]]:
    """Write an HF student checkpoint (safetensors shards, config with the plan, code shims, generation
    config, surgery report) initialised from a gpt-oss teacher directory."""
    teacher = TeacherCheckpoint(teacher_dir)
    if isinstance(plan, (str, Path)):
        plan = load_plan_file(plan)
    config = StudentConfig.from_teacher(teacher.config, plan, teacher_name_or_path=str(teacher_dir))
    if dtype:
        config.dtype = dtype_name(DTYPES[dtype])
    surgery = Surgery(teacher, config, DTYPES[dtype] if dtype else None, seed)
    with StreamingCheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes, force=force,
                                   allow_nonfinite=allow_nonfinite) as writer:
        for name, tensor in surgery.tensors():
            writer.add(name, tensor)
        write_bundle_files(writer.directory, config)
        report = format_report(surgery.records)
        writer.write_text("surgery_report.txt", report + "\n")
        writer.write_json("surgery_report.json", [r.__dict__ for r in surgery.records])
    return Path(output_dir), surgery.records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="gpt-oss HF checkpoint directory (bf16 or MXFP4)")
    parser.add_argument("--output", required=True, help="student checkpoint directory to create")
    parser.add_argument("--plan", help="attention plan (YAML or JSON); default: sliding→swa_tpa, full→kda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the teacher's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the fresh KDA parameters")
    parser.add_argument("--max-shard-mb", type=int, default=5120)
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="do not print the tensor table")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write tensors holding NaN/Inf (default: stop, naming the first such tensor)")


def run(args: argparse.Namespace) -> int:
    out, records = init_student(args.teacher, args.output, args.plan, args.dtype, args.seed, args.force,
                                args.max_shard_mb * 1024**2, args.allow_nonfinite)
    report = format_report(records)
    print(report if not args.quiet else report.splitlines()[-1])
    print(f"student written to {out} (report: {out / 'surgery_report.txt'})")
    return 0
