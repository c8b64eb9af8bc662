"""On Hopper: the Triton grouped FP8 GEMMs (kernels/grouped_gemm*.py) against the per-expert torch
reference, at the shapes of the benchmark MoE layers, with ragged routed group sizes.

The reference multiplies the same FP8 operands in FP32 (exact products, FP32 sums). The kernels differ
by the tensor cores' accumulation: inside a 128-wide chunk (promoted tensorwise, blockwise) or over the
whole contraction (fast accumulation), so the bounds are relative Frobenius errors of an FP32 output;
each test prints the measured error so the margin is visible (-s). Also: CUDA-graph capture with the
offsets changed between replays (no host sync, device-side tile scheduling) and torch.compile with
fullgraph=True through the custom operators.
"""

import pytest
import torch

import kernels
from kernels import grouped_gemm_reference as reference


def _fp8_gpu() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    capability = torch.cuda.get_device_capability()
    return capability >= (8, 9), f"compute capability {capability} < (8, 9): no FP8 tensor cores"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _fp8_gpu()[0], reason=_fp8_gpu()[1])]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (tokens, top_k, experts, dim, hidden): the 8192-token top-2 and 16384-token top-8 layers
SMALL, LARGE = (8192, 2, 16, 2048, 1408), (16384, 8, 32, 7168, 2048)
TOLERANCE = {"promoted": 1e-3, "fast": 2e-2, "blockwise": 1e-3}


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's FP32 matmul must not round to TF32
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def routed_offsets(tokens, top_k, experts, align=1, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    chosen = torch.randn(tokens, experts, device="cuda", generator=gen).topk(top_k, dim=-1).indices
    sizes = torch.bincount(chosen.reshape(-1), minlength=experts)
    sizes = (sizes + align - 1) // align * align
    return sizes.cumsum(0).to(torch.int32), int(sizes.sum())


def fp8(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, device="cuda", generator=gen) * 40).to(dtype)


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check(name, got, want, mode):
    err = rel_err(got, want)
    print(f"\n{name}: relative error {err:.2e} (bound {TOLERANCE[mode]:.0e})")
    assert torch.isfinite(got).all()
    assert err < TOLERANCE[mode], f"{name}: {err:.2e}"


def experts_case(layer, n, k, a_dtype, seed=1):
    tokens, top_k, experts, _, _ = layer
    offs, rows = routed_offsets(tokens, top_k, experts, seed=seed)
    return fp8((rows, k), a_dtype, seed), fp8((experts, n, k), E4M3, seed + 1), offs


@pytest.mark.parametrize("layer,nk", [(SMALL, (1408, 2048)), (SMALL, (2048, 1408)), (LARGE, (2048, 7168)),
                                      (LARGE, (7168, 2048))], ids=["small-gate", "small-down", "large-gate",
                                                                   "large-down"])
@pytest.mark.parametrize("a_dtype,mode", [(E4M3, "promoted"), (E5M2, "promoted"), (E4M3, "fast")],
                         ids=["e4m3-promoted", "e5m2-promoted", "e4m3-fast"])
def test_experts_tensorwise(layer, nk, a_dtype, mode):
    a, b, offs = experts_case(layer, *nk, a_dtype)
    sa = torch.tensor([0.02], device="cuda")
    sb = torch.rand(b.shape[0], device="cuda") * 0.01 + 0.001
    got = kernels.grouped_mm_experts_tensorwise(a, b, sa, sb, offs, torch.float32, mode == "fast")
    check(f"experts tensorwise {tuple(a.shape)}x{tuple(b.shape)} {a_dtype}", got,
          reference.experts_tensorwise(a, b, sa, sb, offs, torch.float32), mode)


