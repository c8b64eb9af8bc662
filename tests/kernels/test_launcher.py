"""LeanKernel: the JIT path compiles once per specialization, later calls go straight to the binary.

A fake JIT function stands in for Triton here (CPU machines have no compiled kernels); the GPU
test tests/gpu/test_lean_launch.py checks the real thing bit for bit against the reference.
"""

import pytest
import torch

from kernels import launcher
from kernels.launcher import LeanKernel


class FakeBinary:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *call):
        self.log.append(("direct", call))


class FakeJit:
    arg_names = ["x_ptr", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.log, self.compiles = [], 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiles += 1
            self.log.append(("jit", grid, args, kwargs))
            return FakeBinary(self.log)
        return launch


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launcher, "current_stream", lambda device: 1234)
    jit = FakeJit()
    return jit, LeanKernel(jit, interpreted=False)


def test_second_call_with_the_same_specialization_skips_the_jit(fake):
    jit, kernel = fake
    x = torch.zeros(64)
    kernel((4,), (x, 64), {"BLOCK": 16, "FLAG": True}, num_warps=4)
    kernel((8,), (x, 64), {"BLOCK": 16, "FLAG": True}, num_warps=4)
    assert jit.compiles == 1 and kernel.lean_launches == 1
    kind, call = jit.log[-1]
    assert kind == "direct"
    # grid padded to 3-D, the stream, the binary's handles, no metadata/hooks, then signature order
    assert call[:9] == (8, 1, 1, 1234, "fn-handle", "meta", None, None, None)
    assert call[9:] == (x, 64, 16, True)


@pytest.mark.parametrize("change", ["constexpr", "warps", "int_is_one", "int_not_16", "dtype", "misaligned"])
def test_anything_triton_specializes_on_goes_back_through_the_jit(fake, change):
    jit, kernel = fake
    buf = torch.zeros(80)
    args, constexprs, warps = (buf[:64], 64), {"BLOCK": 16, "FLAG": True}, 4
    kernel((4,), args, constexprs, num_warps=warps)
    if change == "constexpr":
        constexprs = {"BLOCK": 32, "FLAG": True}
    elif change == "warps":
        warps = 8
    elif change == "int_is_one":
        args = (buf[:64], 1)
    elif change == "int_not_16":
        args = (buf[:64], 60)
    elif change == "dtype":
        args = (buf.double()[:64], 64)
    else:  # a view whose first element is 4 bytes past a 16-byte boundary
        args = (buf[1:65], 64)
    kernel((4,), args, constexprs, num_warps=warps)
    assert jit.compiles == 2 and kernel.lean_launches == 0


def test_arguments_out_of_signature_order_never_take_the_direct_call(fake):
    jit, kernel = fake
    x = torch.zeros(64)
    for _ in range(3):
        kernel((4,), (x, 64), {"FLAG": True, "BLOCK": 16})  # constexprs in the wrong order
    assert jit.compiles == 3 and kernel.lean_launches == 0


def test_interpreted_kernels_always_use_the_jit():
    jit = FakeJit()
    kernel = LeanKernel(jit, interpreted=True)
    for _ in range(3):
        kernel((4,), (torch.zeros(64), 64), {"BLOCK": 16, "FLAG": True})
    assert jit.compiles == 3 and kernel.lean_launches == 0


def test_a_registered_launch_hook_sends_every_call_through_the_jit(fake, monkeypatch):
    jit, kernel = fake
    runtime = type("Runtime", (), {"launch_enter_hook": type("Chain", (), {"calls": [print]})(),
                                   "launch_exit_hook": None})
    monkeypatch.setattr(launcher, "_runtime_knobs", lambda: runtime)
    for _ in range(3):
        kernel((4,), (torch.zeros(64), 64), {"BLOCK": 16, "FLAG": True})
    assert jit.compiles == 3 and kernel.lean_launches == 0
