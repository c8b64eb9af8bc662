"""Grouped FP8 GEMMs for MoE layers: public entry points, argument checks, backend choice.

    out = grouped_mm_experts_tensorwise(a, b, a_scale_inv, b_scale_inv, offs)   # output, grad_input
    out = grouped_mm_experts_blockwise(a, b, a_scale_inv, b_scale_inv, offs)
    dw  = grouped_mm_tokens_tensorwise(a, b, a_scale_inv, b_scale_inv, offs)    # grad_weight
    dw  = grouped_mm_tokens_blockwise(a, b, a_scale_inv, b_scale_inv, offs)

Operands (FP8 = torch.float8_e4m3fn or torch.float8_e5m2, any pairing; scales are FP32 DECODE
factors, x ~= fp8 * scale_inv, i.e. a cast's `scale_inv`):

    experts form   a [T, K] FP8, b [E, N, K] FP8 (inner stride 1, any row / expert strides; b[e] = W_e
                   rows, or W_e^T for grad_input)     -> out [T, N]; rows past offs[-1] are zeros
    tokens form    a [M, T] FP8, b [N, T] FP8 (inner stride 1; a = dY^T, b = X^T for grad_weight)
                                                     -> out [E, M, N]; an expert without tokens: zeros
    offs           int32 [E] on the operands' device: END row (experts) / token (tokens) of each group,
                   non-decreasing, offs[-1] <= T (torch._scaled_grouped_mm's `offs`)
    tensorwise     a_scale_inv [1] (or 0-d); b_scale_inv [1] or [E] (experts: per expert; tokens: [1])
    blockwise      experts: a_scale_inv [T, K/128] (1x128 tiles), b_scale_inv [E, N/128, K/128]
                   (128x128 blocks); K, N multiples of 128. tokens: a_scale_inv [M, T/128], b_scale_inv
                   [N, T/128] (1x128 tiles along tokens); T and every offset multiples of 128. Any strides.

`use_fast_accum` (tensorwise): let the tensor cores accumulate the whole contraction (fastest, as
torch's flag); False promotes into FP32 every 128 elements. Blockwise always promotes every 128.
`groups_aligned` (tokens, tensorwise): the caller pads every expert's tokens to a multiple of 128, and
the kernel runs one flat loop over all (tile, chunk) pairs (blockwise token groups are aligned by
contract and always get it); ragged groups take a K loop per tile, which refills the pipeline.

Where they run: Triton on CUDA with compute capability >= 8.9 (TMA loads on >= 9.0), or under
TRITON_INTERPRET=1 on CPU tensors; elsewhere `kernels.grouped_gemm_reference` (which reads `offs` on
the host). The Triton path never syncs: offsets are not validated (bad offsets give wrong rows but
never touch memory outside the tensors; misaligned blockwise token groups give NaN).
"""

from __future__ import annotations

import math

import torch

from fp8train.quant.schemes import BLOCK
from kernels import grouped_gemm_reference as reference
from kernels.grouped_gemm_configs import Form, Scaling, TileConfig, pick_config
from kernels.grouped_gemm_launch import launch_experts, launch_tokens

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_EXPERTS = 1024  # the experts form keeps a vector of E + 1 group slots in registers


def grouped_backend(x: torch.Tensor) -> tuple[str, str]:
    """("triton" | "interpreter" | "reference", reason) for operands like x: kernels._backend's
    answer, plus the grouped kernels' own floor (FP8 tensor-core dots need sm_89)."""
    from kernels import _backend  # noqa: PLC0415

    name, reason = _backend.kernel_backend(x)
    if name == "reference":
        return name, reason
    from kernels import fp8_triton  # noqa: PLC0415 (imported by kernel_backend already)

    if fp8_triton.INTERPRETED:
        return "interpreter", reason
    major, minor = _backend.capability(x)
    if (major, minor) < (8, 9):
        return "reference", f"sm_{major}{minor}: FP8 tensor-core dots need sm_89 or newer"
    return "triton", f"sm_{major}{minor}: compiled Triton"


