"""FP8 telemetry: per layer and role, the amax, scale, saturated and flushed-to-zero fractions.

Collection costs a few extra reductions per cast, so it is off by default; the trainer turns it on
for one step every N (`set_fp8_telemetry(model, True)`), then reads `fp8_telemetry(model)`, a flat
dict for the logger: `fp8/<layer>/<role>/{amax,scale,saturated,underflow,sqnr_db}`.

    saturated  fraction of elements clipped to +-max: |x * scale| beyond max by more than rounding
               (half an ulp); percentile clipping or an outgrown delayed scale shows up here
    underflow  fraction of NONZERO elements that became zero in FP8 (scale too small)
    sqnr_db    signal-to-quantization-noise ratio of the cast, 20 log10(||x|| / ||x - x_fp8||): the
               one number that sums up rounding, clipping and flushing (E4M3 ~31 dB, E5M2 ~25 dB
               on well-scaled Gaussian data; inf when the cast is exact)

plus `fp8/nonfinite_amax_skipped`: how many non-finite amaxes (overflow, NaN) the delayed-scaling
update has skipped so far (fp8train.quant.scaling), when the model has delayed casters.

The casters keep their statistics as device tensors; `fp8_telemetry` copies them to the host in
one transfer. Under torch.compile a telemetry step would need its own graph (the casters' flag is
a guard) and the statistics' extra reductions in it: `fp8_telemetry_step(model, enabled)` runs
that one step eagerly instead (torch.compiler.set_stance("force_eager")), so turning telemetry on
never compiles anything and the compiled training graph stays the only one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fp8train.numerics.role_caster import RoleCaster


def _casters(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, RoleCaster):
            yield name, module


def set_fp8_telemetry(model: nn.Module, enabled: bool) -> None:
    """Turn collection on or off in every caster (off also clears the statistics). A caster already
    in that state is not written: nn.Module.__setattr__ costs host time per caster and call."""
    for _, caster in _casters(model):
        if caster.collect_telemetry != enabled:
            caster.collect_telemetry = enabled
        if not enabled and caster.last_stats:
            caster.last_stats = {}


@contextmanager
def fp8_telemetry_step(model: nn.Module, enabled: bool):
    """Collect telemetry during the block when `enabled`; compiled callables run eagerly in it.

    The statistics stay readable (`fp8_telemetry`) after the block; `set_fp8_telemetry(model,
    False)` clears them. Disabled: the block runs untouched (compiled graphs as usual)."""
    if not enabled:
        yield
        return
    set_fp8_telemetry(model, True)
    with torch.compiler.set_stance("force_eager"):
        yield


def fp8_telemetry(model: nn.Module) -> dict[str, float]:
    keys, values = [], []
    for name, caster in _casters(model):
        layer = name.rsplit(".", 1)[0] if "." in name else name
        for key, value in caster.last_stats.items():
            keys.append(f"fp8/{layer}/{caster.role}/{key}")
            values.append(value.detach().float().reshape(()))
    out: dict[str, float] = dict(zip(keys, torch.stack(values).tolist())) if values else {}
    bank = getattr(model, "_fp8_delayed_bank", None)
    if bank is not None:
        out["fp8/nonfinite_amax_skipped"] = float(bank.nonfinite_amaxes)
    return out
