"""Low-bit GEMM kernels vs the core's reference quantizers and an FP64 matmul (interpreter on CPU)."""

import pytest
import torch

from fp8train.inference.lowbit_matmul import lowbit_linear, prepare_weight, swiglu_input
from fp8train.quant import E4M3, INT4, INT8, UINT4, UINT8, Granularity, quantize
from fp8train.quant.spec import QuantSpec
from fp8train.quant.packing import pack_4bit
from kernels import lowbit_ops
from kernels.lowbit_ops import GemmConfig

FORMATS = {
    "uint4_g32": (UINT4, Granularity.tile(32), False),
    "int4_g64": (INT4, Granularity.tile(64), True),
    "int8_row": (INT8, Granularity.row(), True),
    "uint8_g32": (UINT8, Granularity.tile(32), False),
}


def _weight(name, n=48, k=128, seed=0):
    fmt, grid, sym = FORMATS[name]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return prepare_weight(quantize(w, fmt, grid, symmetric=sym))


def _expected(x, w):
    return (x.double() @ w.qt.dequantize().double().t()).float()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("m, cfg", [(1, GemmConfig(16, 32, 32, 1, 4, 1)), (1, GemmConfig(1, 32, 32, 2, 4, 1, 2)),
                                    (5, GemmConfig(16, 32, 32, 2, 4, 1)),
                                    (33, GemmConfig(64, 16, 32, 1, 4, 1)),
                                    (33, GemmConfig(64, 16, 32, 2, 4, 1, 1, True)),
                                    # 4-bit codes multiplied as even / odd halves (two dots) instead of interleaved
                                    (1, GemmConfig(1, 32, 32, 2, 4, 1, 2, interleave=False)),
                                    (33, GemmConfig(64, 16, 32, 2, 4, 1, 1, True, interleave=False))])
def test_weight_only_matmul_matches_fp64(name, m, cfg, device):
    w = _weight(name)
    qt = w.qt
    w_dev = prepare_weight(type(qt)(qt.data.to(device), qt.scale_inv.to(device), qt.granularity, qt.fmt,
                                    None if qt.zero_point is None else qt.zero_point.to(device)))
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(1)).to(device)
    got = lowbit_ops.lowbit_matmul(x, w_dev.codes, w_dev.scale, w_dev.zero, w_dev.bits, w_dev.group, w_dev.k,
                                   config=cfg)
    torch.testing.assert_close(got.cpu(), _expected(x.cpu(), w), rtol=1e-4, atol=1e-4)
    again = lowbit_ops.lowbit_matmul(x, w_dev.codes, w_dev.scale, w_dev.zero, w_dev.bits, w_dev.group, w_dev.k,
                                     config=cfg)  # split-K left its workspace zeroed
    assert torch.equal(got, again)


