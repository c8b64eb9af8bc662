"""The decode GEMV (kernels/lowbit_gemv.py) vs an FP64 dequantize-then-matmul and vs the GEMM kernel.

Every format (int4 / uint4 / int8 / uint8, symmetric or with zeros, grouped or per-row scales), M in
{1, 3, 16}, every split option (none, FP32 atomics, workspace + sum kernel), CUDA-core tiles that
cover one group or several, and tensor-core tiles where legal. Small shapes: interpreter on a CPU.
"""

import json

import pytest
import torch
import triton
import triton.language as tl

from fp8train.inference.lowbit_matmul import lowbit_linear, prepare_weight, swiglu_input
from fp8train.quant import INT4, INT8, UINT4, UINT8, Granularity, quantize
from kernels import lowbit_ops
from kernels.lowbit_gemv import _field_f32
from kernels.lowbit_gemv_ops import GemvConfig, SplitReduce, check_gemv, gemv_candidates, lowbit_gemv
from kernels.lowbit_ops import GemmConfig

N, K = 64, 256
FORMATS = {  # name: (format, granularity, symmetric)
    "int4_g32": (INT4, Granularity.tile(32), True),
    "uint4_g64": (UINT4, Granularity.tile(64), False),
    "uint4_g128": (UINT4, Granularity.tile(128), False),
    "int4_row": (INT4, Granularity.row(), True),
    "int8_row": (INT8, Granularity.row(), True),
    "uint8_g64": (UINT8, Granularity.tile(64), False),
}
A, R = SplitReduce.ATOMIC, SplitReduce.REDUCE
CONFIGS = {
    "one_tile_many_groups": GemvConfig(64, 256),  # BLOCK_K = 256 covers 8 / 4 / 2 groups (or the row)
    "split2_atomic": GemvConfig(32, 64, 2, A),  # BLOCK_K <= group: one group per tile
    "split4_reduce": GemvConfig(64, 32, 4, R, num_warps=2),
    "dot_split2_reduce": GemvConfig(32, 128, 2, R, dot=True),  # tensor cores (legal for g128 / row)
    "tall_8_warps": GemvConfig(128, 256, num_warps=8),  # taller than N: masked rows
}


def _weight(name, device, n=N, k=K, seed=0):
    fmt, grid, sym = FORMATS[name]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qt = quantize(w, fmt, grid, symmetric=sym)
    zero = None if qt.zero_point is None else qt.zero_point.to(device)
    return prepare_weight(type(qt)(qt.data.to(device), qt.scale_inv.to(device), qt.granularity, qt.fmt, zero))


def _rel_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def _legal(cfg, name):
    """Tensor-core tiles take one group of >= 16 words per tile (else a ValueError, tested below)."""
    fmt, grid, _ = FORMATS[name]
    group = grid.size if grid.size else K
    return not cfg.dot or group >= cfg.block_k and cfg.block_k * fmt.bits // 32 >= 16


CASES = [(name, cfg) for name in FORMATS for cfg in CONFIGS if _legal(CONFIGS[cfg], name)]
# M = 16 (16 rows unrolled: ~2 s a case in the interpreter) for every tile on two formats (a 4-bit
# group grid, an 8-bit one) and for the single-tile / tensor-core configs on all of them
M16 = [(name, cfg) for name, cfg in CASES
       if name in ("int4_g32", "uint8_g64") or cfg in ("one_tile_many_groups", "dot_split2_reduce")]
CASES_M = [(name, cfg, m) for name, cfg in CASES for m in (1, 3)] + [(name, cfg, 16) for name, cfg in M16]


@pytest.mark.parametrize("name, cfg_name, m", CASES_M)
def test_gemv_matches_fp64_reference(name, cfg_name, m, device):
    w, cfg = _weight(name, device), CONFIGS[cfg_name]
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1))
    want = x.double() @ w.qt.dequantize().double().cpu().t()
    got = lowbit_gemv(x.to(device), w.codes, w.scale, w.zero, w.bits, w.group, w.k, cfg)
    assert got.shape == (m, N) and got.dtype == torch.float32
    assert _rel_err(got, want) < 1e-5  # FP32 sums of exact products: only the summation order differs


