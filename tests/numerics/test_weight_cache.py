"""The FP8 working weight: cast once per optimizer step (shared by every gradient-accumulation
micro-batch and by backward), and never stale after the master weight changes."""

import pytest
import torch
from torch import nn

from fp8train.numerics import FP8Linear, after_optimizer_step, attach_optimizer, load_recipe

RECIPES = ["hybrid", "current", "rowwise", "blockwise"]


def make_layer(recipe_name: str) -> FP8Linear:
    return FP8Linear.from_linear(nn.Linear(256, 128), load_recipe(recipe_name), backend="emulated")


def fresh_output(layer: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """Output of a newly built layer holding the same weights and FP8 state (no cache)."""
    fresh = FP8Linear(layer.in_features, layer.out_features, recipe=layer.recipe, backend="emulated")
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        return fresh(x)


def count_weight_casts(layer: FP8Linear) -> list[int]:
    """Wrap the weight caster so each real cast is counted independently of layer.weight_casts."""
    calls, cast = [0], layer.weight_caster.cast

    def counting_cast(*args, **kwargs):
        calls[0] += 1
        return cast(*args, **kwargs)

    layer.weight_caster.cast = counting_cast
    return calls


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_weight_cast_once_per_step_across_micro_batches_and_backward(recipe_name):
    layer = make_layer(recipe_name)
    calls = count_weight_casts(layer)
    for _ in range(4):  # gradient accumulation: 4 micro-batches, forward + backward each
        layer(torch.randn(128, 256)).sum().backward()
    assert layer.weight_casts == 1 and calls[0] == 1
    after_optimizer_step(layer)
    layer(torch.randn(128, 256)).sum().backward()
    assert layer.weight_casts == 2 and calls[0] == 2


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_adamw_step_with_attached_hook_gives_fresh_fp8_weight(recipe_name):
    layer = make_layer(recipe_name)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    attach_optimizer(layer, optimizer)
    x = torch.randn(128, 256)
    before = layer(x)
    before.sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(after, before.detach())
    assert torch.equal(after, fresh_output(layer, x))
    assert layer.weight_casts == 2


class DataOptimizer(torch.optim.SGD):
    """SGD writing through `.data` (as some engines do): the version counter does not move."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_attach_optimizer_hook_catches_updates_the_version_counter_misses():
    layer = make_layer("current")
    optimizer = DataOptimizer(layer.parameters(), lr=0.5)
    attach_optimizer(layer, optimizer)
    x = torch.randn(128, 256)
    layer(x).sum().backward()
    version = layer.weight._version
    optimizer.step()
    assert layer.weight._version == version  # invisible to the cache key...
    with torch.no_grad():
        assert torch.equal(layer(x), fresh_output(layer, x))  # ...but the hook dropped the cache


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_in_place_add_under_no_grad_forces_recast(recipe_name):
    layer = make_layer(recipe_name)
    x = torch.randn(128, 256)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh_output(layer, x))
    assert layer.weight_casts == 2


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_data_copy_then_after_optimizer_step_gives_fresh_weight(recipe_name):
    layer = make_layer(recipe_name)
    x = torch.randn(128, 256)
    with torch.no_grad():
        before = layer(x)
        layer.weight.data.copy_(torch.randn_like(layer.weight) * 0.05)
        # `.data` writes bypass the version counter: the contract is after_optimizer_step (the
        # trainer calls it at every accumulation boundary), which must drop the cached FP8 weight.
        assert torch.equal(layer(x), before)
        after_optimizer_step(layer)
        after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh_output(layer, x))


def test_rebinding_weight_storage_or_dtype_forces_recast():
    layer = make_layer("current")
    x = torch.randn(128, 256)
    with torch.no_grad():
        layer(x)
        layer.weight.data = torch.randn_like(layer.weight)  # new storage: data_ptr changes
        assert torch.equal(layer(x), fresh_output(layer, x))
        layer.to(torch.bfloat16)
        y = layer(x.bfloat16())
    assert layer.weight_casts == 3 and y.dtype == torch.bfloat16
