"""torch.compile traces FP8 layers whole (no graph break) and computes what eager mode computes.

The casts enter the graph as custom operators (kernels/library.py), the GEMMs as aten ops, the
delayed-scaling amax record as traced torch ops writing history slot 0. With the aot_eager backend
(same kernels, no fusion) everything is bit-identical to eager, FP8 state included; Inductor
may reorder the FP32 sums of the emulated GEMM and the bias gradient, so there the FP8 state and
the quantized gradients are exact and the output / bias gradient equal to FP32 rounding.
"""

import copy
import shutil

import pytest
import torch
import torch._dynamo

import kernels.library  # noqa: F401 (registers torch.ops.fp8train.*)
from fp8train.numerics import FP8Linear, after_optimizer_step, convert_to_fp8, load_recipe

RECIPES = ["hybrid", "current", "rowwise", "blockwise", "v3_fp8"]


def _pair(recipe_name):
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 128)
    eager = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="emulated")
    compiled = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="emulated")
    return eager, compiled


def _sgd_and_update(layer):
    with torch.no_grad():
        layer.weight -= 0.1 * layer.weight.grad
    layer.weight.grad = layer.bias.grad = None
    after_optimizer_step(layer)


def _run_steps(eager, compiled, backend, exact_output):
    call = torch.compile(compiled, backend=backend, fullgraph=True)
    for step in range(3):
        x = torch.randn(128, 256) * (step + 1)
        grad = torch.randn(128, 128)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), call(xc)
        ye.backward(grad)
        yc.backward(grad)
        for name, got, want in (("output", yc, ye), ("grad_bias", compiled.bias.grad, eager.bias.grad)):
            if exact_output:
                assert torch.equal(got, want), f"step {step}: {name}"
            else:
                torch.testing.assert_close(got, want, msg=f"step {step}: {name}")
        assert torch.equal(xc.grad, xe.grad), f"step {step}: grad_input"
        assert torch.equal(compiled.weight.grad, eager.weight.grad), f"step {step}: grad_weight"
        _sgd_and_update(eager)
        _sgd_and_update(compiled)
        for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
            assert torch.equal(a, b), f"step {step}: {name} differs after the update"


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_fp8_linear_has_no_graph_break(recipe_name):
    layer = FP8Linear(256, 128, recipe=load_recipe(recipe_name), backend="emulated")
    explanation = torch._dynamo.explain(layer)(torch.randn(128, 256, requires_grad=True))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_compiled_fp8_linear_is_bit_identical_with_aot_eager(recipe_name):
    _run_steps(*_pair(recipe_name), backend="aot_eager", exact_output=True)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_inductor_keeps_fp8_state_and_quantized_gradients_exact(recipe_name):
    _run_steps(*_pair(recipe_name), backend="inductor", exact_output=False)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_eval_forward_does_not_record_activation_amax(backend):
    """Train step, then an evaluation forward through the same compiled callable (a recompile),
    with the delayed state banked: the histories are views into one flat tensor, the case a
    mutating custom operator got wrong."""
    if backend == "inductor" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("Inductor on CPU needs a C++ compiler")
    _, layer = _pair("hybrid")
    after_optimizer_step(layer)  # builds the bank
    call = torch.compile(layer, backend=backend)
    call(torch.randn(128, 256, requires_grad=True)).sum().backward()
    after_optimizer_step(layer)
    layer.eval()
    before = layer.input_caster.amax_history.clone()
    with torch.no_grad():
        call(torch.randn(128, 256) * 100)
    assert torch.equal(layer.input_caster.amax_history, before), "eval activations steered the scale"
    assert layer.weight_caster.amax_history[0] > 0, "the weight's cast is recorded in any mode"


def test_model_with_fp8_layers_compiles_as_one_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    convert_to_fp8(model, load_recipe("hybrid"), backend="emulated")
    reference = copy.deepcopy(model)
    x = torch.randn(32, 128)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert torch.equal(out, reference(x))
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_custom_operators_pass_opcheck(fp8_dtype):
    """Schema, fake (meta) implementation and declared mutation agree with the real kernels."""
    x = torch.randn(256, 384, dtype=torch.bfloat16)
    ops = torch.ops.fp8train
    torch.library.opcheck(ops.cast_with_amax_tiles, (x, torch.tensor([2.0]), fp8_dtype, True))
    torch.library.opcheck(ops.cast_with_amax_tiles, (x, torch.tensor([2.0]), fp8_dtype, False))
    torch.library.opcheck(ops.current_cast, (x, fp8_dtype, True, True))
    for op in (ops.quantize_1x128, ops.quantize_1x128_t, ops.quantize_1x128_both, ops.quantize_128x128,
               ops.quantize_128x128_both):
        torch.library.opcheck(op, (x, fp8_dtype, False))


@pytest.mark.parametrize("route", ["auto", "operators", "inductor"])
@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_both_compiled_cast_routes_are_bit_identical_to_eager(monkeypatch, route, recipe_name):
    """compiled_route (configure_casts): custom operators or traced references, the same numbers."""
    from fp8train.quant import casts
    monkeypatch.setattr(casts.SETTINGS, "compiled_route", route)
    torch._dynamo.reset()
    _run_steps(*_pair(recipe_name), backend="aot_eager", exact_output=True)


@pytest.mark.parametrize("recipe_name", ["hybrid", "current"])
def test_inductor_cast_roles_trace_those_casts_and_stay_bit_identical(monkeypatch, recipe_name):
    """CastSettings.inductor_roles: on the operator route, the gradient casts leave the custom
    operator (traced instead, so Inductor can fuse them into the op before) with unchanged numbers."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fp8train.quant import casts

    monkeypatch.setattr(casts.SETTINGS, "compiled_route", "operators")
    counts = {}

    def counting(role):
        def compiler(gm, example_inputs):
            counts[role] = sum(str(n.target).startswith("fp8train.") for n in gm.graph.nodes)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    seen = {}
    for roles in ((), ("grad_output",)):
        monkeypatch.setattr(casts.SETTINGS, "inductor_roles", roles)
        torch._dynamo.reset()
        _run_steps(*_pair(recipe_name), backend=backend, exact_output=True)
        seen[roles] = dict(counts)
    assert seen[("grad_output",)]["forward"] == seen[()]["forward"]  # input and weight casts unchanged
    assert seen[("grad_output",)]["backward"] < seen[()]["backward"]  # the grad_output cast is traced


def test_unknown_inductor_cast_role_is_named():
    from fp8train.quant.casts import configure_casts

    with pytest.raises(ValueError, match="unknown operand role"):
        configure_casts(inductor_roles=("grads",))
