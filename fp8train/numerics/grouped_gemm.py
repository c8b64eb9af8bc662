"""All experts' FP8 GEMMs in one call: torch._scaled_grouped_mm for the aligned tensorwise MoE path.

grouped_function.py lays the tokens out so that expert e owns rows [s_e, s_e + P_e) of one padded
buffer (P_e and s_e multiples of 16) and quantizes X and dY once. Its three GEMM families then map
onto the two forms of torch's grouped GEMM. In the NT notation of backends.py
(out = A B^T, both operands row-major along the contraction dimension):

    output       Y  [T_pad, N] = X_rows  [T_pad, K] . W_e_rows [N, K]^T   per row group  "2d x 3d"
    grad_input   dX [T_pad, K] = dY_rows [T_pad, N] . W_e_cols [K, N]^T   per row group  "2d x 3d"
    grad_weight  dW [E, N, K]  : dW_e = dY_cols[:, group e] . X_cols[:, group e]^T        "2d x 2d"
                                 (the contraction runs over expert e's tokens)

torch._scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, out_dtype, use_fast_accum) wants
mat_a row-major and mat_b column-major; `offs` holds the int32 END of every group along the
grouped dimension (rows of mat_a for 2d x 3d, the contraction for 2d x 2d):

    2d x 3d  mat_a = A.data [T_pad, K]                       scale_a [T_pad]   one per row
             mat_b = stack_e(B_e.data) [E, R, K] -> .mT      scale_b [E, R]    one per output column
             (the cached weight rows are consecutive slices of one tensor: stacked without a copy;
             the per-expert transposed weight cols of grad_input cost one torch.stack copy)
    2d x 2d  mat_a = A.data [M, T_pad]                       scale_a [E * M]   per group and row
             mat_b = B.data.t() [T_pad, N] (column-major)    scale_b [E * N]   per group and column
             out [E, M, N]

The scales are decode factors (x ~= data * scale), exactly our `scale_inv`. What torch accepts,
from aten/src/ATen/native/cuda/GroupedBlas.cpp (_scaled_grouped_mm_cuda, an FBGEMM-era and the
current version), ScaledGroupMM.cu (f8f8bf16_grouped_mm), GroupMMCommon.cuh
(prepare_grouped_gemm_data) and torch/_meta_registrations.py (_meta_grouped_mm_common, 2.13):
  * FP8 scales must be ROWWISE (1-D per row for a 2-D operand, [E, cols] for the 3-D one). Newer
    builds route one-element "tensorwise" scales to cuBLASLt grouped GEMMs that need CUDA >= 13.4,
    older ones reject them. So our one tensorwise scale is expanded to a row of equal scales: the
    same product, one tiny broadcast kernel, accepted by every version.
  * E4M3 x E4M3 only (the CUTLASS kernel f8f8bf16_grouped_mm is compiled for e4m3): HYBRID
    recipes' E5M2 gradients, and the E5M2 activations of v3_fp8, keep the per-expert loop.
  * BF16 output only; FP32 accumulation, fast accumulation honoured (the forward uses it, as the
    loop does); the kernel is SM90-only (Hopper); fewer than 1024 groups; K, N multiples of 16.
  * A 2d x 2d group with zero tokens hits a device-side assert (CUTLASS cannot run K = 0), so when
    anything runs grouped the layout gives an empty expert 16 zero rows (`min_rows`): its products
    are exact zeros, and grouped_function.py zero-fills it anyway.
`grouped_gemm_support` checks all this and probes the op once per device with exact small
integers, so a torch that lacks the op or rejects an argument falls back to the loop, with a reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fp8train.quant.formats import E4M3
from fp8train.quant.granularity import TENSOR, GranularityKind
from fp8train.quant.schemes import GemmClass
from fp8train.quant.tensor import QuantizedTensor

GEMMS = ("output", "grad_input", "grad_weight")
DIM_MULTIPLE = 16  # torch checks K and N (and TMA the 2d x 2d token groups) in multiples of 16 bytes
MAX_GROUPS = 1023  # f8f8bf16_grouped_mm: "Can't process more than 1024 groups"


def _fmt_name(fmt) -> str:
    return getattr(fmt, "name", fmt)


def grouped_gemm_support(fmt_a, fmt_b, out_dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | None = None) -> tuple[bool, str]:
    """Can torch._scaled_grouped_mm multiply these formats (FP8Format or "e4m3"/"e5m2") here? (ok, reason)"""
    ok, why = device_support(device)
    if not ok:
        return False, why
    names = (_fmt_name(fmt_a), _fmt_name(fmt_b))
    if names != ("e4m3", "e4m3"):
        return False, f"{names[0].upper()} x {names[1].upper()}: torch._scaled_grouped_mm takes E4M3 x E4M3 only"
    if out_dtype != torch.bfloat16:
        return False, f"torch._scaled_grouped_mm writes BF16 only; this GEMM returns {out_dtype}"
    return True, why


def device_support(device: torch.device | None = None) -> tuple[bool, str]:
    """Does this torch + device run the FP8 grouped GEMM at all? Probed once per device, cached."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"tensors on {torch.device(device).type}: torch._scaled_grouped_mm is a CUDA op"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch._scaled_grouped_mm's FP8 kernel needs Hopper, SM90)"
    index = torch.device(device).index if device is not None else None
    return _cuda_support(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _cuda_support(index: int) -> tuple[bool, str]:
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if major != 9:
        return False, f"{name} is sm_{major}{minor}; torch._scaled_grouped_mm's FP8 kernel is SM90-only (CUTLASS)"
    failure = _probe(torch.device("cuda", index))
    if failure:
        return False, failure
    return True, f"torch._scaled_grouped_mm on {name} (torch {torch.__version__})"


def _probe(device: torch.device) -> str | None:
    """Both grouped forms once on small integers, whose products BF16 holds exactly: None if right."""
    gen = torch.Generator().manual_seed(0)
    sizes, k, n = [16, 32], 32, 48
    a_hp, c_hp = (torch.randint(-2, 3, shape, generator=gen).float() for shape in ((48, k), (n, 48)))
    b_hp = torch.randint(-2, 3, (2, n, k), generator=gen).float()
    half, two = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)
    fp8 = lambda t, s: QuantizedTensor(t.to(device, E4M3.dtype), s, TENSOR, E4M3)  # noqa: E731
    offsets = group_offsets(sizes, device)
    groups = [slice(0, 16), slice(16, 48)]
    try:
        checks = []
        for fast in (False, True):
            out = grouped_mm_experts(fp8(a_hp, half), [fp8(b_hp[0], two), fp8(b_hp[1], two)], offsets,
                                     torch.bfloat16, use_fast_accum=fast)
            checks.append((out, torch.cat([a_hp[g] @ b_hp[e].t() for e, g in enumerate(groups)])))
        out = grouped_mm_tokens(fp8(c_hp, half), fp8(a_hp.t().contiguous(), two), offsets, torch.bfloat16)
        checks.append((out, torch.stack([c_hp[:, g] @ a_hp[g] for g in groups])))
        torch.cuda.synchronize(device)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        return f"torch._scaled_grouped_mm rejected a probe call: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for out, expected in checks:
        if not torch.equal(out.float().cpu(), expected):
            return "torch._scaled_grouped_mm gave wrong values on the probe (scale or offset semantics changed?)"
    return None