@pytest.mark.parametrize("name", ["uint4_g64", "int8_row"])
def test_gemv_matches_the_gemm_kernel_in_bf16(name, device):
    w = _weight(name, device)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(2)).bfloat16().to(device)
    gemm = lowbit_ops.lowbit_matmul(x, w.codes, w.scale, w.zero, w.bits, w.group, w.k,
                                    config=GemmConfig(16, 32, 32, 1, 4, 1))
    want = x.double().cpu() @ w.qt.dequantize().double().cpu().t()
    for cfg in (GemvConfig(64, 128), GemvConfig(32, 64, 4, R)):
        got = lowbit_gemv(x, w.codes, w.scale, w.zero, w.bits, w.group, w.k, cfg)
        assert got.dtype == torch.bfloat16
        assert _rel_err(got, want) < 1e-2 and _rel_err(got, gemm.double().cpu()) < 1e-2


def test_swiglu_input_and_dispatch_through_lowbit_matmul(device):
    w = _weight("uint4_g64", device)
    x = torch.randn(2, 2 * K, generator=torch.Generator().manual_seed(3))
    want = swiglu_input(x).double() @ w.qt.dequantize().double().cpu().t()
    got = lowbit_ops.lowbit_matmul(x.to(device), w.codes, w.scale, w.zero, w.bits, w.group, w.k,
                                   config=GemvConfig(64, 128, 2, A), swiglu=True)
    assert _rel_err(got, want) < 1e-5


def test_tuned_gemv_config_is_used_and_survives_json(tmp_path, device, monkeypatch):
    monkeypatch.setattr(lowbit_ops, "TUNED", {})
    w = _weight("int4_g32", device)
    cfg = GemvConfig(32, 64, 2, R)
    key = lowbit_ops.shape_key(w.kind, 1, N, K)
    assert key != lowbit_ops.shape_key(w.kind, 16, N, K)  # M = 1 and 2..16 are tuned apart
    lowbit_ops.TUNED[key] = cfg
    lowbit_ops.dump_tuned(tmp_path / "tuned.json")
    assert json.loads((tmp_path / "tuned.json").read_text())["configs"][key]["kernel"] == "gemv"
    lowbit_ops.TUNED.clear()
    assert lowbit_ops.load_tuned(tmp_path / "tuned.json") == 1 and lowbit_ops.TUNED[key] == cfg
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4))
    got = lowbit_linear(x.to(device), w, backend="triton")
    assert torch.equal(got.cpu(), lowbit_gemv(x.to(device), w.codes, w.scale, w.zero, 4, 32, K, cfg).cpu())


