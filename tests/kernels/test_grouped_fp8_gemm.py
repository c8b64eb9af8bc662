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
from kernels.grouped_gemm_configs import Form, Scaling, pick_config, with_overrides

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


def config_for(device, form, scaling, **overrides):
    """The interpreter's tiny config on CPU, the table's GPU config otherwise, with overrides."""
    base = pick_config(form, scaling, 128, 4096, False, interpreted=device == "cpu")
    return with_overrides(base, **overrides)


def test_runs_triton(device):
    """Guard: without this the comparisons could silently compare the reference to itself."""
    name, reason = ops.grouped_backend(torch.zeros(1, device=device))
    assert name in ("triton", "interpreter"), reason


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtypes", PAIRS[:2], ids=["e4m3xe4m3", "e5m2xe4m3"])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "ptr"])
def test_dyadic_matches_reference_exactly(device, form, scaling, dtypes, use_tma):
    case = make_case(form, scaling, dtypes, seed=1)
    config = config_for(device, form, scaling, use_tma=use_tma)
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


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
def test_every_element_written(device, form, scaling):
    """A NaN-poisoned `out` comes back NaN-free: rows past offs[-1] and empty experts are zeros."""
    case = make_case(form, scaling, dyadic=False, seed=5)
    want = expected(form, scaling, case)
    out = torch.full(want.shape, float("nan"), device=device)
    got = run(form, scaling, case, device, out=out)
    assert got is out and not torch.isnan(out).any()
    if form is Form.EXPERTS:
        assert (out[int(case[4][-1]):] == 0).all(), "rows no expert owns must be zeros"
    else:
        assert (out[1] == 0).all(), "an expert without tokens must get exact zeros"
    assert rel_err(out, want) < (1e-6 if device == "cpu" else 5e-3)


@pytest.mark.parametrize("groups,extra", [([0, 0, 0], 7), ([37], 0), ([3, 0, 0, 1, 40, 0, 2, 9, 0], 5)],
                         ids=["all-empty", "one-expert", "nine-experts"])
@pytest.mark.parametrize("form", list(Form), ids=[f.value for f in Form])
def test_group_layouts(device, form, groups, extra):
    case = make_case(form, Scaling.TENSORWISE, (E5M2, E4M3), seed=6, groups=groups, extra=extra)
    got = run(form, Scaling.TENSORWISE, case, device)
    assert_matches(got, expected(form, Scaling.TENSORWISE, case), device)


def test_shared_weight_scale_and_strided_rows(device):
    """b_scale_inv [1] serves every expert; `a` may be a row-strided view (leading dim > K)."""
    a, b, sa, _, offs = make_case(Form.EXPERTS, Scaling.TENSORWISE, seed=7)
    wide = torch.zeros(a.shape[0], a.shape[1] + 32, dtype=a.dtype)
    wide[:, 16:16 + a.shape[1]] = a
    view = wide[:, 16:16 + a.shape[1]]
    case = (view, b, sa, torch.tensor([0.5]), offs)
    for use_tma in (True, False):
        config = config_for(device, Form.EXPERTS, Scaling.TENSORWISE, use_tma=use_tma)
        got = run(Form.EXPERTS, Scaling.TENSORWISE, case, device, config=config)
        assert_matches(got, expected(Form.EXPERTS, Scaling.TENSORWISE, (a, *case[1:])), device)


