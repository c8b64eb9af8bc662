"""Inference kernels on the GPU at model sizes: codes bit for bit, GEMMs and attention to tolerance,
every benchmark configuration (split-K included) verified, a CUDA-graphed decode step = eager."""

import pytest
import torch

from fp8train.inference.cuda_graph import GraphedStep
from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.generation import generate, make_cache
from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import kv_quantization
from fp8train.inference.lowbit_matmul import lowbit_linear, quantize_weights
from fp8train.inference.plan import DecodePlan
from fp8train.inference.protocol import decoder_parts
from fp8train.models import build_model, model_config
from fp8train.quant import E4M3, INT8, Granularity, quantize
from fp8train.quant.packing import pack_4bit
from fp8train.quant.spec import QuantSpec
from kernels import lowbit_ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
W4 = QuantSpec("uint4", "tile", 128, symmetric=False)
W8 = QuantSpec("int8", "row")


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("spec", [W4, W8, QuantSpec("int4", "tile", 64)], ids=["w4g128", "w8row", "int4g64"])
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("k, n", [(2048, 6144), (5632, 2048)])
def test_candidate_configs_are_right(spec, m, k, n):
    """W4 g128 (the benchmark's main target): every configuration the benchmark may pick; the other
    formats: the heuristic configuration."""
    torch.manual_seed(0)
    w = quantize_weights([torch.randn(n, k, device="cuda") * 0.02], spec)[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ w.qt.dequantize().t()
    configs = lowbit_ops.candidate_configs(m, n, k, w.group, x.device, w.bits) if spec is W4 else [None]
    for cfg in configs:
        for _ in range(2):  # the second call checks that split-K left its workspace zeroed
            got = lowbit_ops.lowbit_matmul(x, w.codes, w.scale, w.zero, w.bits, w.group, w.k, config=cfg)
            assert _rel_err(got, expected) < 5e-3, cfg


def test_dequantize_path_and_swiglu_load():
    torch.manual_seed(1)
    w = quantize_weights([torch.randn(2048, 5632, device="cuda") * 0.02], W4)[0]
    x = torch.randn(4096, 5632, device="cuda", dtype=torch.bfloat16)
    lowbit_ops.STRATEGY[lowbit_ops.shape_key("w4a16", 4096, 2048, 5632)] = "dequant"
    assert _rel_err(lowbit_linear(x, w), x.float() @ w.qt.dequantize().t()) < 5e-3
    gate_up = torch.randn(8, 2 * 5632, device="cuda", dtype=torch.bfloat16)
    act = (torch.nn.functional.silu(gate_up[:, :5632].float()) * gate_up[:, 5632:].float())
    assert _rel_err(lowbit_linear(gate_up, w, swiglu=True), act @ w.qt.dequantize().t()) < 1e-2


def test_quantization_kernels_are_bit_exact_on_the_gpu():
    torch.manual_seed(2)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 3
    for fp8, fmt in ((False, INT8), (True, E4M3)):
        codes, scale = lowbit_ops.quantize_rows(x, fp8)
        ref = quantize(x, fmt, Granularity.row())
        assert torch.equal(codes.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(scale, ref.scale_inv)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in ((6144, 2048), (2048, 5632))]
    for spec in (W4, W8):
        for w, got in zip(weights, quantize_weights(weights, spec)):
            ref = spec.quantize(w)
            assert torch.equal(got.codes, pack_4bit(ref.data) if spec.bits == 4 else ref.data)
            assert torch.equal(got.scale, ref.scale_inv.reshape(got.scale.shape))
            deq = lowbit_ops.dequantize_weight(got.codes, got.scale, got.zero, got.bits, got.group, got.k,
                                               torch.float32)
            assert torch.equal(deq, ref.dequantize())


@pytest.mark.parametrize("spec", [QuantSpec("int8", "row"), QuantSpec("e4m3", "row")])
def test_w8a8_paths(spec):
    torch.manual_seed(3)
    w = torch.randn(2048, 2048, device="cuda") * 0.02
    qw = quantize(w, spec.fmt, Granularity.row())
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    got = lowbit_linear(x, qw, spec)
    ref = lowbit_linear(x.cpu(), type(qw)(qw.data.cpu(), qw.scale_inv.cpu(), qw.granularity, qw.fmt), spec)
    assert _rel_err(got.cpu(), ref) < 1e-2


@pytest.mark.parametrize("mode", ["bf16", "fp8", "int8", "int4", "int4_hadamard", "kivi", "int4_centered"])
def test_kv_cache_kernels_at_4k_context(mode):
    """int4_centered: mean key subtracted and the BF16 sink token, both in the kernels."""
    torch.manual_seed(4)
    quant = kv_quantization(mode)
    ref, ker = (StaticKVCache(quant, 1, 2, 8, 4096, 128, device="cuda", use_kernels=u) for u in (False, True))
    k = torch.randn(2, 8, 4000, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    start = torch.tensor([0, 100], device="cuda")
    for cache in (ref, ker):
        cache.write(0, k, v, 0, start)
    for t in range(4000, 4040):
        kn = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
        vn = torch.randn_like(kn)
        for cache in (ref, ker):
            cache.write(0, kn, vn, torch.tensor(t, device="cuda"), start)
    for name, a in ref.storage.items():
        b = ker.storage[name]
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b), name
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    expected = ref.attend(0, q.float(), 4039, start)
    for opts in ({}, dict(splits=8, block_n=32, num_warps=4), dict(splits=1, block_n=128, num_warps=8)):
        got = ker.attend(0, q, torch.tensor(4039, device="cuda"), start, **opts)
        assert _rel_err(got, expected) < 1e-2, opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group, residual, head_dim", [(8, 12, 64), (16, 0, 128), (32, 128, 128), (64, 32, 128),
                                                       (128, 16, 128)])
