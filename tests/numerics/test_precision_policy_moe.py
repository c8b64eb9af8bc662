"""The precision policy on MoE expert layers: judged by the grouped table (`grouped:<class>`) at
tokens x top_k rows, kept in BF16 GroupedLinear below the crossover, following the recipe when no
grouped table exists (with a note), and the trainer picking the grouped table of the shipped file."""

import torch

from fp8train.models.moe import MoE, MoEConfig
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, convert_to_fp8, load_recipe
from fp8train.numerics.crossover import CrossoverTable, GemmShape, Measurement, grouped_class, parse_crossover
from fp8train.numerics.precision_policy import PrecisionPolicy

TOKENS, DIM, HIDDEN, TOP_K = 64, 128, 256, 2
EXPERTS = ("gate_proj", "up_proj", "down_proj")


def _block() -> MoE:
    torch.manual_seed(0)
    return MoE(DIM, MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=TOP_K, expert_ffn_hidden=HIDDEN))


def _grouped(speedup_up: float, speedup_down: float) -> CrossoverTable:
    rows = (Measurement(GemmShape(TOKENS * TOP_K, DIM, HIDDEN), speedup_up),
            Measurement(GemmShape(TOKENS * TOP_K, HIDDEN, DIM), speedup_down))
    return CrossoverTable("Test GPU", grouped_class("delayed"), rows, "bench_moe.yaml", "MoE block")


def test_expert_layers_are_sized_tokens_times_top_k_and_judged_by_the_grouped_table():
    block = _block()
    policy = PrecisionPolicy(None, TOKENS, grouped_table=_grouped(0.6, 1.3))
    report = convert_to_fp8(block, load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert type(block.experts.gate_proj) is GroupedLinear and type(block.experts.up_proj) is GroupedLinear
    assert isinstance(block.experts.down_proj, FP8GroupedLinear)
    reasons = dict(report.skipped)
    assert reasons["experts.gate_proj"] == (f"bf16: {DIM}->{HIDDEN} at {TOKENS * TOP_K} tokens measured 0.60x on "
                                            "Test GPU (grouped:delayed, bench_moe.yaml); FP8 needs >= 1.00x")
    assert all(d.grouped for d in policy.decisions) and len(policy.decisions) == 3
    assert "precision policy: 1 of 3 MoE expert layer(s) in FP8 on Test GPU" in str(report)
    # the block still trains: BF16 and FP8 expert layers side by side
    out, aux = block(torch.randn(1, TOKENS, DIM))
    (out.sum() + aux).backward()
    assert block.experts.gate_proj.weight.grad is not None and block.experts.down_proj.weight.grad is not None


def test_without_a_grouped_table_expert_layers_follow_the_recipe_and_the_report_says_so():
    block = _block()
    policy = PrecisionPolicy(None, TOKENS)
    report = convert_to_fp8(block, load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert all(isinstance(getattr(block.experts, n), FP8GroupedLinear) for n in EXPERTS)
    assert policy.unjudged_grouped == 3
    assert "3 MoE expert layer(s) follow the recipe (no grouped crossover table" in str(report)


def test_dense_table_never_judges_expert_layers():
    """A dense row with the experts' exact shape must not decide a grouped layer (another kernel)."""
    dense = CrossoverTable("Test GPU", "delayed", (Measurement(GemmShape(TOKENS * TOP_K, DIM, HIDDEN), 0.2),
                                                   Measurement(GemmShape(TOKENS * TOP_K, HIDDEN, DIM), 0.2)),
                           "dense.yaml", "linear")
    block = _block()
    convert_to_fp8(block, load_recipe("hybrid"), module_filter=PrecisionPolicy(dense, TOKENS), backend="emulated")
    assert all(isinstance(getattr(block.experts, n), FP8GroupedLinear) for n in EXPERTS)


def test_grouped_classes_parse_beside_dense_ones():
    raw = {"device": "Test GPU", "classes": {"delayed": [{"tokens": 8, "in": 16, "out": 16, "speedup": 0.5}],
                                             "grouped:delayed": [{"tokens": 16, "in": 16, "out": 32, "speedup": 1.2}]}}
    parsed = parse_crossover(raw, "test")
    assert set(parsed.tables) == {"delayed", "grouped:delayed"}
    assert parsed.tables["grouped:delayed"].estimate(GemmShape(16, 16, 32)) == (1.2, "measured")


def test_bench_moe_rows_merge_into_a_crossover_file_and_the_slower_recipe_of_a_class_wins(tmp_path):
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.moe_crossover import crossover_rows, merge_into
    from fp8train.numerics.crossover import load_crossover

    layer = SimpleNamespace(tokens=8192, top_k=2, dim=2048, hidden=1408)
    rows = crossover_rows(layer, 6.0, {"hybrid": 8.0, "current": 7.5, "blockwise": 12.0})
    assert set(rows) == {"grouped:delayed", "grouped:current", "grouped:blockwise"}
    assert [m.speedup for m in rows["grouped:blockwise"]] == [0.5, 0.5]
    assert {m.shape for m in rows["grouped:delayed"]} == {GemmShape(16384, 2048, 1408), GemmShape(16384, 1408, 2048)}
    path = tmp_path / "gpu.yaml"
    path.write_text("device: Test GPU\nmatch: Test\nclasses:\n  delayed:\n"
                    "  - {tokens: 4, in: 8, out: 8, speedup: 0.5}\n")
    merge_into(path, "Test GPU", "2.x", rows)
    merge_into(path, "Test GPU", "2.x", crossover_rows(layer, 6.0, {"hybrid": 4.0}))  # a re-measure replaces
    saved = load_crossover(path)
    assert saved.match == "Test" and saved.tables["delayed"].estimate(GemmShape(4, 8, 8)) == (0.5, "measured")
    assert saved.tables["grouped:delayed"].estimate(GemmShape(16384, 2048, 1408)) == (1.5, "measured")
    assert len(saved.tables["grouped:delayed"].measurements) == 2
    assert saved.tables["grouped:current"].estimate(GemmShape(16384, 1408, 2048))[0] == 0.8
