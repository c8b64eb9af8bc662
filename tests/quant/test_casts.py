"""Fast-cast plumbing: settings come from the caller, and a foreign `kernels` package is an error
that names it, never a silent fall-back to the slow path."""

import sys
import types

import pytest
import torch

from fp8train.quant import E4M3, Granularity, casts
from fp8train.quant.reference import quantize
from fp8train.quant.schemes import RecipeScaling, scheme_for


def test_foreign_kernels_package_is_an_error_naming_it(monkeypatch):
    impostor = types.ModuleType("kernels")
    impostor.__file__ = "/site-packages/kernels/__init__.py"
    monkeypatch.setitem(sys.modules, "kernels", impostor)
    monkeypatch.setattr(casts, "_LOADED", [])
    monkeypatch.setattr(casts, "_import_kernels", casts._import_kernels)
    if not casts.importlib_has_triton():
        pytest.skip("triton missing: the kernels package is never imported")
    with pytest.raises(casts.ForeignKernelsPackage, match="not fp8train's kernels package.*pip uninstall kernels"):
        casts.kernel_status()


def test_configure_casts_validates_and_applies(monkeypatch):
    monkeypatch.setattr(casts, "SETTINGS", casts.CastSettings())
    with pytest.raises(ValueError, match="compiled_route='fast'"):
        casts.configure_casts(compiled_route="fast")
    assert casts.configure_casts(use_kernels=False).use_kernels is False
    assert casts.kernel_status() == (False, "torch reference (kernels disabled by configure_casts)")


def test_cpu_cast_is_the_reference():
    x = torch.randn(256, 384, dtype=torch.bfloat16)
    rows, cols = casts.cast(x, E4M3, scheme_for(RecipeScaling.BLOCKWISE, "input"), need_cols=True)
    want_rows = quantize(x, E4M3, Granularity.tile(128))
    want_cols = quantize(x.t(), E4M3, Granularity.tile(128))
    assert torch.equal(rows.data.view(torch.uint8), want_rows.data.view(torch.uint8))
    assert torch.equal(cols.scale_inv, want_cols.scale_inv)
