"""Fast casts: the table's kernels on CUDA, the reference quantizers everywhere else.

`cast(x, fmt, scheme, need_cols=...)` returns the rows operand and, when asked, the cols operand
(the quantized transpose) of one high-precision tensor, exactly as the reference quantizers
define them (the kernel tests check it bit for bit), in one pass over memory where a kernel exists:
amax + scaled saturating cast (+ the transposed FP8 copy) for tensorwise scaling, tile/block
scales in the layout the GEMM wants for blockwise scaling.

Which implementation runs:
* eager, contiguous CUDA tensor, kernels enabled: the Triton kernel named by the scheme table;
* while torch.compile traces, by `CastSettings.compiled_route`:
  `operators` - the kernels' custom operators (torch.ops.fp8train.*, kernels/library.py), so the
  FP8 layer is one graph and runs the same kernels as eager mode;
  `inductor` - the reference quantizers are traced and Inductor generates (and fuses) the casts;
  `auto` (default) - inductor for tensorwise casts, operators for blockwise ones. Measured on the
  H100 (benchmarks/results/h100_session2/): inductor tensorwise casts are bit-identical to eager
  and a compiled 125M model trains 2.1x faster than on the operator route; the blockwise output
  did not match eager on the inductor route, so blockwise stays on the verified operators;
  `inductor_roles` (e.g. ("grad_output",)) sends the tensorwise casts of those operand roles to
  Inductor whatever the route: a gradient cast traced beside the op that produced the gradient (SwiGLU's
  backward, a residual add) fuses into it instead of re-reading its BF16 output;
* everything else (CPU, strided inputs, kernels off, Triton missing): the reference.

Settings come from the caller (`configure_casts`, e.g. the trainer's config), never from the
environment. The kernels package is imported on first use; if the `kernels` found is not
fp8train's own (the name is taken on PyPI), that is an error with the fix, never a silent slow path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.quant import reference
from fp8train.quant.formats import NumberFormat
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.scaling import ScalingMode, reciprocal, scale_from_amax, tensor_amax
from fp8train.quant.schemes import CastScheme
from fp8train.quant.tensor import QuantizedTensor

COMPILED_ROUTES = ("auto", "operators", "inductor")


CAST_ROLES = ("input", "weight", "grad_output")


@dataclass
class CastSettings:
    use_kernels: bool = True
    compiled_route: str = "auto"
    inductor_roles: tuple[str, ...] = ()  # tensorwise casts of these roles: traced (Inductor) when compiled


SETTINGS = CastSettings()


def configure_casts(use_kernels: bool | None = None, compiled_route: str | None = None,
                    inductor_roles: tuple[str, ...] | None = None) -> CastSettings:
    """Set how casts run (from launch/ or a benchmark's flags); returns the settings in force."""
    if inductor_roles is not None:
        unknown = [r for r in inductor_roles if r not in CAST_ROLES]
        if unknown:
            raise ValueError(f"inductor_roles: unknown operand role(s) {unknown}; choose from {list(CAST_ROLES)}")
        SETTINGS.inductor_roles = tuple(inductor_roles)
    if compiled_route is not None:
        if compiled_route not in COMPILED_ROUTES:
            raise ValueError(f"compiled_route={compiled_route!r}; choose one of {list(COMPILED_ROUTES)}")
        SETTINGS.compiled_route = compiled_route
    if use_kernels is not None:
        SETTINGS.use_kernels = bool(use_kernels)
    return SETTINGS


class ForeignKernelsPackage(ImportError):
    """`import kernels` found a package that is not fp8train's kernels/."""


_LOADED: list = []  # [(kernels.ops or None, reason)] once loaded: a plain global torch.compile can read


def _load_kernels():
    """(kernels.ops module or None, reason), imported once. Triton missing -> None with the reason;
    a foreign `kernels` package -> ForeignKernelsPackage (raised, not hidden)."""
    if not _LOADED:
        _LOADED.append(_import_kernels())
    return _LOADED[0]


def importlib_has_triton() -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("triton") is not None


def _import_kernels():
    if not importlib_has_triton():
        return None, "torch reference (triton is not installed: pip install -e '.[kernels]')"
    import kernels  # noqa: PLC0415

    if not getattr(kernels, "FP8TRAIN_KERNELS", False):
        raise ForeignKernelsPackage(
            f"`import kernels` found {getattr(kernels, '__file__', kernels)!r}, which is not fp8train's kernels "
            f"package (another PyPI package is named `kernels`). Uninstall it (pip uninstall kernels) or run "
            f"from the fp8train checkout after `pip install -e .`")
    import kernels.library  # noqa: F401, PLC0415 (registers torch.ops.fp8train.*)
    import kernels.ops  # noqa: PLC0415
    return kernels.ops, "triton kernels"


def kernel_status() -> tuple[bool, str]:
    """(kernels usable, reason), for reports."""
    if not SETTINGS.use_kernels:
        return False, "torch reference (kernels disabled by configure_casts)"
    ops, reason = _load_kernels()
    return ops is not None, reason


def kernels_module():
    """kernels.ops, or None when disabled or unavailable."""
    return _load_kernels()[0] if SETTINGS.use_kernels else None


def delayed_update_kernel(device: torch.device):
    """The batched Triton delayed-scaling update for tensors on `device`, or None (reference)."""
    ops = kernels_module() if device.type == "cuda" else None
    return ops.delayed_scaling_update if ops is not None else None


def _operator_route(tensorwise: bool, role: str | None = None) -> bool:
    """Tracing under torch.compile on the custom-operator route (see the module docstring)."""
    route = SETTINGS.compiled_route
    if tensorwise and role is not None and role in SETTINGS.inductor_roles:
        route = "inductor"
    if route == "auto":
        route = "inductor" if tensorwise else "operators"
    return route == "operators" and torch.compiler.is_compiling() and kernels_module() is not None


def _eager_kernel(x: torch.Tensor):
    """kernels.ops for contiguous CUDA tensors in eager mode, else None (the reference runs)."""
    if not x.is_cuda or not x.is_contiguous() or torch.compiler.is_compiling():
        return None
    return kernels_module()


def amax_of_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """FP32 [1] amax from the int32 bits of per-tile amaxes (the max of non-negative floats' bits
    is the bits of their max; the canonical NaN lies above +inf)."""
    return tiles.amax().reshape(1).view(torch.float32)


@torch.no_grad()
def record_amax(amax_slot: torch.Tensor, amax: torch.Tensor) -> None:
    """history[0] = max(history[0], amax); NaN propagates (the update then skips it)."""
    amax_slot.copy_(torch.maximum(amax_slot, amax.reshape(1).float()))


def cast(x: torch.Tensor, fmt: NumberFormat, scheme: CastScheme, *, need_cols: bool, power_of_2: bool = False,
         scale: torch.Tensor | None = None, amax_slot: torch.Tensor | None = None,
         amax_percentile: float | None = None, scale_inv: torch.Tensor | None = None,
         role: str | None = None) -> tuple[QuantizedTensor, QuantizedTensor | None]:
    """x [R, C] high precision -> (rows, cols or None) as `scheme` says.

    DELAYED schemes take the encode `scale` [1] and record this cast's amax into `amax_slot`
    (history[0:1]) unless it is None; `scale_inv`, when given, is 1 / scale already computed (the
    delayed-scaling bank keeps it beside the scale), so a compiled graph does not divide per cast.
    `amax_percentile` clips tensorwise amaxes (reference path). `role` (input / weight /
    grad_output) picks the compiled route where `CastSettings.inductor_roles` names it.
    """
    if scheme.mode is ScalingMode.DELAYED:
        return _delayed(x, fmt, scale, amax_slot, need_cols, amax_percentile, scale_inv, role)
    if scheme.granularity.kind is GranularityKind.TENSOR:
        return _current_tensorwise(x, fmt, power_of_2, need_cols, amax_percentile, role)
    name = scheme.kernel_both if need_cols else scheme.kernel_rows
    outputs = _kernel_outputs(name, x, fmt, power_of_2, tensorwise=False)
    if outputs is None:
        rows = reference.quantize(x, fmt, scheme.granularity, power_of_2=power_of_2)
        cols = None
        if need_cols:
            cols = rows.t() if scheme.reuses_transpose else \
                reference.quantize(x.t(), fmt, scheme.granularity, power_of_2=power_of_2)
        return rows, cols
    rows = QuantizedTensor(outputs[0], outputs[1], scheme.granularity, fmt)
    cols = QuantizedTensor(outputs[2], outputs[3], scheme.granularity, fmt) if need_cols else None
    return rows, cols


def cast_cols(x: torch.Tensor, fmt: NumberFormat, scheme: CastScheme, *, power_of_2: bool = False,
              scale: torch.Tensor | None = None, amax_percentile: float | None = None) -> QuantizedTensor:
    """Only the quantized transpose of x [R, C] (contraction along R); records no amax.

    Used by the per-expert MoE path, whose token-major operands are quantized per expert group:
    DELAYED reuses the given scale, CURRENT tensorwise takes this group's own amax."""
    granularity = scheme.granularity
    if scheme.mode is ScalingMode.DELAYED:
        return reference.quantize_with_scale(x.t(), fmt, scale, granularity)
    if granularity.kind is GranularityKind.TENSOR:
        amax_scale = scale_from_amax(tensor_amax(x, amax_percentile), fmt.max, power_of_2)
        return reference.quantize_with_scale(x.t(), fmt, amax_scale, granularity)
    outputs = _kernel_outputs(scheme.kernel_cols, x, fmt, power_of_2, tensorwise=False)
    if outputs is None:
        return reference.quantize(x.t(), fmt, granularity, power_of_2=power_of_2)
    return QuantizedTensor(outputs[0], outputs[1], granularity, fmt)


def _kernel_outputs(name: str | None, x: torch.Tensor, fmt: NumberFormat, power_of_2: bool, tensorwise: bool):
    """The outputs of kernels.ops.<name> (its custom operator while compiling), or None."""
    if name is None:
        return None
    if _operator_route(tensorwise):
        return getattr(torch.ops.fp8train, name)(x.contiguous(), fmt.dtype, power_of_2)
    ops = _eager_kernel(x)
    return getattr(ops, name)(x, fmt.dtype, power_of_2) if ops is not None else None


def _tensor_pair(data, data_t, scale_inv, fmt: NumberFormat, need_cols: bool):
    granularity = reference.Granularity.tensor()
    scale_inv = scale_inv.reshape(())
    rows = QuantizedTensor(data, scale_inv, granularity, fmt)
    return rows, (QuantizedTensor(data_t, scale_inv, granularity, fmt) if need_cols else None)


def _reference_pair(x, fmt, scale, need_cols):
    rows = reference.quantize_with_scale(x, fmt, scale, reference.Granularity.tensor())
    return rows, (rows.t() if need_cols else None)


def _delayed(x, fmt, scale, amax_slot, need_cols, amax_percentile, scale_inv=None, role=None):
    """Delayed tensorwise cast; one Triton launch on CUDA (cast + amax into the slot). Compiled:
    the cast operator leaves per-tile amax bits, reduced and recorded by one fused kernel."""
    if scale is None:
        raise ValueError("a DELAYED cast needs the caster's scale")
    if amax_percentile is not None:
        if amax_slot is not None:
            record_amax(amax_slot, tensor_amax(x, amax_percentile))
        return _reference_pair(x, fmt, scale, need_cols)
    if _operator_route(tensorwise=True, role=role):
        data, data_t, tiles = torch.ops.fp8train.cast_with_amax_tiles(x.contiguous(), scale, fmt.dtype, need_cols)
        if amax_slot is not None:
            record_amax(amax_slot, amax_of_tiles(tiles))
        return _tensor_pair(data, data_t, reciprocal(scale) if scale_inv is None else scale_inv, fmt, need_cols)
    ops = _eager_kernel(x)
    if ops is not None:
        return _tensor_pair(*ops.delayed_cast(x, scale, amax_slot, fmt.dtype, need_cols), fmt, need_cols)
    if amax_slot is not None:
        record_amax(amax_slot, tensor_amax(x))
    return _reference_pair(x, fmt, scale, need_cols)


def _current_tensorwise(x, fmt, power_of_2, need_cols, amax_percentile, role=None):
    """Current tensorwise cast: amax pass + cast pass in Triton on CUDA."""
    if amax_percentile is None:
        if _operator_route(tensorwise=True, role=role):
            data, data_t, scale_inv = torch.ops.fp8train.current_cast(x.contiguous(), fmt.dtype, power_of_2, need_cols)
            return _tensor_pair(data, data_t, scale_inv, fmt, need_cols)
        ops = _eager_kernel(x)
        if ops is not None:
            return _tensor_pair(*ops.current_cast(x, fmt.dtype, power_of_2, need_cols), fmt, need_cols)
    scale = scale_from_amax(tensor_amax(x, amax_percentile), fmt.max, power_of_2)
    return _reference_pair(x, fmt, scale, need_cols)
