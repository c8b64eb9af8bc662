"""Distributed consistency of delayed scaling: two gloo processes whose inputs differ end each step
with identical scales and histories, equal to the reference fed with the MAX over ranks (a NaN
on one rank keeps the old scale on every rank)."""

import datetime
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fp8train.numerics import FP8Linear, after_optimizer_step
from tests.numerics.helpers import DelayedScalingRef, assert_exact, delayed_role, make_recipe

WORLD, STEPS = 2, 4
ROLES = ("input", "weight", "grad_output")
RECIPE = dict(input=delayed_role("e4m3", 3, "max", 0.0), weight=delayed_role("e4m3", 3, "max", 0.0),
              grad_output=delayed_role("e5m2", 2, "most_recent", 1.0))
SHAPES = [(64, 32), (32, 48)]
NAN_AT = (0, 1, 0)  # rank 0, step 1, layer 0: a NaN input (gloo's MAX would drop rank 0's NaN)


def layer_runs(rank: int, step: int, index: int) -> bool:
    return not (rank == 1 and step == 2 and index == 1)  # a layer idle on one rank must not hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)  # identical weights on both ranks
    layers = nn.ModuleList([FP8Linear(k, n, recipe=make_recipe(**RECIPE)) for k, n in SHAPES])
    amaxes, states = [], []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        step_amax = {}
        for i, layer in enumerate(layers):
            if not layer_runs(rank, step, i):
                continue
            x = torch.randn(16, layer.in_features, generator=gen) * (1 + 3 * rank) * (step + 1)
            if (rank, step, i) == NAN_AT:
                x[3, 5] = float("nan")
            dy = torch.randn(16, layer.out_features, generator=gen) * 10.0 ** (rank - step)
            layer(x).backward(dy)
            step_amax[i] = {"input": x.abs().max().item(), "weight": layer.weight.abs().max().item(),
                            "grad_output": dy.abs().max().item()}
        after_optimizer_step(layers)
        amaxes.append(step_amax)
        states.append({k: v.clone() for k, v in layers.state_dict().items() if "caster" in k})
    torch.save({"amaxes": amaxes, "states": states}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (runs by default; ~10 s on 2 CPU cores)
def test_two_ranks_agree_on_max_amax_scales(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    recipe = make_recipe(**RECIPE)
    refs = {(i, role): DelayedScalingRef(recipe.role(role).fp8.max, recipe.role(role).history_len,
                                         recipe.role(role).amax_compute_algo, recipe.role(role).margin)
            for i in range(len(SHAPES)) for role in ROLES}
    for step in range(STEPS):
        for (i, role), ref in refs.items():
            local = [r["amaxes"][step][i][role] for r in results if i in r["amaxes"][step]]
            assert len(local) == (1 if (step, i) == (2, 1) else 2)
            # the MAX over ranks; a NaN anywhere travels as +inf: non-finite, so every rank keeps its scale
            ref.record(math.inf if any(math.isnan(a) for a in local) else max(local))
            ref.update()
            for rank, result in enumerate(results):
                state = result["states"][step]
                assert_exact(state[f"{i}.{role}_caster.amax_history"], ref.history)
                assert_exact(state[f"{i}.{role}_caster.scale"], ref.scale)
                assert_exact(state[f"{i}.{role}_caster.scale_inv"], ref.scale_inv)
    nan_scale = [r["states"][1]["0.input_caster.scale"] for r in results]
    assert all(torch.equal(s, r["states"][0]["0.input_caster.scale"]) for s, r in zip(nan_scale, results))
    # inputs really differed, so agreement is not a coincidence
    first = results[0]["amaxes"][0][0]["input"], results[1]["amaxes"][0][0]["input"]
    assert first[0] != first[1]
