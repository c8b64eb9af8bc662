"""Batched delayed-scaling update: kernel vs reference (bitwise) and both vs a pure-Python loop."""

import math

import numpy as np
import pytest
import torch

import kernels
from fp8train.quant.formats import FLT_MAX
from kernels import fallback as reference
from tests.kernels._helpers import assert_f32_equal

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ALGOS = ["max", "most_recent"]
SPECIALS = [0.0, math.inf, math.nan, 1e-45, 3e38]


def _amax_sequence(steps: int, tensors: int, seed: int) -> list[list[float]]:
    """Per step and tensor an amax: mostly positive, sometimes 0, inf, NaN, subnormal or huge."""
    rng = np.random.default_rng(seed)
    seq = []
    for _ in range(steps):
        row = []
        for _ in range(tensors):
            r = rng.random()
            row.append(float(SPECIALS[int(r * 50) % len(SPECIALS)]) if r < 0.3 else float(
                np.float32(rng.lognormal(0.0, 4.0))))
        seq.append(row)
    return seq


def _python_update(history: list, scale: np.float32, fmax: np.float32, margin: float, algo: str):
    """One tensor, pure Python with numpy float32 scalars (each op rounds once, like fp32)."""
    if algo == "max":  # non-finite amaxes are skipped (fp8train.quant.scaling)
        amax = max([v for v in history if math.isfinite(v)], default=0.0)
    else:
        amax = history[0]
    if math.isfinite(amax) and amax > 0:
        with np.errstate(over="ignore"):
            scale = fmax / np.float32(amax) / np.float32(2.0**margin)
    if math.isinf(scale):
        scale = np.float32(FLT_MAX)
    rolled = history[1:] + history[:1]
    return [0.0] + rolled[1:], np.float32(scale), np.float32(1.0) / np.float32(scale)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("margin", [0.0, 1.0])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_matches_python_loop(device, algo, margin, use_kernel):
    L, H, steps = 6, 4, 9
    fmax_list = [448.0, 57344.0, 448.0, 57344.0, 448.0, 448.0]
    update = kernels.delayed_scaling_update if use_kernel else reference.delayed_scaling_update
    history = torch.zeros(L, H, device=device)
    scale = torch.ones(L, device=device)
    scale_inv = torch.ones(L, device=device)
    fmax = torch.tensor(fmax_list, device=device)
    py_hist = [[0.0] * H for _ in range(L)]
    py_scale = [np.float32(1.0)] * L
    for step, amaxes in enumerate(_amax_sequence(steps, L, seed=int(margin) * 2 + len(algo))):
        history[:, 0] = torch.tensor(amaxes, dtype=torch.float32)
        update(history, scale, scale_inv, fmax, margin, algo)
        for i in range(L):
            py_hist[i][0] = float(np.float32(amaxes[i]))
            py_hist[i], py_scale[i], py_inv = _python_update(py_hist[i], py_scale[i],
                                                             np.float32(fmax_list[i]), margin, algo)
            assert scale[i].item() == float(py_scale[i]), (step, i, amaxes[i])
            assert scale_inv[i].item() == float(py_inv), (step, i)
        assert_f32_equal(history, torch.tensor(py_hist, dtype=torch.float32))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("L, H", [(7, 5), (3, 1), (40, 16), (2, 1024)])
@pytest.mark.parametrize("margin", [0.0, 1.0, 0.3])
def test_kernel_matches_reference(device, algo, L, H, margin):
    g = torch.Generator().manual_seed(L * H)
    history = torch.rand(L, H, generator=g) * 10.0 ** torch.randint(-40, 38, (L, H), generator=g)
    history.view(-1)[torch.randperm(L * H, generator=g)[: L * H // 4]] = 0.0
    history[0, H - 1] = math.nan  # algo max: skipped; most_recent: only read if in slot 0
    history[-1, 0] = math.inf
    scale = torch.rand(L, generator=g) + 0.5
    fmax = torch.where(torch.arange(L) % 2 == 0, 448.0, 57344.0)
    ref = [t.clone() for t in (history, scale, 1 / scale)]
    got = [t.clone().to(device) for t in ref]
    kernels.delayed_scaling_update(*got, fmax.to(device), margin, algo)
    reference.delayed_scaling_update(*ref, fmax, margin, algo)
    for name, g_t, r_t in zip(("amax_history", "scale", "scale_inv"), got, ref):
        assert_f32_equal(g_t, r_t, name)
    assert (ref[0][:, 0] == 0).all()


def test_non_finite_amaxes_are_skipped(device):
    """A NaN/inf history entry is skipped by "max" (448 / 2 from the finite ones); with no finite
    entry the old scale is kept, and a stored infinite scale becomes FLT_MAX (issue #13 items 6-7)."""
    history = torch.tensor([[1.0, math.nan, 2.0], [math.nan, 1.0, 2.0], [math.inf, math.nan, 0.0]], device=device)
    scale = torch.tensor([5.0, 6.0, math.inf], device=device)
    scale_inv = torch.empty(3, device=device)
    kernels.delayed_scaling_update(history, scale, scale_inv, torch.full((3,), 448.0, device=device))
    assert scale.tolist() == [224.0, 224.0, FLT_MAX]
    assert torch.isnan(history[0, 0].cpu()).item() is False and history[0, 0].item() == 0.0
    kernels.delayed_scaling_update(history, scale, scale_inv, torch.full((3,), 448.0, device=device),
                                   algo="most_recent")
    assert scale.tolist() == [224.0, 224.0, FLT_MAX]  # slot 0 now 0: nothing valid, kept


def test_validation():
    h, s = torch.zeros(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="algo"):
        kernels.delayed_scaling_update(h, s, s.clone(), s.clone(), 0.0, "mean")
    with pytest.raises(ValueError, match="scale"):
        kernels.delayed_scaling_update(h, torch.ones(3), s.clone(), s.clone())
    with pytest.raises(ValueError, match="float32"):
        kernels.delayed_scaling_update(h.double(), s, s.clone(), s.clone())


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_large_on_gpu(algo):
    L, H = 513, 1024
    history = torch.rand(L, H, device="cuda") * 100
    history[3, 700] = math.nan
    scale = torch.ones(L, device="cuda")
    fmax = torch.full((L,), 448.0, device="cuda")
    ref = [t.clone() for t in (history, scale, scale.clone())]
    got = [t.clone() for t in ref]
    kernels.delayed_scaling_update(*got, fmax, 1.0, algo)
    reference.delayed_scaling_update(*ref, fmax, 1.0, algo)
    for g_t, r_t in zip(got, ref):
        assert_f32_equal(g_t, r_t)