# ---------------------------------------------------------------- argument checks
def _check_fp8(t: torch.Tensor, name: str, dims: int) -> None:
    if t.dtype not in FP8_DTYPES:
        raise ValueError(f"{name} must be one of {FP8_DTYPES}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.numel() > 0:
        raise ValueError(f"{name} must have inner stride 1 (row-major along the contraction), got strides "
                         f"{t.stride()}; call .contiguous()")


def _check_common(a, b, offs, out_dtype, experts: int | None) -> None:
    """experts: E from b's shape (experts form), None to take it from offs (tokens form)."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    want = "E" if experts is None else experts
    if offs.dtype != torch.int32 or offs.dim() != 1 or (experts is not None and offs.shape[0] != experts):
        raise ValueError(f"offs must be int32 [{want}] (one group end per expert), got {offs.dtype} "
                         f"{tuple(offs.shape)}")
    if not 1 <= offs.shape[0] <= MAX_EXPERTS:
        raise ValueError(f"number of experts must be in [1, {MAX_EXPERTS}], got {offs.shape[0]}")
    for name, t in (("b", b), ("offs", offs)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}: keep every operand on one device")


def _check_scale(s: torch.Tensor, name: str, shapes: list[tuple[int, ...]], device) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) not in shapes or s.device != device:
        raise ValueError(f"{name} must be float32 with shape in {shapes} on {device}, got {s.dtype} "
                         f"{tuple(s.shape)} on {s.device}")


def _check_experts(a, b, offs, out_dtype) -> tuple[int, int, int, int]:
    _check_fp8(a, "a", 2)
    _check_fp8(b, "b", 3)
    T, K = a.shape
    E, N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"a [T, K] and b [E, N, K] must share K: a {tuple(a.shape)}, b {tuple(b.shape)}")
    _check_common(a, b, offs, out_dtype, E)
    return T, K, E, N


def _check_tokens(a, b, offs, out_dtype) -> tuple[int, int, int]:
    _check_fp8(a, "a", 2)
    _check_fp8(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a [M, T] and b [N, T] must share the token dimension T: a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    _check_common(a, b, offs, out_dtype, None)
    return a.shape[0], b.shape[0], a.shape[1]


def _check_multiple(value: int, what: str) -> None:
    if value % BLOCK:
        raise ValueError(f"blockwise scaling needs {what} to be a multiple of {BLOCK}, got {value}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype, device) -> None:
    if out is None:
        return
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {dtype} {shape} on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.stride(-1) != 1 or (out.dim() == 3 and out.stride(1) < shape[2]):
        raise ValueError(f"out must be row-major (inner stride 1), got strides {out.stride()}")


# ---------------------------------------------------------------- entry points
def _run(form: Form, scaling: Scaling, args: tuple, out_shape: tuple[int, ...], out_dtype, fast_accum: bool,
         out: torch.Tensor | None, config: TileConfig | None, scale_strides: tuple, reference_fn,
         groups_aligned: bool = False):
    """Allocate (or check) out, then launch Triton, or return the reference where Triton cannot run."""
    a, b, a_scale_inv, b_scale_inv, offs = args
    _check_out(out, out_shape, out_dtype, a.device)
    name, _ = grouped_backend(a)
    if name == "reference" or math.prod(out_shape) == 0 or a.shape[1] == 0:
        result = reference_fn(*args, out_dtype)  # nothing to launch: empty output, or zeros (no K / tokens)
        return result if out is None else out.copy_(result)
    interpreted = name == "interpreter"
    if config is not None and scaling is Scaling.BLOCKWISE and config.bk != BLOCK:
        raise ValueError(f"blockwise configs need bk={BLOCK} (one scale per chunk), got {config.bk}")
    rows_per_group = (a.shape[0] if form is Form.EXPERTS else a.shape[1]) / offs.shape[0]  # mean per expert
    config = config or pick_config(form, scaling, out_shape[-1], rows_per_group, fast_accum, interpreted,
                                   out_dtype.itemsize, groups_aligned and a.shape[1] % BLOCK == 0)
    out = torch.empty(out_shape, dtype=out_dtype, device=a.device) if out is None else out
    if form is Form.EXPERTS:
        launch_experts(a, b, out, offs, a_scale_inv, b_scale_inv, *scale_strides, scaling, fast_accum, config,
                       interpreted)
    else:
        launch_tokens(a, b, out, offs, a_scale_inv, b_scale_inv, *scale_strides, scaling, fast_accum, config,
                      interpreted, groups_aligned and a.shape[1] % config.bk == 0)
    return out


def grouped_mm_experts_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype=torch.bfloat16,
                                  use_fast_accum: bool = False, *, out=None, config: TileConfig | None = None):
    """out [T, N]: rows of expert e = (a_e . b[e]^T) * (a_scale_inv * b_scale_inv[e])."""
    T, K, E, N = _check_experts(a, b, offs, out_dtype)
    _check_scale(a_scale_inv, "a_scale_inv", [(), (1,)], a.device)
    _check_scale(b_scale_inv, "b_scale_inv", [(1,), (E,)], a.device)
    strides = ((0, 0), (0 if b_scale_inv.numel() == 1 else 1, 0, 0))
    return _run(Form.EXPERTS, Scaling.TENSORWISE, (a, b, a_scale_inv, b_scale_inv, offs), (T, N), out_dtype,
                use_fast_accum, out, config, strides, reference.experts_tensorwise)


def grouped_mm_experts_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype=torch.bfloat16, *,
                                 out=None, config: TileConfig | None = None):
    """out [T, N] with DeepSeek-V3 promotion: 1x128 tiles of a, 128x128 blocks of every b[e]."""
    T, K, E, N = _check_experts(a, b, offs, out_dtype)
    _check_multiple(K, "K")
    _check_multiple(N, "N")
    _check_scale(a_scale_inv, "a_scale_inv", [(T, K // BLOCK)], a.device)
    _check_scale(b_scale_inv, "b_scale_inv", [(E, N // BLOCK, K // BLOCK)], a.device)
    strides = (a_scale_inv.stride(), b_scale_inv.stride())
    return _run(Form.EXPERTS, Scaling.BLOCKWISE, (a, b, a_scale_inv, b_scale_inv, offs), (T, N), out_dtype,
                False, out, config, strides, reference.experts_blockwise)


def grouped_mm_tokens_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype=torch.bfloat16,
                                 use_fast_accum: bool = False, groups_aligned: bool = False, *, out=None,
                                 config: TileConfig | None = None):
    """out [E, M, N]: out[e] = (a[:, tokens e] . b[:, tokens e]^T) * (a_scale_inv * b_scale_inv).

    groups_aligned: the caller promises every offset is a multiple of 128 (groups padded with zero
    tokens), which allows one flat loop over all tiles (kernels/grouped_gemm_flat.py); a group that
    breaks the promise comes back NaN. False: any group sizes."""
    M, N, T = _check_tokens(a, b, offs, out_dtype)
    _check_scale(a_scale_inv, "a_scale_inv", [(), (1,)], a.device)
    _check_scale(b_scale_inv, "b_scale_inv", [(), (1,)], a.device)
    return _run(Form.TOKENS, Scaling.TENSORWISE, (a, b, a_scale_inv, b_scale_inv, offs), (offs.shape[0], M, N),
                out_dtype, use_fast_accum, out, config, ((0, 0), (0, 0)), reference.tokens_tensorwise,
                groups_aligned)


def grouped_mm_tokens_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype=torch.bfloat16, *,
                                out=None, config: TileConfig | None = None):
    """out [E, M, N] with promotion every 128 tokens; 1x128 token tiles of both operands."""
    M, N, T = _check_tokens(a, b, offs, out_dtype)
    _check_multiple(T, "the token dimension T")
    _check_scale(a_scale_inv, "a_scale_inv", [(M, T // BLOCK)], a.device)
    _check_scale(b_scale_inv, "b_scale_inv", [(N, T // BLOCK)], a.device)
    strides = (a_scale_inv.stride(), b_scale_inv.stride())
    return _run(Form.TOKENS, Scaling.BLOCKWISE, (a, b, a_scale_inv, b_scale_inv, offs), (offs.shape[0], M, N),
                out_dtype, False, out, config, strides, reference.tokens_blockwise, groups_aligned=True)
