"""DecodePlan (fused QKV / gate-up GEMMs, fused add + RMSNorm, SwiGLU in the down GEMM) equals the
plain decoder step; quantized weights equal the model with those weights dequantized."""

import copy
import os

import pytest
import torch

from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.generation import generate, make_cache
from fp8train.inference.kv_modes import kv_quantization
from fp8train.inference.plan import DecodePlan
from fp8train.inference.protocol import decoder_parts
from fp8train.quant import fake_quantize
from fp8train.quant.spec import QuantSpec
from tests.inference.helpers import random_ids, tiny_model, tiny_moe

W4 = QuantSpec("uint4", "tile", 32, symmetric=False)


def _steps(model, plan, mode="int8", batch=2, prompt=6, steps=5, use_kernels=None):
    cache = make_cache(model, kv_quantization(mode), batch, prompt + steps, use_kernels=use_kernels)
    dec = IncrementalDecoder(model, cache, plan)
    ids = random_ids(batch, prompt + steps)
    start = torch.tensor([0, 2])[:batch]
    dec.prefill(ids[:, :prompt], start)
    return torch.stack([dec.step(ids[:, t], torch.tensor(t), start) for t in range(prompt, prompt + steps)])


@pytest.mark.parametrize("make", [tiny_model, tiny_moe])
def test_plan_equals_the_module_by_module_step(make):
    model = make()
    expected = _steps(model, None)
    got = _steps(model, DecodePlan(decoder_parts(model)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_quantized_plan_equals_the_dequantized_model():
    model = tiny_model()
    fake = copy.deepcopy(model)
    with torch.no_grad():
        for layer in fake.layers:
            for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(fake_quantize(lin.weight, W4.fmt, W4.grid, symmetric=False))
    plan = DecodePlan(decoder_parts(model), weight_spec=W4)
    torch.testing.assert_close(_steps(model, plan), _steps(fake, None), rtol=1e-4, atol=1e-4)
    assert plan.weight_bytes < 0.2 * DecodePlan(decoder_parts(model)).weight_bytes


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton's interpreter "
                    "(on a GPU: tests/gpu/test_inference_kernels.py)")
def test_plan_on_the_kernels_matches_the_reference_plan():
    """Interpreter run of every decode kernel together: add+RMSNorm, W4 GEMMs (SwiGLU fused), RoPE +
    INT8 cache write, decode attention."""
    model = tiny_model(d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=256, n_layers=1)
    ref = _steps(model, DecodePlan(decoder_parts(model), weight_spec=W4), prompt=3, steps=1)
    ker = _steps(model, DecodePlan(decoder_parts(model), weight_spec=W4, backend="triton"), prompt=3, steps=1,
                 use_kernels=True)
    torch.testing.assert_close(ker, ref, rtol=2e-3, atol=2e-3)


def test_generate_with_a_w8a8_plan_runs_and_is_deterministic():
    model = tiny_model()
    plan = DecodePlan(decoder_parts(model), weight_spec=QuantSpec("int8", "row"), input_spec=QuantSpec("int8", "row"))
    a = generate(model, [[1, 2, 3]], max_new_tokens=6, kv_cache="fp8", plan=plan).tokens
    b = generate(model, [[1, 2, 3]], max_new_tokens=6, kv_cache="fp8", plan=plan).tokens
    assert a == b and len(a[0]) == 6


def test_plan_reads_quantized_linears_through_weight_quantized():
    """A model whose projections are quantized modules (fp8train.ptq's interface): the plan's fused
    GEMMs equal the modules' own reference forwards."""
    from fp8train.inference.lowbit_matmul import quantized_linear_kernel
    from tests.inference.helpers import FakeQuantizedLinear, quantize_linears

    model = quantize_linears(tiny_model(), W4)
    torch.testing.assert_close(_steps(model, DecodePlan(decoder_parts(model))), _steps(model, None),
                               rtol=1e-4, atol=1e-4)
    layer = model.layers[0].attn.q_proj
    assert quantized_linear_kernel(layer, torch.randn(2, 64)) is NotImplemented  # CPU: the reference runs
    FakeQuantizedLinear.kernel = quantized_linear_kernel
    try:
        x = torch.randn(2, 64)
        torch.testing.assert_close(layer(x), (x @ layer.qt.dequantize().t()), rtol=1e-5, atol=1e-5)
    finally:
        FakeQuantizedLinear.kernel = None