def test_kivi_attention_kernel_at_every_group_size(group, residual, head_dim, dtype):
    """KIVI key groups smaller than, equal to and larger than the tile (BLOCK_N 16..128): the H200 run
    of 2026-11-28 got garbage from 8-slot tiles; tiles are now >= 16 slots and may hold several groups."""
    torch.manual_seed(7)
    quant = kv_quantization("kivi", group=group, residual=residual)
    ref, ker = (StaticKVCache(quant, 1, 2, 4, 1024, head_dim, device="cuda", use_kernels=u) for u in (False, True))
    k = torch.randn(2, 4, 900, head_dim, device="cuda", dtype=torch.bfloat16) * 2
    v = torch.randn_like(k)
    for cache in (ref, ker):
        cache.write(0, k, v, 0)
    for t in range(900, 920):
        kn, vn = torch.randn(2, 2, 4, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        for cache in (ref, ker):
            cache.write(0, kn, vn, torch.tensor(t, device="cuda"))
    for name, a in ref.storage.items():
        assert torch.equal(a, ker.storage[name]), name
    q = torch.randn(2, 8, head_dim, device="cuda", dtype=dtype)
    start = torch.tensor([0, 37], device="cuda")
    expected = ref.attend(0, q.float(), 919, start)
    for block_n in (16, 64):  # G 8..128: tiles of several groups, one group, part of a group
        for splits in (None, 1, 4):
            got = ker.attend(0, q, torch.tensor(919, device="cuda"), start, splits=splits, block_n=block_n)
            assert _rel_err(got, expected) < (1e-4 if dtype == torch.float32 else 1e-2), (block_n, splits)
    assert StaticKVCache(quant, 1, 2, 4, 64, head_dim, device="cuda").use_kernels  # the default again


def test_graphed_decode_step_equals_eager_and_generate_captures():
    torch.manual_seed(5)
    model = build_model(model_config("small", vocab_size=512, max_seq_len=512, d_model=512, n_heads=4,
                                     n_kv_heads=2, ffn_hidden=1536)).cuda().bfloat16().eval()
    plan = DecodePlan(decoder_parts(model), weight_spec=W4)
    ids = torch.randint(0, 512, (3, 52), device="cuda")
    start = torch.tensor([0, 5, 9], device="cuda")
    logits = []
    for graphed in (False, True):
        dec = IncrementalDecoder(model, make_cache(model, kv_quantization("kivi", residual=16), 3, 64), plan)
        dec.prefill(ids[:, :40], start)
        step = GraphedStep(dec.step) if graphed else dec.step
        logits.append(torch.stack([step(ids[:, t], torch.tensor(t, device="cuda"), start).clone()
                                   for t in range(40, 52)]))  # KIVI (G 32, R 16) flushes at t = 47
    assert _rel_err(logits[1], logits[0]) < 3e-2  # split-K atomics sum in another order (bf16 ulps)
    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=12, kv_cache="int8", plan=plan)
    assert result.graph == "captured" and all(len(t) == 12 for t in result.tokens)


@pytest.mark.parametrize("spec, act", [(W4, None), (W8, None), (W8, QuantSpec("int8", "row")),
                                       (QuantSpec("e4m3", "row"), QuantSpec("e4m3", "row"))])
def test_quantized_linear_hook_runs_the_kernels(spec, act):
    from fp8train.inference.lowbit_matmul import quantized_linear_kernel
    from tests.inference.helpers import FakeQuantizedLinear

    torch.manual_seed(6)
    layer = FakeQuantizedLinear(spec.quantize(torch.randn(2048, 2048, device="cuda") * 0.02), act)
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    reference = lowbit_linear(x.cpu(), type(layer.qt)(layer.qt.data.cpu(), layer.qt.scale_inv.cpu(),
                              layer.qt.granularity, layer.qt.fmt, None if layer.qt.zero_point is None
                              else layer.qt.zero_point.cpu()), act)
    got = quantized_linear_kernel(layer, x)
    assert got is not NotImplemented and _rel_err(got.cpu(), reference) < 1e-2
