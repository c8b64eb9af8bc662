"""Launch a compiled Triton kernel without the JIT's per-call dispatch.

`kernel[grid](*args)` costs 25-40 us of host time on the H100 box before the driver is even called:
Triton binds the arguments, computes a specialization key for every argument (dtype, 16-byte
alignment, value == 1, divisibility by 16), hashes it, looks the binary up, checks that no global
it read has changed, and builds launch metadata. A small FP8 layer launches three or four casts per
step, so this is a measurable share of its time (benchmarks/bench_host_overhead.py).

`LeanKernel` does the lookup itself with a cheaper key that captures the same facts for OUR
argument lists: tensor dtypes and alignment, and for integers the properties Triton specializes on.
The first call with a new key goes through the normal JIT path (which compiles and launches), and
the binary it returns is kept; later calls with that key call the binary's launcher directly, with
the arguments in signature order, exactly as `JITFunction.run` does (Triton 3.6 through 3.9 share
this call). Anything unusual takes the normal path: the interpreter, a registered launch hook (the
Proton profiler), or a Triton whose compiled kernels do not look as expected.
"""

from __future__ import annotations

import torch

_ALIGN = 16  # Triton specializes pointers on 16-byte alignment


def _arg_key(a) -> tuple:
    """What Triton specializes an argument on: a tensor's dtype, device and 16-byte alignment; an
    integer being 1, divisible by 16, or needing 64 bits. Floats are not specialized."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % _ALIGN == 0, a.get_device()
    if isinstance(a, int):
        return a == 1, a % 16 == 0, not -(2**31) <= a < 2**31
    return ()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (triton.cdiv is a constexpr_function: slower from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class LeanKernel:
    """kernel(grid, args, constexprs, num_warps): same effect as jit_fn[grid](*args, **constexprs)."""

    def __init__(self, jit_fn, interpreted: bool):
        self.jit_fn, self.interpreted = jit_fn, interpreted
        self.binaries: dict[tuple, object] = {}
        self.lean_launches = 0  # calls that skipped the JIT (tests read it)

    def _key(self, args: tuple, constexprs: dict, num_warps: int) -> tuple:
        return (num_warps, *constexprs.values(), *map(_arg_key, args))

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4) -> None:
        if self.interpreted:
            self.jit_fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        key = self._key(args, constexprs, num_warps)
        binary = self.binaries.get(key)
        if binary is None or _hooks_active(_runtime_knobs()):
            binary = self.jit_fn[grid](*args, **constexprs, num_warps=num_warps)
            if _launchable(binary) and self._in_signature_order(args, constexprs):
                self.binaries[key] = binary
            return
        stream = current_stream(args[0].get_device())
        full = (*args, *constexprs.values())  # signature order: runtime args, then constexprs
        grid3 = (*grid, 1, 1)
        binary.run(grid3[0], grid3[1], grid3[2], stream, binary.function, binary.packed_metadata, None,
                   None, None, *full)
        self.lean_launches += 1

    def _in_signature_order(self, args: tuple, constexprs: dict) -> bool:
        """The direct call passes (*args, *constexprs) positionally: only valid if that IS the
        kernel's parameter order (every constexpr given, none defaulted)."""
        names = list(getattr(self.jit_fn, "arg_names", []))
        return names[len(args):] == list(constexprs) and len(names) == len(args) + len(constexprs)


def current_stream(device_index: int) -> int:
    """The raw handle of torch's current CUDA stream (what Triton's own launch path passes)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def _runtime_knobs():
    global _KNOBS
    if _KNOBS is None:
        from triton import knobs  # noqa: PLC0415 (kernels import triton lazily)

        _KNOBS = knobs
    return _KNOBS.runtime


_KNOBS = None


def _hooks_active(runtime) -> bool:
    """Launch hooks registered (Triton keeps them in HookChains, empty unless a profiler adds one)."""
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and (not hasattr(h, "calls") or h.calls) for h in hooks)


def _launchable(binary) -> bool:
    return all(hasattr(binary, name) for name in ("run", "function", "packed_metadata"))
