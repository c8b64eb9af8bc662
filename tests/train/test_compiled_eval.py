"""Under torch.compile, evaluation and telemetry steps never break the graph or recompile after warm-up.

The trainer compiles the model in place (each decoder block by default, or the whole model), trains, evaluates every N steps with
fp8train.train.evaluate (no_grad, eval mode) and turns FP8 telemetry on every M steps. Before the
fix a telemetry cast called `float(tensor)` inside the traced forward (a graph break on
`Tensor.item()`, which made Dynamo fall back to eager for the whole decoder loop) and flipped a
guarded flag (a recompile per toggle). Here the real pieces run in the trainer's order:
train -> eval -> train (telemetry) -> eval -> train -> eval -> train, and after the warm-up (the
first training step and the first evaluation, each compiled once: one graph for all blocks when
the blocks are compiled) nothing compiles and nothing breaks. Dynamo's "eager" backend keeps the test fast: graph breaks and recompiles are decided by
Dynamo, before any backend runs.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters

from fp8train import models
from fp8train.numerics import after_optimizer_step, convert_to_fp8, fp8_telemetry, fp8_telemetry_step, \
    load_recipe, set_fp8_telemetry
from fp8train.train.compiling import CompileScope, compile_model
from fp8train.train.evaluate import evaluate
from fp8train.train.throughput import CompileWatch

VOCAB, SEQ, BATCH = 64, 16, 2


@pytest.fixture
def one_rank_group():
    """evaluate() all-reduces its sums: a one-process gloo group."""
    if dist.is_initialized():
        yield
        return
    with tempfile.NamedTemporaryFile() as store_file:
        store = dist.FileStore(store_file.name, 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _model(recipe_name: str, scope: CompileScope) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny", VOCAB, SEQ, n_layers=2))
    convert_to_fp8(model, load_recipe(recipe_name), backend="emulated")
    compile_model(model, scope, backend="eager")
    return model


def _train_step(model, optimizer, batch, telemetry: bool) -> dict:
    ids, labels = batch
    with fp8_telemetry_step(model, telemetry):
        model(ids, labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_optimizer_step(model)
    stats = fp8_telemetry(model)
    set_fp8_telemetry(model, False)
    return stats


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())  # {reason: count}


@pytest.mark.parametrize("recipe_name,scope", [
    ("hybrid", CompileScope.BLOCKS), ("hybrid", CompileScope.MODEL),
    # blockwise casts are custom operators under compile: Triton's interpreter on CPU (slow)
    pytest.param("blockwise", CompileScope.BLOCKS, marks=pytest.mark.slow)])
def test_eval_and_telemetry_never_recompile_or_break_after_warmup(recipe_name, scope, one_rank_group):
    torch._dynamo.reset()
    counters.clear()
    model = _model(recipe_name, scope)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    batches = [(ids[:, :-1], ids[:, 1:]) for ids in torch.randint(0, VOCAB, (8, BATCH, SEQ + 1), generator=gen)]
    val = batches[-2:]
    watch = CompileWatch()
    try:
        _train_step(model, optimizer, batches[0], telemetry=False)
        evaluate(model, val, torch.device("cpu"))
        warm = (watch.count, _graph_breaks())
        assert warm[0] == 2, "the training graph and the evaluation graph each compile once (blocks: one for all)"
        stats = _train_step(model, optimizer, batches[1], telemetry=True)
        evaluate(model, val, torch.device("cpu"))
        for i in (2, 3):
            _train_step(model, optimizer, batches[i], telemetry=False)
            result = evaluate(model, val, torch.device("cpu"))
    finally:
        watch.close()
    assert (watch.count, _graph_breaks()) == warm, dict(counters["graph_break"])
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    assert stats and all(isinstance(v, float) for v in stats.values()), "telemetry still collected"
    assert result["val/loss"] > 0
