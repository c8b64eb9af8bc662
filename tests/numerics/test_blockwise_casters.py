"""Blockwise casters that need both operands get them from one kernel (`quantize_1x128_both`,
`quantize_128x128_both`): the FP8 bytes, scales, scale strides and granularities must be exactly
those of the separate calls they replace (rows + the 128x1 cols kernel for activations and
gradients; rows + .t() for weights).

Each test runs on three routes: the pure-torch reference (CPU default), the kernel entry points
(`kernels.ops`, forced on CPU: the Triton interpreter when TRITON_INTERPRET=1, else the kernels'
reference) and the custom operators under torch.compile.
"""

import pytest
import torch

from fp8train.numerics.recipe import RoleConfig
from fp8train.numerics.role_caster import RoleCaster
from fp8train.quant import GranularityKind, casts

ROUTES = ["reference", "kernels", "compiled"]


def _input(role: str, dtype: torch.dtype) -> torch.Tensor:
    """384x256 (M != K) with a NaN, an inf, a saturating value and a zero 128x128 block."""
    x = torch.randn(384, 256) * torch.logspace(-3, 3, 256)
    x[128:256, 0:128] = 0.0
    x[3, 200] = float("nan")
    x[300, 5] = float("inf") if role != "weight" else 1e30  # weights stay finite in practice
    x[10, 20] = 3e38
    return x.to(dtype)


def _separate_calls(x: torch.Tensor, caster: RoleCaster, power_of_2: bool):
    """The path the casters took before the fused kernels."""
    rows, _ = casts.cast(x, caster.fmt, caster.scheme, need_cols=False, power_of_2=power_of_2)
    if caster.role == "weight":
        return rows, rows.t()
    return rows, casts.cast_cols(x, caster.fmt, caster.scheme, power_of_2=power_of_2)


def _flat(pair):
    """(data bytes, scale_inv) of rows then cols: tensors a compiled function can return."""
    return [t for q in pair for t in (q.data.view(torch.uint8), q.scale_inv)]


def _run(route: str, monkeypatch, fn, x):
    if route == "reference":
        return _flat(fn(x))
    ok, why = casts.kernel_status()
    if not ok:
        pytest.skip(f"kernels unavailable: {why}")
    if route == "kernels":
        monkeypatch.setattr(casts, "_eager_kernel", lambda t: casts.kernels_module())
        return _flat(fn(x))
    monkeypatch.setattr(casts.SETTINGS, "compiled_route", "operators")
    torch._dynamo.reset()
    return torch.compile(lambda t: _flat(fn(t)), backend="aot_eager", fullgraph=True)(x)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("role, fmt_name", [("input", "e4m3"), ("grad_output", "e5m2"), ("weight", "e4m3")])
@pytest.mark.parametrize("power_of_2", [False, True])
def test_fused_casts_equal_separate_calls(monkeypatch, route, role, fmt_name, power_of_2):
    dtype = torch.float32 if role == "weight" else torch.bfloat16
    x = _input(role, dtype)
    caster = RoleCaster(role, RoleConfig(format=fmt_name, scaling="blockwise", power_of_2=power_of_2))
    rows, cols = caster.cast(x, need_cols=True)
    kind = GranularityKind.BLOCK if role == "weight" else GranularityKind.TILE
    assert (rows.kind, cols.kind) == (kind, kind)
    got = _run(route, monkeypatch, lambda t: caster.cast(t, need_cols=True), x)
    want = _run(route, monkeypatch, lambda t: _separate_calls(t, caster, power_of_2), x)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.shape, g.stride()) == (w.shape, w.stride()), f"output {i}: layout differs"
        assert torch.equal(_bits(g), _bits(w)), f"output {i}: values differ"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP32 scales compared as int32 patterns (NaN == NaN); FP8 data is already uint8."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t
