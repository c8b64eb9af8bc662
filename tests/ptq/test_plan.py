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


# one block as the sensitivity analysis measures it: (layer, numel, loss increase at the low quantizer)
BLOCK = [("attn.q_proj", 100, 0.40), ("attn.k_proj", 100, 0.01), ("attn.v_proj", 100, 0.30),
         ("attn.o_proj", 100, 0.25), ("mlp.gate_proj", 200, 0.20), ("mlp.up_proj", 200, 0.05),
         ("mlp.down_proj", 200, 0.10)]


def _rows(blocks=1):
    return [{"layer": f"layers.{b}.{path}", "numel": n, "delta_low": d, "delta_high": 0.0}
            for b in range(blocks) for path, n, d in BLOCK]


def _sizes(rows):
    return {r["layer"]: r["numel"] for r in rows}


def test_fused_groups_by_name():
    from fp8train.ptq.fused_groups import fused_groups

    names = [f"layers.0.{p}" for p, _, _ in BLOCK] + ["layers.1.moe.shared_experts.gate_proj",
                                                      "layers.1.moe.shared_experts.up_proj", "layers.1.attn.q_proj"]
    assert fused_groups(names) == [
        ("layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj"), ("layers.0.attn.o_proj",),
        ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"), ("layers.0.mlp.down_proj",),
        ("layers.1.moe.shared_experts.gate_proj", "layers.1.moe.shared_experts.up_proj"), ("layers.1.attn.q_proj",)]


@pytest.mark.parametrize("budget", [5.4, 6.0])
def test_per_layer_greedy_is_unchanged(budget):
    """fuse_groups=False is the per-layer plan (derived by hand; each layer is 100 or 200 of 1000
    parameters, +4 bits each, so 5.4 bits leaves room for 350 promoted parameters and 6.0 for 500).
    Gain per parameter: q .004, v .003, o .0025, gate .001, down .0005, up .00025, k .0001."""
    rows = _rows()
    plan = greedy_plan(rows, LOW, HIGH, budget, fuse_groups=False)
    promoted = {name.partition(".")[2].partition(".")[2] for name in plan.layers}
    # 5.4: q, v, o (300); gate would make 500 > 350; down, up, k do not fit either
    # 6.0: q, v, o, gate (500); down, up no longer fit; k (100) would make 600
    expected = {5.4: {"attn.q_proj", "attn.v_proj", "attn.o_proj"},
                6.0: {"attn.q_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj"}}[budget]
    assert promoted == expected and all(v == HIGH for v in plan.layers.values())
    assert plan.split_groups(_sizes(rows)) != []  # per layer, q/k/v (and at 6.0 gate/up) are split


@pytest.mark.parametrize("budget", [5.4, 6.0])
def test_grouped_greedy_promotes_whole_groups(budget):
    """Groups: qkv 300 params gain .71 (.00237 per param), o .0025, gate_up 400 gain .25 (.000625),
    down .0005. 5.4 (350): o, then qkv no longer fits, gate_up neither, down fits -> o + down.
    6.0 (500): o, qkv (400), gate_up would make 800, down 600 -> o + q + k + v."""
    rows = _rows()
    plan = greedy_plan(rows, LOW, HIGH, budget)
    promoted = {name.partition(".")[2].partition(".")[2] for name in plan.layers}
    expected = {5.4: {"attn.o_proj", "mlp.down_proj"},
                6.0: {"attn.o_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj"}}[budget]
    assert promoted == expected
    assert plan.split_groups(_sizes(rows)) == []
    assert plan.average_bits(_sizes(rows)) <= budget


def test_grouped_greedy_never_splits_and_meets_the_budget():
    gen = torch.Generator().manual_seed(0)
    rows = _rows(blocks=6)
    for row in rows:  # random sensitivities and sizes: many orders, some layers with no gain at all
        row["delta_low"] = float(torch.rand((), generator=gen)) - 0.1
        row["delta_high"] = float(torch.rand((), generator=gen)) * 0.05
        row["numel"] *= int(torch.randint(1, 5, (), generator=gen))
    sizes = _sizes(rows)
    for budget in (4.0, 4.5, 5.0, 5.5, 6.5, 8.0):
        grouped, single = greedy_plan(rows, LOW, HIGH, budget), greedy_plan(rows, LOW, HIGH, budget, fuse_groups=False)
        assert grouped.split_groups(sizes) == [] and grouped.average_bits(sizes) <= budget
        assert single.average_bits(sizes) <= budget
        if 4.0 < budget < 8.0:
            assert single.split_groups(sizes)  # the per-layer plan does split here: the check is not vacuous
    with pytest.raises(ValueError, match="must have more bits than the low one"):
        greedy_plan(rows, HIGH, LOW, 8.0)


def test_split_plan_warns_at_export(tmp_path):
    """A hand-edited plan that gives q_proj INT8 and k/v_proj INT4 loads and exports, with a warning
    naming the group and the engines; the folder records the split. A plan that keeps groups whole
    exports silently."""
    import json
    import warnings

    from fp8train.ptq.config import PtqConfig
    from fp8train.ptq.export import save_quantized
    from fp8train.ptq.fused_groups import FusedGroupSplitWarning
    from fp8train.ptq.pipeline import quantize_decoder
    from tests.ptq.helpers import TINY

    path = tmp_path / "plan.yaml"
    QuantPlan(LOW, {}).save(path)
    path.write_text(path.read_text().replace("layers: {}", "layers:\n  layers.1.attn.q_proj: {weight: {format: int8}}"))
    plan = QuantPlan.load(path)
    assert plan.split_groups(["layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.1.attn.v_proj"])
    config = PtqConfig.from_dict({"method": "rtn", "weight": LOW.weight.to_dict()})
    meta = {"model_config": TINY.__dict__ | {"moe": None}}
    model = tiny_model()
    quantize_decoder(model, config, plan, None)
    with pytest.warns(FusedGroupSplitWarning, match=r"layers\.1\.attn\.q_proj: int8.*layers\.1\.attn\.k_proj: "
                                                     r"uint4.*vLLM and SGLang.*plan_fuse_groups=true"):
        folder = save_quantized(model, tmp_path / "split", meta)
    written = json.loads((folder / "config.json").read_text())["fp8train"]["split_fused_groups"]
    assert written == [["layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.1.attn.v_proj"]]
    whole = QuantPlan(LOW, {f"layers.1.attn.{p}_proj": HIGH for p in "qkv"} | {"layers.0.mlp.down_proj": None})
    model = tiny_model()
    quantize_decoder(model, config, whole, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedGroupSplitWarning)
        folder = save_quantized(model, tmp_path / "whole", meta)
    assert json.loads((folder / "config.json").read_text())["fp8train"]["split_fused_groups"] == []
