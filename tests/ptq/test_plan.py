"""Plans (mixed precision), sensitivity and presets as data."""

from pathlib import Path

import pytest
import torch
import yaml

from fp8train.ptq.config import PtqConfig
from fp8train.ptq.plan import LayerPlan, QuantPlan, greedy_plan
from fp8train.ptq.sensitivity import layer_sensitivity
from fp8train.quant.spec import QuantSpec
from tests.ptq.helpers import tiny_model

PRESETS = sorted((Path(__file__).resolve().parents[2] / "conf" / "quant").glob("*.yaml"))
LOW, HIGH = LayerPlan(QuantSpec("uint4", "tile", 32, False)), LayerPlan(QuantSpec("int8", "row"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_parses(path):
    config = PtqConfig.from_dict(yaml.safe_load(path.read_text()))
    assert config.name == path.stem


def test_bad_presets_name_the_problem():
    with pytest.raises(ValueError, match="method='gptqq'.*rtn"):
        PtqConfig.from_dict({"method": "gptqq", "weight": {"format": "int8"}})
    with pytest.raises(ValueError, match="unknown key.*'gptq_opts'"):
        PtqConfig.from_dict({"method": "gptq", "weight": {"format": "int8"}, "gptq_opts": {}})
    with pytest.raises(ValueError, match="smoothquant needs an input"):
        PtqConfig.from_dict({"method": "smoothquant", "weight": {"format": "int8"}})


def test_sensitivity_and_greedy_plan_meet_the_budget(tmp_path):
    model = tiny_model()
    windows = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    rows = layer_sensitivity(model, windows, {"w4": LOW.weight, "w8": HIGH.weight})
    assert len(rows) == 14 and all(r["delta_w4"] > r["delta_w8"] - 1e-3 for r in rows)
    rows = [{**r, "delta_low": r["delta_w4"], "delta_high": r["delta_w8"]} for r in rows]
    plan = greedy_plan(rows, LOW, HIGH, budget_bits=5.0)
    sizes = {r["layer"]: r["numel"] for r in rows}
    assert 4.0 < plan.average_bits(sizes) <= 5.0
    promoted = set(plan.layers)
    best = max(rows, key=lambda r: (r["delta_low"] - r["delta_high"]) / r["numel"])
    assert best["layer"] in promoted
    path = plan.save(tmp_path / "plan.yaml")
    again = QuantPlan.load(path)
    assert again.to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="plan names layers the model does not have"):
        QuantPlan(LOW, {"layers.9.attn.q_proj": HIGH}).check_layers(set(sizes))