@pytest.mark.parametrize("bits, group", [(4, 128), (4, 32), (8, 4096), (8, 14336), (8, 128)])
@pytest.mark.parametrize("m", [1, 16])
def test_candidates_are_legal_for_the_benchmark_shapes(bits, group, m):
    """Every candidate the GPU benchmark will try passes the launcher's checks (no kernel run)."""
    for k, n in ((2048, 6144), (2048, 11264), (4096, 14336), (14336, 4096)):
        g = min(group, k)
        cands = gemv_candidates(m, n, k, g, bits, programs=4 * 132)
        assert any(c.dot for c in cands) == (g >= 16 * 32 // bits)
        if n == 4096:  # 4096 / block_n programs alone cannot fill 132 SMs: split-K, both reductions at M = 1
            assert all(c.split_k > 1 for c in cands[:2]) and (m > 1 or any(c.reduce is R for c in cands))
        assert cands[0].dot == (m > 4 and any(c.dot for c in cands))  # tensor cores first from M = 8
        x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
        codes = torch.empty(n, k * bits // 8, dtype=torch.uint8, device="meta")
        for c in cands:
            check_gemv(x, codes, bits, g, k, c)
    full = lowbit_ops.candidate_configs(m, 4096, 14336, 128, torch.device("cpu"), 4)
    assert isinstance(full[0], GemmConfig) and any(isinstance(c, GemvConfig) for c in full)


@pytest.mark.parametrize("change, match", [
    (dict(k=K + 64), "K=320 is not a multiple of block_k"),
    (dict(x_dtype=torch.int32), "x dtype torch.int32"),
    (dict(codes_dtype=torch.int8), r"codes torch.int8 \(64, 128\)"),
    (dict(m=17), "M=17"),
    (dict(cfg=GemvConfig(32, 128, dot=True), group=32), "dot=True with block_k=128, group 32"),
    (dict(cfg=GemvConfig(32, 96)), "block_k=96"),
])
def test_bad_input_is_named(change, match):
    k = change.get("k", K)
    x = torch.zeros(change.get("m", 1), k, dtype=change.get("x_dtype", torch.float32))
    codes = torch.zeros(N, k // 2, dtype=change.get("codes_dtype", torch.uint8))
    scale = torch.ones(N, k // 32)
    with pytest.raises(ValueError, match=match):
        lowbit_gemv(x, codes, scale, None, 4, change.get("group", 32), k, change.get("cfg", GemvConfig(32, 128)))


def test_gemv_by_default_switch(device, monkeypatch):
    """GEMV_MAX_M (1: measured faster at M = 1 on an H200) makes the untuned choice up to that M the
    GEMV's heuristic on a GPU; the interpreter keeps the GEMM kernel's few-large-programs config."""
    monkeypatch.setattr(lowbit_ops, "TUNED", {})
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    assert isinstance(lowbit_ops.pick_config("w4a16", 1, N, K, 64, dev, 4), GemvConfig if on_gpu else GemmConfig)
    assert isinstance(lowbit_ops.pick_config("w4a16", 16, N, K, 64, dev, 4), GemmConfig)
    monkeypatch.setattr(lowbit_ops, "GEMV_MAX_M", 0)
    assert isinstance(lowbit_ops.pick_config("w4a16", 1, N, K, 64, dev, 4), GemmConfig)
    monkeypatch.setattr(lowbit_ops, "GEMV_MAX_M", 16)
    assert isinstance(lowbit_ops.pick_config("w4a16", 16, N, K, 64, dev, 4), GemvConfig if on_gpu else GemmConfig)
    assert isinstance(lowbit_ops.pick_config("w4a16", 17, N, K, 64, dev, 4), GemmConfig)
    w = _weight("uint4_g64", device)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(6))
    want = x.double() @ w.qt.dequantize().double().cpu().t()
    assert _rel_err(lowbit_linear(x.to(device), w, backend="triton"), want) < 1e-5



@triton.jit
def _field(words, J: tl.constexpr, WBITS: tl.constexpr, SIGNED: tl.constexpr):
    """The integer reference: code J of each word, two's complement (sign-extending shifts) if SIGNED."""
    if SIGNED:
        out = (words << (32 - WBITS * (J + 1))) >> (32 - WBITS)
    else:
        out = (words >> (WBITS * J)) & ((1 << WBITS) - 1)
    return out


@triton.jit
def _magic_and_reference(w_ptr, magic_ptr, ref_ptr, WBITS: tl.constexpr, SIGNED: tl.constexpr, B: tl.constexpr):
    P: tl.constexpr = 32 // WBITS
    words = tl.load(w_ptr + tl.arange(0, B))
    for j in tl.static_range(P):
        tl.store(magic_ptr + j * B + tl.arange(0, B), _field_f32(words, j, WBITS, SIGNED))
        tl.store(ref_ptr + j * B + tl.arange(0, B), _field(words, j, WBITS, SIGNED).to(tl.float32))


@pytest.mark.parametrize("wbits", [4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_as_float_by_magic_number_equal_the_integer_conversion(wbits, signed, device):
    """_field_f32 (mantissa bits of 2^23, one FP32 subtraction) gives exactly _field(...).to(f32)
    for every code value in every slot of a word, incl. words with the sign bit set."""
    per_word = 32 // wbits
    codes = torch.arange(256) % (1 << wbits)  # every code value in every slot
    slots = torch.stack([codes.roll(7 * j) for j in range(per_word)], dim=1).to(torch.int64)
    words = (slots << (torch.arange(per_word) * wbits)).sum(dim=1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    assert (words < 0).any()
    words = words.to(device)
    magic = torch.empty(per_word, 256, device=device)
    ref = torch.empty(per_word, 256, device=device)
    _magic_and_reference[(1,)](words, magic, ref, wbits, signed, 256)
    assert torch.equal(magic, ref)
    lo = -(1 << (wbits - 1)) if signed else 0
    assert ref.min().item() == lo and ref.max().item() == lo + (1 << wbits) - 1