def test_swiglu_input_is_fused_into_the_load(device):
    w = _weight("uint4_g32")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    w_dev = prepare_weight(type(w.qt)(w.qt.data.to(device), w.qt.scale_inv.to(device), w.qt.granularity, w.qt.fmt,
                                      w.qt.zero_point.to(device)))
    got = lowbit_linear(x.to(device), w_dev, swiglu=True, backend="triton")
    torch.testing.assert_close(got.cpu(), _expected(swiglu_input(x), w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["uint4_g32", "int4_g64", "int8_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_core_dequantize_rounded_once(name, dtype, device):
    w = _weight(name, n=40, k=128)
    zero = None if w.zero is None else w.zero.to(device)
    got = lowbit_ops.dequantize_weight(w.codes.to(device), w.scale.to(device), zero, w.bits, w.group, w.k, dtype)
    assert torch.equal(got.cpu(), w.qt.dequantize().to(dtype))


def test_bf16_activations_use_the_bf16_tensor_core_path(device):
    w = _weight("uint4_g32")
    x = torch.randn(2, 128).bfloat16()
    got = lowbit_ops.lowbit_matmul(x.to(device), w.codes.to(device), w.scale.to(device), w.zero.to(device), w.bits,
                                   w.group, w.k, config=GemmConfig(16, 32, 32, 1, 4, 1))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), _expected(x.float(), w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fp8", [False, True])
def test_per_token_activation_quantization_is_bit_exact(fp8, device):
    x = torch.randn(6, 200) * 5
    x[2] = 0.0
    codes, scale = lowbit_ops.quantize_rows(x.to(device), fp8=fp8)
    ref = quantize(x, E4M3 if fp8 else INT8, Granularity.row())
    assert torch.equal(codes.view(torch.uint8).cpu(), ref.data.view(torch.uint8))
    assert torch.equal(scale.cpu(), ref.scale_inv)


@pytest.mark.parametrize("spec", [QuantSpec("int8", "row"), QuantSpec("e4m3", "row")])
def test_w8a8_dispatch_matches_the_reference(spec, device):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=g)
    qw = quantize(w, spec.fmt, Granularity.row())
    x = torch.randn(7, 128, generator=g)
    ref = lowbit_linear(x, qw, spec, backend="reference")
    if spec.format == "int8" or device == "cuda":  # torch._scaled_mm: CUDA only
        qw_dev = type(qw)(qw.data.to(device), qw.scale_inv.to(device), qw.granularity, qw.fmt)
        got = lowbit_linear(x.to(device), qw_dev, spec, backend="triton").cpu()
        if spec.format == "e4m3" and device == "cuda":
            # Hopper's FP8 tensor cores keep ~13 mantissa bits in the accumulator between promotions
            # to FP32 (DeepSeek-V3 report 3.3.2), so the error follows sum_k |x_k w_k|, not the
            # (cancelling) result: on an H200 (2026-11-28) the worst element was off by 7.6e-3 with
            # outputs of std ~11 and sum |x w| ~80, ~2^-13 of it (not BF16 rounding of the output,
            # which would reach 3e-2 at |out| ~ 11). Bound: 2^-10 of sum |x w| (a wrong scale or
            # layout is off by O(|out|)).
            xq = quantize(x, spec.fmt, Granularity.row())
            bound = 2.0 ** -10 * (xq.dequantize().abs() @ qw.dequantize().abs().t())
            assert ((got - ref).abs() <= bound).all(), f"worst {(got - ref).abs().max():.3g} > bound {bound.min():.3g}"
        else:  # INT8: exact integer sums, then the scales
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    expected = x @ w.t()  # quantization error only
    assert ((ref - expected).norm() / expected.norm()) < (0.02 if spec.format == "int8" else 0.08)


def test_int8_matmul_kernel_is_exact_before_scaling(device):
    xq = torch.randint(-127, 128, (20, 128), dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 128), dtype=torch.int8)
    ones_x, ones_w = torch.ones(20, 1), torch.ones(40, 1)
    got = lowbit_ops.int8_matmul(xq.to(device), ones_x.to(device), wq.to(device), ones_w.to(device), torch.float32,
                                 GemmConfig(16, 32, 64))
    assert torch.equal(got.cpu(), (xq.long() @ wq.long().t()).float())


SPECS = [(4, False, 32, UINT4, Granularity.tile(32)), (4, True, 64, INT4, Granularity.tile(64)),
         (8, True, 0, INT8, Granularity.row()), (8, False, 0, UINT8, Granularity.row())]


@pytest.mark.parametrize("bits, symmetric, group, fmt, grid", SPECS)
def test_batched_quantization_is_the_core_quantizer(bits, symmetric, group, fmt, grid, device):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(n, k, generator=g) for n, k in ((20, 128), (33, 64), (8, 192))]
    outs = lowbit_ops.batched_quantize([w.to(device) for w in weights], bits, symmetric, group)
    outs = [tuple(None if t is None else t.cpu() for t in o) for o in outs]
    for w, (codes, scale, zero) in zip(weights, outs):
        ref = quantize(w, fmt, grid, symmetric=symmetric)
        expect = pack_4bit(ref.data) if bits == 4 else ref.data
        assert torch.equal(codes.view(expect.dtype), expect)
        assert torch.equal(scale, ref.scale_inv.reshape(scale.shape))
        if not symmetric:
            assert torch.equal(zero, ref.zero_point.reshape(zero.shape).to(torch.uint8))


def test_dispatch_errors_name_the_problem():
    w = _weight("uint4_g32")
    with pytest.raises(ValueError, match="expects K=128"):
        lowbit_linear(torch.randn(2, 64), w, backend="reference")
    fp8_w = quantize(torch.randn(16, 64), E4M3, Granularity.row())
    with pytest.raises(ValueError, match="needs input_spec"):
        lowbit_linear(torch.randn(2, 64), fp8_w)
    with pytest.raises(ValueError, match="needs a INT8 weight|needs a int8"):
        lowbit_linear(torch.randn(2, 128), w, QuantSpec("int8", "row"))
    with pytest.raises(ValueError, match="backend="):
        lowbit_linear(torch.randn(2, 128), w, backend="cuda")
