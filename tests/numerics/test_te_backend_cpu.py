"""The TE backend's decisions that need no GPU: the recipe table's refusals and the clear error
when Transformer Engine is missing (the GPU behaviour is in tests/gpu/test_te_backend.py)."""

import pytest
import torch

from fp8train.numerics import convert_to_fp8, load_recipe
from fp8train.numerics.te_backend import TE_RECIPE_TABLE, TEUnsupported, te_available, te_recipe_for
from fp8train.quant import E4M3, E5M2, RecipeScaling


def test_table_refuses_what_te_cannot_express():
    with pytest.raises(TEUnsupported, match="e5m2/e4m3/e4m3"):  # v3_fp8's E5M2 forward
        te_recipe_for(load_recipe("v3_fp8"))
    with pytest.raises(TEUnsupported, match="rowwise"):
        te_recipe_for(load_recipe("rowwise"))
    assert (RecipeScaling.DELAYED, (E4M3, E4M3, E5M2)) in TE_RECIPE_TABLE  # hybrid is expressible


@pytest.mark.skipif(te_available()[0], reason="TE usable here; the refusal path cannot be shown")
def test_backend_te_unavailable_names_reason_and_fix():
    ok, why = te_available()
    assert not ok and ("pip install" in why or "GPU" in why or "capability" in why)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    with pytest.raises(ValueError, match="backend=te is unavailable"):
        convert_to_fp8(model, load_recipe("hybrid"), backend="te")
    assert isinstance(model[0], torch.nn.Linear)  # nothing was swapped


def test_auto_falls_back_to_native_when_te_is_unusable():
    model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    report = convert_to_fp8(model, load_recipe("v3_fp8"), backend="auto")
    assert report.converted == ["0"] and "Transformer Engine" not in report.backend
