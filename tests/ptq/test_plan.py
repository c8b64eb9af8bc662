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


def test_sensitivity_rows():
    model = tiny_model()
    windows = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    rows = layer_sensitivity(model, windows, {"w4": QuantSpec("uint4", "row", symmetric=False), "w8": HIGH.weight})
    assert [r["layer"] for r in rows][:2] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj"] and len(rows) == 14
    assert sum(abs(r["delta_w4"]) for r in rows) > 4 * sum(abs(r["delta_w8"]) for r in rows)


def test_greedy_plan_meets_the_budget_and_round_trips(tmp_path):
    rows = [{"layer": f"layers.0.l{i}", "numel": n, "delta_low": d, "delta_high": 0.0}
            for i, (n, d) in enumerate([(100, 0.5), (100, 0.05), (300, 0.3), (100, 0.0)])]
    plan = greedy_plan(rows, LOW, HIGH, budget_bits=5.0)  # room for 150 of 600 parameters at +4 bits
    sizes = {r["layer"]: r["numel"] for r in rows}
    assert set(plan.layers) == {"layers.0.l0"}  # best gain per bit; l2 (0.3 / 300) no longer fits
    assert plan.average_bits(sizes) == pytest.approx(4 + 4 * 100 / 600)
    path = plan.save(tmp_path / "plan.yaml")
    assert QuantPlan.load(path).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="plan names layers the model does not have"):
        QuantPlan(LOW, {"layers.9.attn.q_proj": HIGH}).check_layers(set(sizes))
