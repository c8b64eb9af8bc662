"""The delayed-scaling bank: casters' buffers are views into flat tensors, updated in one go,
and the bank notices when something re-allocated them."""

import copy

import torch

from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe
from fp8train.quant.scaling import delayed_scale_update
from fp8train.numerics.step_update import delayed_casters, invalidate_weight_caches


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    convert_to_fp8(model, load_recipe("hybrid"), backend="emulated")
    return model


def _train_step(model, scale=1.0):
    model(torch.randn(8, 64) * scale).sum().backward()
    after_optimizer_step(model)


def test_bank_matches_unbanked_update_and_aliases_buffers():
    banked, plain = _model(), _model()
    for step in range(3):
        torch.manual_seed(step)
        _train_step(banked, 1 + step)
        torch.manual_seed(step)
        plain(torch.randn(8, 64) * (1 + step)).sum().backward()
        for c in delayed_casters(plain):  # the reference rule, one caster at a time, no bank
            history, scale, scale_inv = delayed_scale_update(c.amax_history[None], c.scale, c.fp8_max,
                                                             c.config.margin, c.config.amax_compute_algo)
            c.amax_history.copy_(history[0]), c.scale.copy_(scale), c.scale_inv.copy_(scale_inv)
        invalidate_weight_caches(plain)
    for a, b in zip(banked.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    bank = banked._fp8_delayed_bank
    caster = delayed_casters(banked)[0]
    assert caster.amax_history.data_ptr() == bank.groups[0].history[0].data_ptr()


def test_bank_survives_load_state_dict_and_rebuilds_after_reallocation():
    model, other = _model(), _model()
    _train_step(model)
    _train_step(other, 3.0)
    bank = model._fp8_delayed_bank
    model.load_state_dict(other.state_dict())  # copies into the views: the bank stays valid
    assert bank.is_current(delayed_casters(model))
    assert torch.equal(bank.groups[0].scale, torch.cat([c.scale for c in delayed_casters(other)]))
    moved = copy.deepcopy(model)  # new tensors: the old bank no longer describes them
    assert not bank.is_current(delayed_casters(moved))
    _train_step(moved)
    assert moved._fp8_delayed_bank is not bank and moved._fp8_delayed_bank.is_current(delayed_casters(moved))
