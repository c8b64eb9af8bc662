"""Grouped FP8 GEMMs (kernels/grouped_gemm*.py) against the per-expert torch reference.

Without a GPU the Triton kernels run in the interpreter on tiny tiles (32 x 32, chunks of 64 or
128); with one, the same tests run the compiled kernels. Two kinds of data:
  * "dyadic": FP8 values in +-[1/2, 2] and power-of-2 scales. Every product and partial sum is then
    exact in FP32 whatever the summation order, so interpreter results must equal the reference
    bit for bit, in FP32 and in BF16. (On a GPU the tensor cores keep fewer bits inside a chunk:
    there the same data is compared with a tolerance.)
  * "random": normal data over the FP8 range with arbitrary scales, compared with a tolerance.
"""

import pytest
import torch

from kernels import grouped_gemm_ops as ops
from kernels import grouped_gemm_reference as reference
from kernels.grouped_gemm_launch import INTERPRETER_CONFIGS, Form, Scaling, with_overrides

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: numpy inf/NaN
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PAIRS = [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)]
OPS = {(Form.EXPERTS, Scaling.TENSORWISE): (ops.grouped_mm_experts_tensorwise, reference.experts_tensorwise),
       (Form.EXPERTS, Scaling.BLOCKWISE): (ops.grouped_mm_experts_blockwise, reference.experts_blockwise),
       (Form.TOKENS, Scaling.TENSORWISE): (ops.grouped_mm_tokens_tensorwise, reference.tokens_tensorwise),
       (Form.TOKENS, Scaling.BLOCKWISE): (ops.grouped_mm_tokens_blockwise, reference.tokens_blockwise)}
VARIANTS = list(OPS)
IDS = [f"{f.value}-{s.value}" for f, s in VARIANTS]
# Ragged groups with an empty expert; token groups 128-aligned where blockwise needs it.
EXPERT_ROWS = [5, 0, 70, 19]
TOKEN_GROUPS = {Scaling.TENSORWISE: [48, 0, 144, 64], Scaling.BLOCKWISE: [128, 0, 256, 0]}


def _fp8(shape, dtype, gen, dyadic: bool) -> torch.Tensor:
    if dyadic:  # +-2^u, u in [-1, 1]: every code has a coarse grid, sums stay exact in FP32
        x = torch.exp2(torch.rand(shape, generator=gen) * 2 - 1)
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, -x, x)
    else:
        x = torch.randn(shape, generator=gen) * 40
    return x.to(dtype)


def _scales(shape, gen, dyadic: bool) -> torch.Tensor:
    if dyadic:
        return torch.exp2(torch.randint(-1, 2, shape, generator=gen).float())
    return torch.rand(shape, generator=gen) * 0.05 + 0.01


def make_case(form, scaling, dtypes=(E4M3, E4M3), dyadic=True, seed=0, groups=None, extra=None):
    """(a, b, a_scale_inv, b_scale_inv, offs) on the CPU; `extra` rows/tokens past offs[-1]."""
    gen = torch.Generator().manual_seed(seed)
    if extra is None:
        extra = 128 if (form, scaling) == (Form.TOKENS, Scaling.BLOCKWISE) else 16
    groups = groups if groups is not None else (EXPERT_ROWS if form is Form.EXPERTS else TOKEN_GROUPS[scaling])
    E, total = len(groups), sum(groups) + extra
    offs = torch.tensor(groups).cumsum(0).to(torch.int32)
    if form is Form.EXPERTS:
        K, N = 256, 128 if scaling is Scaling.BLOCKWISE else 48
        a, b = _fp8((total, K), dtypes[0], gen, dyadic), _fp8((E, N, K), dtypes[1], gen, dyadic)
        if scaling is Scaling.TENSORWISE:
            return a, b, _scales((1,), gen, dyadic), _scales((E,), gen, dyadic), offs
        sa = _scales((K // 128, total), gen, dyadic).t()  # outer-major, as quantize_1x128 writes it
        return a, b, sa, _scales((E, N // 128, K // 128), gen, dyadic), offs
    M, N = 40, 48
    a, b = _fp8((M, total), dtypes[0], gen, dyadic), _fp8((N, total), dtypes[1], gen, dyadic)
    if scaling is Scaling.TENSORWISE:
        return a, b, _scales((1,), gen, dyadic), _scales((1,), gen, dyadic), offs
    return a, b, _scales((M, total // 128), gen, dyadic), _scales((N, total // 128), gen, dyadic), offs


def run(form, scaling, case, device, out_dtype=torch.float32, **kwargs):
    op = OPS[(form, scaling)][0]
    return op(*(t.to(device) for t in case), out_dtype, **kwargs)


def expected(form, scaling, case, out_dtype=torch.float32):
    return OPS[(form, scaling)][1](*case, out_dtype)


def rel_err(got, want) -> float:
    return ((got.float().cpu() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def assert_matches(got, want, device, tol_gpu=5e-3):
    assert got.shape == want.shape and got.dtype == want.dtype
    if device == "cpu":  # interpreter, exact data: the reference bit for bit
        assert torch.equal(got.cpu().view(torch.int8) if got.dtype == torch.bfloat16 else got.cpu(),
                           want.view(torch.int8) if want.dtype == torch.bfloat16 else want), \
            f"max abs diff {(got.float().cpu() - want.float()).abs().max().item()}"
    else:
        assert rel_err(got, want) < tol_gpu


def test_runs_triton(device):
    """Guard: without this the comparisons could silently compare the reference to itself."""
    name, reason = ops.grouped_backend(torch.zeros(1, device=device))
    assert name in ("triton", "interpreter"), reason


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtypes", PAIRS[:2], ids=["e4m3xe4m3", "e5m2xe4m3"])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "ptr"])
def test_dyadic_matches_reference_exactly(device, form, scaling, dtypes, use_tma):
    case = make_case(form, scaling, dtypes, seed=1)
    config = with_overrides(INTERPRETER_CONFIGS[scaling], use_tma=use_tma) if device == "cpu" else None
    got = run(form, scaling, case, device, config=config)
    assert_matches(got, expected(form, scaling, case), device)


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
def test_bf16_output(device, form, scaling):
    """BF16 is the FP32 result rounded once (same kernel, same order), and on exact data the
    reference's BF16 bit for bit."""
    case = make_case(form, scaling, (E4M3, E5M2), seed=2)
    got16 = run(form, scaling, case, device, torch.bfloat16)
    got32 = run(form, scaling, case, device, torch.float32)
    assert torch.equal(got16.cpu().view(torch.int16), got32.cpu().to(torch.bfloat16).view(torch.int16))
    assert_matches(got16, expected(form, scaling, case, torch.bfloat16), device, tol_gpu=1e-2)


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
def test_random_data_close_to_reference(device, form, scaling):
    case = make_case(form, scaling, (E5M2, E4M3), dyadic=False, seed=3)
    got = run(form, scaling, case, device)
    tol = 1e-6 if device == "cpu" else 5e-3
    assert rel_err(got, expected(form, scaling, case)) < tol


@pytest.mark.parametrize("form", list(Form), ids=[f.value for f in Form])
def test_fast_accumulation(device, form):
    case = make_case(form, Scaling.TENSORWISE, dyadic=False, seed=4)
    got = run(form, Scaling.TENSORWISE, case, device, use_fast_accum=True)
    assert rel_err(got, expected(form, Scaling.TENSORWISE, case)) < (1e-6 if device == "cpu" else 2e-2)
