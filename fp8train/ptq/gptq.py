"""GPTQ (Frantar et al. 2022): quantize W column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs.

A faithful port of the reference (IST-DASLab/gptq @2d65066, `GPTQ.fasterquant`), written anew:

    H = 2/n sum x x^T            running mean over calibration sequences (HessianAccumulator)
    dead inputs (H_ii = 0): H_ii = 1, W[:, i] = 0
    act_order: columns sorted by diag(H) descending;  damping: H += percdamp * mean(diag H) * I
    U = cholesky(cholesky_inverse(cholesky(H)), upper=True)      the upper factor of H^-1
    for each block of `block_size` columns, for each column i:
        q = quant(w_i);  err = (w_i - q) / U_ii;  W[:, i:block_end] -= err (x) U[i, i:block_end]
        loss += (w_i - q)^2 / U_ii^2 / 2
    after the block: W[:, block_end:] -= Err @ U[block, block_end:]

Group-grid convention (what "group g" means, kept from the reference):
* per-channel (granularity row): one grid per output row, taken from W before GPTQ runs;
* dynamic groups (tile, static_groups false): the grid of group j is computed from the RUNNING W
  when its first column is reached, i.e. W already updated by every earlier block, read from the
  full matrix (not the in-block copy: columns of this block before the group start are not yet
  folded into it; torchao's prototype differs here);
* static groups: every group's grid is computed up front from W (after dead columns are zeroed),
  on the unpermuted columns, so act_order keeps the plain [N, K/G] layout.
act_order with dynamic groups would scatter a group's columns over K (it needs a g_idx), so it is
refused; use static_groups with act_order.

Grids: `reference_grid=False` (default) uses the core's grids from the QuantSpec (asymmetric: the
reference's exactly; symmetric: codes -qmax..qmax, step absmax/qmax). `reference_grid=True` keeps
the reference's quirks: symmetric codes -2^(b-1)..2^(b-1)-1 with step 2 absmax / (2^b - 1) (its
zero point (maxq+1)/2 on unsigned codes; compressed-tensors' symmetric grid too), and an all-zero
group gets the range [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.reference import int_codes
from fp8train.quant.scaling import group_range, int_grid
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class GptqOptions:
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    reference_grid: bool = False

    def __post_init__(self):
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"gptq.percdamp={self.percdamp} must be in [0, 1)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"gptq.block_size={self.block_size!r} must be a positive integer")


class HessianAccumulator:
    """H = 2/n sum_x x x^T over calibration sequences, updated as a running mean (FP32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        """inputs [B, T, K] or [T, K]; B sequences count as B samples (the reference's n)."""
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0)
        batch = inputs.shape[0]
        x = inputs.reshape(-1, inputs.shape[-1]).t()  # [K, tokens]
        self.hessian *= self.count / (self.count + batch)
        self.count += batch
        x = math.sqrt(2 / self.count) * x.float()
        self.hessian += x @ x.t()


class _Grid:
    """Step / zero point of one group of columns under the chosen convention."""

    def __init__(self, spec: QuantSpec, reference_grid: bool):
        if spec.fmt.is_float:
            raise ValueError(f"GPTQ quantizes to integer grids; got {spec.describe()} (use RTN for FP8)")
        self.fmt, self.symmetric, self.reference = spec.fmt, spec.symmetric, reference_grid
        self.full_range = reference_grid and spec.symmetric

    def __call__(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = group_range(cols, Granularity.row())  # [N, 1] each, widened to include 0
        if not self.reference:
            return int_grid(lo, hi, self.fmt, self.symmetric)
        if self.symmetric:
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        empty = (lo == 0) & (hi == 0)
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        levels = 2 ** self.fmt.bits - 1
        step = torch.div(hi - lo, torch.full_like(hi, float(levels)))
        if self.symmetric:  # reference codes q - (maxq + 1) / 2, as signed codes without a zero point
            return step, None
        return step, torch.round(torch.div(-lo, step))

    def codes(self, w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return int_codes(w, step, zero, self.fmt, symmetric_clip=not self.full_range)

    @staticmethod
    def decode(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        q = codes.float() if zero is None else codes.float() - zero
        return q * step


@dataclass
class GptqResult:
    quantized: QuantizedTensor
    loss: float  # sum (w - q)^2 / U_ii^2 / 2, the reference's "error"


def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, options: GptqOptions):
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    return dead


def _cholesky_upper_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    damp = percdamp * torch.mean(torch.diag(hessian))
    idx = torch.arange(hessian.shape[0], device=hessian.device)
    hessian[idx, idx] += damp
    try:
        factor = torch.linalg.cholesky(hessian)
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite ({error}); raise "
                         f"gptq.percdamp (now {percdamp}) or calibrate on more samples") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  options: GptqOptions = GptqOptions()) -> GptqResult:
    """Quantize W [N, K] with its input Hessian H [K, K]; neither input is modified."""
    grid_kind = spec.grid.kind
    if grid_kind not in (GranularityKind.ROW, GranularityKind.TILE):
        raise ValueError(f"GPTQ supports per-channel (row) or 1xG tile grids, got {spec.describe()}")
    group = spec.group_size if grid_kind is GranularityKind.TILE else 0
    if options.act_order and group and not options.static_groups:
        raise ValueError("gptq.act_order with group-wise grids needs gptq.static_groups=true "
                         "(dynamic groups under act order scatter a group over K and need a g_idx)")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference turns TF32 off
    try:
        return _gptq(weight.detach().float().clone(), hessian.detach().float().clone(), spec, options, group)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, options: GptqOptions, group: int) -> GptqResult:
    rows, columns = W.shape
    grid = _Grid(spec, options.reference_grid)
    row_grid = grid(W) if not group else None  # per-channel grid from W before anything else
    _inverse_hessian_factor(H, W, options)
    static = [grid(W[:, j:j + group]) for j in range(0, columns, group)] if group and options.static_groups else None
    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _cholesky_upper_inverse(H, options.percdamp)

    codes = torch.zeros(rows, columns, dtype=spec.fmt.dtype, device=W.device)
    group_grids: dict[int, tuple] = {}
    losses = torch.zeros(rows, device=W.device)
    current = row_grid
    for i1 in range(0, columns, options.block_size):
        i2 = min(i1 + options.block_size, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group:
                if static is not None:
                    current = static[(int(perm[col]) if perm is not None else col) // group]
                elif col % group == 0:
                    current = grid(W[:, col:col + group])  # the running W, as the reference
                    group_grids[col // group] = current
            w, d = W1[:, i], Hinv1[i, i]
            q_codes = grid.codes(w.unsqueeze(1), *current)
            q = grid.decode(q_codes, *current).flatten()
            codes[:, col] = q_codes.flatten()
            losses += (w - q) ** 2 / d ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GptqResult(_assemble(codes, spec, row_grid, static or [group_grids[j] for j in sorted(group_grids)]),
                      float(losses.sum()))


def _assemble(codes: torch.Tensor, spec: QuantSpec, row_grid, group_grids: list) -> QuantizedTensor:
    """Codes plus their steps (and zero points) in the core's layout: [N, 1] or [N, K/G]."""
    grids = [row_grid] if row_grid is not None else group_grids
    step = torch.cat([g[0] for g in grids], dim=1)
    zero = None if grids[0][1] is None else torch.cat([g[1] for g in grids], dim=1).to(spec.fmt.dtype)
    return QuantizedTensor(codes.contiguous(), step.contiguous(), spec.grid, spec.fmt, zero)
