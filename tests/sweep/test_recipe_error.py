"""recipe_error on a small model: FP8 off is exact, every FP8 recipe costs something finite, and
E4M3 activations are measurably more exact than the design card's E5M2 ones (paired)."""

from __future__ import annotations

import math

import pytest
import torch

from fp8train import models
from fp8train.sweep.recipe_error import measure, table, variant_recipe


def test_variant_parsing_and_errors():
    label, recipe = variant_recipe("v3c=v3_fp8:input.scaling=current,weight.scaling=current,"
                                   "grad_output.scaling=current,input.power_of_2=true")
    assert label == "v3c" and recipe.name == "v3c" and recipe.input.scaling == "current" and recipe.input.power_of_2
    assert recipe.input.format == "e5m2"  # the preset's format is kept
    assert variant_recipe("hybrid")[0] == "hybrid"
    with pytest.raises(ValueError, match="is not key=value"):
        variant_recipe("x=v3_fp8:input.scaling")
    with pytest.raises(ValueError, match="unknown recipe"):
        variant_recipe("x=v9:input.scaling=current")


@pytest.mark.slow  # emulated FP8 forward + backward of 3 recipes: ~5-30 s on 2 CPU cores
def test_measure_orders_recipes_by_their_error():
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny", 64, 32, n_layers=1))
    model.train()
    batches = [(ids, ids) for ids in torch.randint(0, 64, (3, 4, 32))]
    recipes = dict(variant_recipe(v) for v in ("bf16", "v3_fp8", "e4m3_in=v3_fp8:input.format=e4m3"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = measure(model, recipes, batches[1:], batches[:1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base untouched
    assert results["bf16"]["loss_gap_pct"] == [0.0] * 2 and all(math.isinf(v) for v in results["bf16"]["grad_sqnr_db"])
    v3, e4m3 = results["v3_fp8"], results["e4m3_in"]
    assert all(len(r["grad_sqnr_db"]) == 2 for r in results.values())  # one SQNR per eval micro-batch
    assert all(5 < s < 60 for s in v3["grad_sqnr_db"])
    assert all(a > b for a, b in zip(e4m3["grad_sqnr_db"], v3["grad_sqnr_db"]))  # 3 mantissa bits beat 2
    text = table(results)
    assert "| v3_fp8 |" in text and "(reference)" in text and "| bf16 | +0.000 +- 0.000 | exact |" in text