def group_offsets(padded_sizes: list[int], device: torch.device) -> torch.Tensor:
    """int32 [E]: the end row of every group (what `offs` means), copied without a host sync."""
    ends, total = [], 0
    for size in padded_sizes:
        total += size
        ends.append(total)
    host = torch.tensor(ends, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
    return host.to(device, non_blocking=True)


def stack_experts(datas: list[torch.Tensor]) -> torch.Tensor:
    """[E, R, C] from E row-major [R, C] operands.

    A view when they are consecutive slices of one tensor (the cached weight rows: one cast for all
    experts), else one torch.stack copy (the per-expert transposed weight cols).
    """
    first = datas[0]
    storage, step = first.untyped_storage().data_ptr(), first.numel()
    consecutive = all(d.dtype == first.dtype and d.shape == first.shape and d.is_contiguous()
                      and d.untyped_storage().data_ptr() == storage
                      and d.storage_offset() == first.storage_offset() + e * step for e, d in enumerate(datas))
    if consecutive and first.dim() == 2:
        return first.as_strided((len(datas), *first.shape), (step, first.shape[1], 1))
    return torch.stack(datas)


def _expert_scales(operands: list[QuantizedTensor], rows: int) -> torch.Tensor:
    """[E, rows] FP32: each expert's tensorwise decode factor repeated along its rows (rowwise form)."""
    first = operands[0].scale_inv
    if all(op.scale_inv is first for op in operands):  # one weight cast for all experts: one scale
        per_expert = first.reshape(1, 1).expand(len(operands), 1)
    else:
        per_expert = torch.stack([op.scale_inv.reshape(()) for op in operands]).reshape(-1, 1)
    return per_expert.expand(len(operands), rows).float().contiguous()


def _rowwise(scale_inv: torch.Tensor, length: int) -> torch.Tensor:
    """A tensorwise decode factor as `length` equal rowwise factors (what the op accepts)."""
    return scale_inv.reshape(1).expand(length).float().contiguous()


def grouped_mm_experts(a: QuantizedTensor, b_experts: list[QuantizedTensor], offsets: torch.Tensor,
                       out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """2d x 3d: rows [s_e, s_e + P_e) of out [T_pad, R] = a's rows there . b_e^T, b_e [R, C]."""
    assert a.kind is GranularityKind.TENSOR and all(b.kind is GranularityKind.TENSOR for b in b_experts), \
        "tensorwise only"
    rows = b_experts[0].shape[0]
    mat_b = stack_experts([b.data for b in b_experts]).transpose(-2, -1)  # [E, C, R] column-major
    return torch._scaled_grouped_mm(a.data, mat_b, _rowwise(a.scale_inv, a.shape[0]),
                                    _expert_scales(b_experts, rows), offs=offsets, out_dtype=out_dtype,
                                    use_fast_accum=use_fast_accum)


def grouped_mm_tokens(a: QuantizedTensor, b: QuantizedTensor, offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """2d x 2d: out[e] = a[:, group e] . b[:, group e]^T for a [M, T_pad], b [N, T_pad] -> [E, M, N]."""
    assert a.kind is GranularityKind.TENSOR and b.kind is GranularityKind.TENSOR, "tensorwise only"
    groups = offsets.shape[0]
    a_data, b_data = a.data.contiguous(), b.data.contiguous()
    return torch._scaled_grouped_mm(a_data, b_data.t(), _rowwise(a.scale_inv, groups * a.shape[0]),
                                    _rowwise(b.scale_inv, groups * b.shape[0]), offs=offsets,
                                    out_dtype=out_dtype, use_fast_accum=False)


@dataclass(frozen=True)
class GroupedGemmPlan:
    """Per GEMM of one grouped layer: grouped (one torch call) or the per-expert loop, and why."""

    grouped: dict[str, bool]
    reasons: dict[str, str]

    @property
    def any(self) -> bool:
        return any(self.grouped.values())

    def describe(self) -> str:
        done = [g for g in GEMMS if self.grouped[g]]
        looped = [g for g in GEMMS if not self.grouped[g]]
        if not done and len({self.reasons[g] for g in GEMMS}) == 1:
            return f"per-expert loop for all GEMMs: {self.reasons['output']}"
        head = f"grouped: {', '.join(done)} ({self.reasons[done[0]]})" if done else "grouped: none"
        loops = "; ".join(f"{g}: {self.reasons[g]}" for g in looped)
        return f"{head}; per-expert loop: {loops}" if looped else head


def _layer_reason(layer) -> str | None:
    """Why none of this layer's GEMMs can run grouped, or None."""
    if getattr(layer.backend, "name", None) != "scaled_mm":
        return f"backend {layer.backend.name}: the grouped GEMM is a scaled_mm (CUDA) path"
    if layer.recipe.gemm_class is not GemmClass.TENSORWISE:
        return f"{layer.recipe.gemm_class.value} scaling: grouped GEMMs cover tensorwise recipes only"
    if layer.group_align is None:
        return "percentile-clipped input: the per-expert path, no aligned groups"
    if layer.in_features % DIM_MULTIPLE or layer.out_features % DIM_MULTIPLE:
        return f"in/out features {layer.in_features}/{layer.out_features} are not multiples of {DIM_MULTIPLE}"
    if layer.num_experts > MAX_GROUPS:
        return f"{layer.num_experts} experts: torch's grouped kernel takes at most {MAX_GROUPS} groups"
    return None


def plan_grouped_gemms(layer, input_dtype: torch.dtype, weight_dtype: torch.dtype,
                       device: torch.device | None = None) -> GroupedGemmPlan:
    """Which of an FP8GroupedLinear's GEMMs run as one torch._scaled_grouped_mm, with reasons."""
    blocked = _layer_reason(layer)
    if blocked:
        return GroupedGemmPlan({g: False for g in GEMMS}, {g: blocked for g in GEMMS})
    r = layer.recipe
    operands = {"output": (r.input.format, r.weight.format, layer.output_dtype(input_dtype)),
                "grad_input": (r.grad_output.format, r.weight.format, input_dtype),
                "grad_weight": (r.grad_output.format, r.input.format, weight_dtype)}
    verdicts = {g: grouped_gemm_support(a, b, out, device) for g, (a, b, out) in operands.items()}
    return GroupedGemmPlan({g: v[0] for g, v in verdicts.items()}, {g: v[1] for g, v in verdicts.items()})
