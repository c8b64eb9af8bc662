"""FP8 state (amax histories, scales) is persistent FP32 buffers: state_dict carries it, and loading
restores it bit for bit, also through torch.save / torch.load and for models that never ran."""

import io

import torch
from torch import nn

from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe

ROLES = ("input", "weight", "grad_output")


def build(recipe_name: str = "hybrid") -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    report = convert_to_fp8(model, load_recipe(recipe_name), backend="emulated")
    assert report.converted == ["0", "2"]
    return model


def train(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        model(torch.randn(16, 64) * (step + 1)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(model)


def fp8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "_caster." in k}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key].view(torch.int32), b[key].view(torch.int32)), key


def test_state_dict_holds_histories_and_scales_as_persistent_fp32_buffers():
    state = fp8_state(build())
    expected = {f"{layer}.{role}_caster.{buf}" for layer in ("0", "2") for role in ROLES
                for buf in ("amax_history", "scale", "scale_inv")}
    assert set(state) == expected
    assert state["0.input_caster.amax_history"].shape == (1024,)
    assert state["2.grad_output_caster.scale"].shape == (1,)


def test_load_restores_fp8_state_bit_for_bit_into_fresh_model():
    model = build()
    train(model)
    trained = fp8_state(model)
    assert (trained["0.input_caster.scale"] != 1).all() and (trained["2.grad_output_caster.amax_history"] > 0).any()
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    assert_bitwise_equal(fp8_state(fresh), trained)
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_model_that_never_ran_saves_and_loads_cleanly():
    untouched = build()
    state = fp8_state(untouched)
    assert all((v == 0).all() for k, v in state.items() if k.endswith("amax_history"))
    assert all((v == 1).all() for k, v in state.items() if not k.endswith("amax_history"))
    other = build()
    train(other)
    result = other.load_state_dict(untouched.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_bitwise_equal(fp8_state(other), state)
    train(other, steps=1)  # and it trains on from there


def test_round_trip_through_torch_save_and_load(tmp_path):
    model = build()
    train(model)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    fresh = build()
    fresh.load_state_dict(loaded)
    assert_bitwise_equal(fp8_state(fresh), fp8_state(model))
    buffer = io.BytesIO()
    torch.save(fresh.state_dict(), buffer)
    buffer.seek(0)
    assert_bitwise_equal({k: v for k, v in torch.load(buffer).items() if "_caster." in k}, fp8_state(model))


def test_online_recipes_have_no_fp8_state_to_save():
    for name in ("current", "rowwise"):
        assert fp8_state(build(name)) == {}