@pytest.mark.parametrize("bn", [64, 128, 256])
def test_blockwise_experts_tiles_within_and_across_weight_blocks(device, bn):
    """N = 384: three 128-wide weight blocks with different scales. Tiles of <= 128 columns take
    one weight factor per chunk (folded into the row factors), 256-wide tiles one per column."""
    gen = torch.Generator().manual_seed(13)
    E, K, N, groups = 3, 256, 384, [37, 0, 90]
    offs = torch.tensor(groups).cumsum(0).to(torch.int32)
    total = sum(groups) + 16
    a, b = _fp8((total, K), E4M3, gen, True), _fp8((E, N, K), E5M2, gen, True)
    sa = _scales((K // 128, total), gen, True).t()
    sb = _scales((E, N // 128, K // 128), gen, True)
    assert sb[:, 0].ne(sb[:, 1]).any() and sb[:, 1].ne(sb[:, 2]).any()  # the blocks differ
    # a 256-wide tile at the table's 4 stages needs 332 KB of shared memory (H200, session 10): the
    # test shrinks the pipeline, which changes nothing in the scale arithmetic it checks
    small = {"bm": 64, "num_stages": 2} if bn == 256 and device != "cpu" else {}
    config = config_for(device, Form.EXPERTS, Scaling.BLOCKWISE, bn=bn, **small)
    got = run(Form.EXPERTS, Scaling.BLOCKWISE, (a, b, sa, sb, offs), device, config=config)
    assert_matches(got, expected(Form.EXPERTS, Scaling.BLOCKWISE, (a, b, sa, sb, offs)), device)


@pytest.mark.parametrize("scaling", list(Scaling), ids=[s.value for s in Scaling])
def test_weight_as_strided_expert_view(device, scaling):
    """b may be a strided [E, R, C] view, e.g. the per-expert blocks of one transposed weight copy
    W^T [R, E * C] (what a 128x128 cast with transpose of the stacked weights produces)."""
    a, b, sa, sb, offs = make_case(Form.EXPERTS, scaling, seed=12)
    E, R, C = b.shape
    wide = b.permute(1, 0, 2).contiguous()  # [R, E, C]: expert e's block at columns [e*C, (e+1)*C)
    view = wide.view(R, E, C).permute(1, 0, 2)  # [E, R, C] with strides (C, E*C, 1)
    assert view.stride() == (C, E * C, 1) and torch.equal(view.view(torch.uint8), b.view(torch.uint8))
    for use_tma in (True, False):
        config = config_for(device, Form.EXPERTS, scaling, use_tma=use_tma)
        got = run(Form.EXPERTS, scaling, (a, view, sa, sb, offs), device, config=config)
        assert_matches(got, expected(Form.EXPERTS, scaling, (a, b, sa, sb, offs)), device)


@pytest.mark.parametrize("scaling", list(Scaling), ids=[s.value for s in Scaling])
def test_tokens_strided_operands(device, scaling):
    a, b, sa, sb, offs = make_case(Form.TOKENS, scaling, seed=8)
    a_wide = torch.zeros(a.shape[0], a.shape[1] + 64, dtype=a.dtype)
    a_wide[:, :a.shape[1]] = a
    case = (a_wide[:, :a.shape[1]], b, sa, sb, offs)
    got = run(Form.TOKENS, scaling, case, device)
    assert_matches(got, expected(Form.TOKENS, scaling, (a, b, sa, sb, offs)), device)


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
def test_unfused_tile_loop(device, form, scaling):
    """The table fuses the tile and K loops (flatten=True); the plain nested loops must agree too.
    The interpreter ignores the flag, so this runs on compiled kernels only."""
    if device == "cpu":
        pytest.skip("the Triton interpreter ignores tl.range(flatten=...): compiled kernels only")
    case = make_case(form, scaling, seed=9)
    got = run(form, scaling, case, device, config=config_for(device, form, scaling, flatten=False))
    assert_matches(got, expected(form, scaling, case), device)


ALIGNED_GROUPS = [128, 0, 256, 128]


@pytest.mark.parametrize("scaling", list(Scaling), ids=[s.value for s in Scaling])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "ptr"])
def test_flat_tokens_kernel(device, scaling, use_tma):
    """Groups aligned to 128 (blockwise always; tensorwise with groups_aligned=True) run the flat
    (tile, chunk) loop of kernels/grouped_gemm_flat.py: exact results, zeros for the empty expert,
    every element written."""
    case = make_case(Form.TOKENS, scaling, (E5M2, E4M3), seed=14, groups=ALIGNED_GROUPS, extra=128)
    config = config_for(device, Form.TOKENS, scaling, flatten=True, use_tma=use_tma)
    kwargs = {"groups_aligned": True} if scaling is Scaling.TENSORWISE else {}
    want = expected(Form.TOKENS, scaling, case)
    out = torch.full(want.shape, float("nan"), device=device)
    run(Form.TOKENS, scaling, case, device, out=out, config=config, **kwargs)
    assert (out[1] == 0).all()
    assert_matches(out, want, device)


def test_flat_tokens_kernel_marks_broken_alignment(device):
    """groups_aligned=True is a promise; a group that breaks it comes back NaN, the others exact."""
    a, b, sa, sb, _ = make_case(Form.TOKENS, Scaling.TENSORWISE, seed=15, groups=ALIGNED_GROUPS, extra=128)
    offs = torch.tensor([100, 100, 256, 384], dtype=torch.int32)
    config = config_for(device, Form.TOKENS, Scaling.TENSORWISE, flatten=True, use_tma=False)
    got = run(Form.TOKENS, Scaling.TENSORWISE, (a, b, sa, sb, offs), device, config=config,
              groups_aligned=True).cpu()
    assert torch.isnan(got[0]).all() and torch.isnan(got[2]).all()
    want = reference.tokens_tensorwise(a, b, sa, sb, offs, torch.float32)
    assert_matches(got[3], want[3], device)


def test_blockwise_tokens_misaligned_groups_give_nan(device):
    """Blockwise grad_weight needs 128-aligned groups; the kernel cannot check on the host without a
    sync, so a group that is not aligned comes back NaN instead of silently wrong."""
    a, b, sa, sb, _ = make_case(Form.TOKENS, Scaling.BLOCKWISE, seed=10)
    offs = torch.tensor([100, 128, 256, 256], dtype=torch.int32)
    got = run(Form.TOKENS, Scaling.BLOCKWISE, (a, b, sa, sb, offs), device).cpu()
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()
    want = reference.tokens_blockwise(a, b, sa, sb, torch.tensor([128, 128, 256, 256], dtype=torch.int32),
                                      torch.float32)
    assert rel_err(got[2], want[2]) < (1e-6 if device == "cpu" else 5e-3) and (got[3] == 0).all()


BAD_ARGUMENTS = [
    ("a dtype", lambda a, b, sa, sb, o: (a.float(), b, sa, sb, o), "a must be one of"),
    ("K mismatch", lambda a, b, sa, sb, o: (a[:, :128], b, sa, sb, o), "must share K"),
    ("offs dtype", lambda a, b, sa, sb, o: (a, b, sa, sb, o.long()), "offs must be int32"),
    ("offs length", lambda a, b, sa, sb, o: (a, b, sa, sb, o[:2]), "offs must be int32"),
    ("weight scale", lambda a, b, sa, sb, o: (a, b, sa, sb[:2], o), "b_scale_inv must be float32"),
    ("b strides", lambda a, b, sa, sb, o: (a, b.transpose(1, 2).contiguous().transpose(1, 2), sa, sb, o), "stride"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise(name, mutate, message):
    case = make_case(Form.EXPERTS, Scaling.TENSORWISE)
    with pytest.raises(ValueError, match=message):
        ops.grouped_mm_experts_tensorwise(*mutate(*case))


def test_bad_blockwise_arguments_raise():
    a, b, sa, sb, offs = make_case(Form.EXPERTS, Scaling.BLOCKWISE)
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.grouped_mm_experts_blockwise(a[:, :192], b[:, :, :192].contiguous(), sa, sb, offs)
    with pytest.raises(ValueError, match=r"a_scale_inv must be float32 with shape in \[\(110, 2\)\]"):
        ops.grouped_mm_experts_blockwise(a, b, sa.t(), sb, offs)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.grouped_mm_experts_blockwise(a, b, sa, sb, offs, torch.int32)
    ta, tb, tsa, tsb, toffs = make_case(Form.TOKENS, Scaling.BLOCKWISE)
    with pytest.raises(ValueError, match="token dimension T to be a multiple of 128"):
        ops.grouped_mm_tokens_blockwise(ta[:, :500], tb[:, :500], tsa, tsb, toffs)
    with pytest.raises(ValueError, match="out must be"):
        ops.grouped_mm_tokens_blockwise(ta, tb, tsa, tsb, toffs, out=torch.empty(4, 40, 47))


def test_reference_rejects_bad_offsets():
    with pytest.raises(ValueError, match="non-decreasing"):
        reference.group_bounds(torch.tensor([5, 3], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="within"):
        reference.group_bounds(torch.tensor([5, 11], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="multiple of 128"):
        reference.group_bounds(torch.tensor([128, 200], dtype=torch.int32), 256, multiple=128)


def _op_args(form, scaling):
    """Small cases for the operator tests (each opcheck runs the op several times)."""
    groups = [3, 0, 9] if form is Form.EXPERTS else ([128, 0] if scaling is Scaling.BLOCKWISE else [16, 0, 32])
    case = make_case(form, scaling, (E5M2, E4M3), seed=11, groups=groups, extra=0)
    flags = {(Form.EXPERTS, Scaling.TENSORWISE): (False,), (Form.TOKENS, Scaling.TENSORWISE): (False, False)}
    return (*case, torch.bfloat16, *flags.get((form, scaling), ()))


@pytest.mark.parametrize("form,scaling", VARIANTS, ids=IDS)
def test_custom_operators_pass_opcheck(form, scaling):
    """The fake implementation agrees with the real kernels (opcheck's schema test perturbs its
    inputs with arithmetic FP8 tensors do not support on CPU, so it is not run here)."""
    import kernels.library  # noqa: F401, PLC0415 (registers torch.ops.fp8train.*)

    op = getattr(torch.ops.fp8train, f"grouped_mm_{form.value}_{scaling.value}")
    torch.library.opcheck(op, _op_args(form, scaling), test_utils=("test_faketensor",))


def test_compiles_without_graph_break():
    """The offsets stay a tensor: torch.compile(fullgraph=True) traces the operator, no host sync."""
    import kernels.library  # noqa: F401, PLC0415

    args = _op_args(Form.EXPERTS, Scaling.TENSORWISE)

    def block(a, b, sa, sb, offs):
        return torch.ops.fp8train.grouped_mm_experts_tensorwise(a, b, sa, sb, offs, torch.float32, False) * 2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args[:5]), block(*args[:5]))


@pytest.mark.parametrize("form", list(Form), ids=[f.value for f in Form])
def test_launch_arguments_follow_the_kernel_signature(monkeypatch, device, form):
    """LeanKernel skips Triton's dispatch only when (args, constexprs) are the kernel's parameters in
    order; a mismatch would silently cost ~30 us of host time per launch on the GPU."""
    from kernels.launcher import LeanKernel  # noqa: PLC0415

    seen = []
    original = LeanKernel.__call__

    def spy(self, grid, args, constexprs, num_warps=4):
        seen.append(self._in_signature_order(args, constexprs))
        return original(self, grid, args, constexprs, num_warps)

    monkeypatch.setattr(LeanKernel, "__call__", spy)
    case = make_case(form, Scaling.TENSORWISE, groups=[16, 0, 16], extra=0)
    run(form, Scaling.TENSORWISE, case, device)
    assert seen == [True]


@pytest.mark.parametrize("form", list(Form), ids=[f.value for f in Form])
def test_bad_offsets_stay_inside_the_buffers(device, form):
    """Offsets are not validated on the host (that would sync). Decreasing or out-of-range offsets
    give meaningless rows, but the launch must finish and write every element with finite values."""
    case = make_case(form, Scaling.TENSORWISE, seed=13, groups=[30, 10, 40, 5], extra=3)
    bad = torch.tensor([40, 10, 500, -3], dtype=torch.int32)
    shape = expected(form, Scaling.TENSORWISE, case).shape
    out = torch.full(shape, float("nan"), device=device)
    run(form, Scaling.TENSORWISE, (*case[:4], bad), device, out=out)
    assert torch.isfinite(out).all()


def test_compiled_configs_fit_shared_memory():
    """Every compiled config, with an FP32 or BF16 output tile, fits sm_90's shared memory (the first
    H200 run: 128 x 256 x 3 stages + an FP32 tile asked 278,552 of 232,448 bytes)."""
    from kernels.grouped_gemm_configs import CONFIGS, SMEM_BYTES, ShapeClass, smem_bytes

    rows = {ShapeClass.WIDE: 4096, ShapeClass.NARROW: 4096, ShapeClass.WIDE_SHORT: 512, ShapeClass.NARROW_SHORT: 512}
    for form, scaling, shape, fast in CONFIGS:
        n = 2048 if shape in (ShapeClass.WIDE, ShapeClass.WIDE_SHORT) else 1408
        for out_bytes, aligned in ((2, False), (4, False), (2, True), (4, True)):
            config = pick_config(form, scaling, n, rows[shape], fast, interpreted=False, out_bytes=out_bytes,
                                 groups_aligned=aligned)
            assert smem_bytes(config, out_bytes) <= SMEM_BYTES, (form, scaling, shape, fast, out_bytes, config)
    wide = pick_config(Form.EXPERTS, Scaling.TENSORWISE, 2048, 4096, True, interpreted=False, out_bytes=4)
    assert wide.num_stages == 2  # 3 stages do not fit with an FP32 tile


def test_long_groups_pick_the_swept_128x256_configs():
    """Session 8's H200 sweep at 16384 tokens top-8 of 32 experts: promoted grad_input and the aligned
    tokens form take 128 x 256 tiles there; short groups, ragged tokens and FP32 outputs keep 128 x 128."""
    def tokens(rows_per_expert: float, out_bytes: int = 2, aligned: bool = True):
        cfg = pick_config(Form.TOKENS, Scaling.TENSORWISE, 2048, rows_per_expert, False, interpreted=False,
                          out_bytes=out_bytes, groups_aligned=aligned)
        return cfg.bm, cfg.bn, cfg.num_stages

    assert tokens(4096) == (128, 256, 3)
    assert tokens(1024) == (128, 128, 4)  # the 8192-token top-2 layer: unmeasured, unchanged
    assert tokens(4096, out_bytes=4) == (128, 128, 4)  # 3 stages + an FP32 tile do not fit
    assert tokens(4096, aligned=False) == (128, 128, 4)  # ragged groups: pointer loads, 128 x 128 measured
    promoted = pick_config(Form.EXPERTS, Scaling.TENSORWISE, 7168, 4096, False, interpreted=False)
    assert (promoted.bm, promoted.bn, promoted.num_stages, promoted.group_m) == (128, 256, 3, 4)
    short = pick_config(Form.EXPERTS, Scaling.TENSORWISE, 7168, 1024, False, interpreted=False)
    assert (short.bm, short.bn) == (64, 256)
