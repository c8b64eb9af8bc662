"""bench_moe's link to the precision policy: grouped crossover rows out, policy-converted blocks in.

`crossover_rows` turns one layer's measured block times into rows of the `grouped:<recipe class>`
tables (fp8train.numerics.crossover): both expert shapes of the block (d -> hidden for gate/up,
hidden -> d for down) at tokens x top_k rows get the block's speedup. `merge_into` adds them to a
crossover file (a shipped recipes/crossover/*.yaml or a new one), keeping what it already holds;
when two recipes share a class the slower measurement wins. `policy_filter` is the module filter
the trainer would build on this GPU (shipped tables, `trainer.precision_policy=table`), so the
"policy <recipe>" rows show what a user training this block gets.
"""

from __future__ import annotations

from pathlib import Path

from fp8train.numerics import load_recipe
from fp8train.numerics.crossover import CrossoverFile, CrossoverTable, GemmShape, Measurement, grouped_class, \
    load_crossover, recipe_class, save_crossover
from fp8train.numerics.precision_policy import PrecisionPolicy, shipped_policy

METHOD = "MoE block fwd+bwd (router, dispatch, routed + shared experts), BF16 torch._grouped_mm, eager, median"


def crossover_rows(layer, bf16_ms: float, fp8_ms: dict[str, float]) -> dict[str, list[Measurement]]:
    """{grouped class: [Measurement for d->hidden, hidden->d]} from one layer's block times per recipe."""
    rows: dict[str, list[Measurement]] = {}
    for recipe_name, ms in fp8_ms.items():
        klass = grouped_class(recipe_class(load_recipe(recipe_name)))
        for shape in (GemmShape(layer.tokens * layer.top_k, layer.dim, layer.hidden),
                      GemmShape(layer.tokens * layer.top_k, layer.hidden, layer.dim)):
            new = Measurement(shape, bf16_ms / ms, bf16_ms, ms)
            old = [m for m in rows.get(klass, []) if m.shape == shape]
            if old and old[0].speedup <= new.speedup:
                continue
            rows[klass] = [m for m in rows.get(klass, []) if m.shape != shape] + [new]
    return rows


def merge_into(path: Path, device: str, torch_version: str, rows: dict[str, list[Measurement]]) -> Path:
    """Add the rows to the crossover file at path (created if missing); same shape: replaced."""
    path = Path(path)
    if path.is_file():
        old = load_crossover(path)
    else:
        old = CrossoverFile(device, device, torch_version, "", "benchmarks/bench_moe.py --crossover-out", {})
    tables = dict(old.tables)
    for klass, measurements in rows.items():
        kept = tuple(m for m in (tables[klass].measurements if klass in tables else ())
                     if m.shape not in {n.shape for n in measurements})
        tables[klass] = CrossoverTable(old.device, klass, kept + tuple(measurements),
                                       "benchmarks/bench_moe.py --crossover-out", METHOD)
    return save_crossover(path, CrossoverFile(old.device, old.match, old.torch, old.method, old.source, tables))


def policy_filter(recipe_name: str, device: str, tokens: int,
                  measured: dict[str, list[Measurement]] | None = None) -> PrecisionPolicy:
    """The trainer's table policy on this GPU for a block fed `tokens` tokens per micro-batch.
    `measured` (crossover_rows of this run) adds to, and for equal shapes replaces, the shipped
    grouped rows: what the shipped file will hold once --crossover-out has written them."""
    recipe = load_recipe(recipe_name)
    policy = shipped_policy(device, recipe, tokens)
    klass = grouped_class(recipe_class(recipe))
    fresh = (measured or {}).get(klass, [])
    if fresh:
        shipped = policy.grouped_table.measurements if policy.grouped_table else ()
        kept = tuple(m for m in shipped if m.shape not in {n.shape for n in fresh})
        policy.grouped_table = CrossoverTable(device, klass, kept + tuple(fresh), "this run", METHOD)
    return policy