@pytest.mark.parametrize("layer,nk", [(SMALL, (1408, 2048)), (LARGE, (2048, 7168))], ids=["small", "large"])
def test_experts_blockwise(layer, nk):
    a, b, offs = experts_case(layer, *nk, E4M3)
    n, k = nk
    sa = torch.rand(k // 128, a.shape[0], device="cuda").t() * 0.01 + 0.001  # quantize_1x128's layout
    sb = torch.rand(b.shape[0], n // 128, k // 128, device="cuda") * 0.01 + 0.001
    got = kernels.grouped_mm_experts_blockwise(a, b, sa, sb, offs, torch.float32)
    check(f"experts blockwise {tuple(a.shape)}", got, reference.experts_blockwise(a, b, sa, sb, offs, torch.float32),
          "blockwise")


def tokens_case(layer, m, n, a_dtype, align, seed=3):
    tokens, top_k, experts, _, _ = layer
    offs, total = routed_offsets(tokens, top_k, experts, align=align, seed=seed)
    total16 = -(-total // 16) * 16  # TMA needs 16-byte row strides: pad the token dimension's end only
    return fp8((m, total16), a_dtype, seed), fp8((n, total16), E4M3, seed + 1), offs


@pytest.mark.parametrize("layer,mn", [(SMALL, (1408, 2048)), (SMALL, (2048, 1408)), (LARGE, (2048, 7168))],
                         ids=["small-gate", "small-down", "large-gate"])
@pytest.mark.parametrize("a_dtype,mode", [(E5M2, "promoted"), (E4M3, "fast")], ids=["e5m2-promoted", "e4m3-fast"])
def test_tokens_tensorwise_ragged_groups(layer, mn, a_dtype, mode):
    """Group boundaries at arbitrary tokens: TMA boxes start at unaligned coordinates."""
    a, b, offs = tokens_case(layer, *mn, a_dtype, align=1)
    sa, sb = torch.tensor([0.01], device="cuda"), torch.tensor([0.03], device="cuda")
    got = kernels.grouped_mm_tokens_tensorwise(a, b, sa, sb, offs, torch.float32, mode == "fast")
    check(f"tokens tensorwise {tuple(a.shape)}x{tuple(b.shape)}", got,
          reference.tokens_tensorwise(a, b, sa, sb, offs, torch.float32), mode)


@pytest.mark.parametrize("layer,mn", [(SMALL, (1408, 2048)), (LARGE, (2048, 7168))], ids=["small", "large"])
def test_tokens_tensorwise_aligned_groups(layer, mn):
    """Groups padded to 128 tokens with groups_aligned=True: the flat (tile, chunk) loop."""
    a, b, offs = tokens_case(layer, *mn, E5M2, align=128)
    sa, sb = torch.tensor([0.01], device="cuda"), torch.tensor([0.03], device="cuda")
    got = kernels.grouped_mm_tokens_tensorwise(a, b, sa, sb, offs, torch.float32, False, True)
    check(f"tokens tensorwise aligned {tuple(a.shape)}", got,
          reference.tokens_tensorwise(a, b, sa, sb, offs, torch.float32), "promoted")


@pytest.mark.parametrize("layer,mn", [(SMALL, (1408, 2048)), (LARGE, (2048, 7168))], ids=["small", "large"])
def test_tokens_blockwise(layer, mn):
    a, b, offs = tokens_case(layer, *mn, E4M3, align=128)
    t = a.shape[1] // 128 * 128
    a, b = a[:, :t], b[:, :t]
    sa = torch.rand(t // 128, mn[0], device="cuda").t() * 0.01 + 0.001  # quantize_1x128_t's layout
    sb = torch.rand(t // 128, mn[1], device="cuda").t() * 0.01 + 0.001
    got = kernels.grouped_mm_tokens_blockwise(a, b, sa, sb, offs, torch.float32)
    check(f"tokens blockwise {tuple(a.shape)}", got, reference.tokens_blockwise(a, b, sa, sb, offs, torch.float32),
          "blockwise")


def test_cuda_graph_replay_follows_device_offsets():
    """Captured once; the offsets tensor is rewritten between replays and the output follows: the
    tile schedule is computed on the device at every launch, nothing was baked in on the host."""
    a, b, offs = experts_case(SMALL, 1408, 2048, E4M3)
    sa, sb = torch.tensor([0.02], device="cuda"), torch.full((16,), 0.005, device="cuda")
    call = lambda: kernels.grouped_mm_experts_tensorwise(a, b, sa, sb, offs, torch.float32)  # noqa: E731
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed in (5, 6):
        new_offs, rows = routed_offsets(8192 - 512 * seed, 2, 16, seed=seed)
        offs.copy_(new_offs)
        graph.replay()
        torch.cuda.synchronize()
        check(f"graph replay {seed}", out, reference.experts_tensorwise(a, b, sa, sb, offs, torch.float32),
              "promoted")
        assert (out[rows:] == 0).all(), "rows past the new offs[-1] must be zeros"


def test_torch_compile_fullgraph():
    import kernels.library  # noqa: F401, PLC0415 (registers torch.ops.fp8train.*)

    a, b, offs = experts_case(SMALL, 1408, 2048, E5M2)
    sa, sb = torch.tensor([0.02], device="cuda"), torch.tensor([0.005], device="cuda")

    def block(a, b, sa, sb, offs):
        y = torch.ops.fp8train.grouped_mm_experts_tensorwise(a, b, sa, sb, offs, torch.bfloat16, False)
        return torch.nn.functional.silu(y.float())

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(a, b, sa, sb, offs), block(a, b, sa, sb, offs))
