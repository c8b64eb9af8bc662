"""Pure-torch references of the grouped FP8 GEMMs: a loop over experts, dequantize, FP32 matmul.

The numerics the Triton kernels implement (kernels/grouped_gemm.py), written plainly:

    tensorwise  out_rows = (A_rows.float() @ B.float()^T) * (sa * sb)   one FP32 product per group,
                                                                         the decode factors last
    blockwise   acc = 0; for every 128-wide chunk c of the contraction, in order:
                    acc += (A_c.float() @ B_c.float()^T) * (sa_c[:, None] * sb_c[None, :])
                (DeepSeek-V3's promotion: each chunk's partial sum is scaled into FP32)

then one rounding to out_dtype. Rows no group owns (past offs[-1]) and experts without tokens are
zeros. A kernel may add the same FP32 terms in another order (and on Hopper, fast accumulation
keeps fewer bits inside a chunk), so tests compare with tolerances, or exactly on data whose every
partial sum is exact in FP32.

These functions read the group offsets on the host (one sync): they are the test oracle and the
fallback where Triton cannot run, not a fast path.
"""

from __future__ import annotations

import torch

from fp8train.quant.schemes import BLOCK


def group_bounds(offs: torch.Tensor, total: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[(start, end)] per group from the END offsets; ValueError unless 0 <= offs[0] <= ... <= total
    and every offset is a multiple of `multiple`."""
    ends = [int(v) for v in offs.tolist()]
    bounds, start = [], 0
    for e, end in enumerate(ends):
        if end < start or end > total:
            raise ValueError(f"offs must be non-decreasing group end rows within [0, {total}]; "
                             f"offs[{e}]={end} after {start}")
        if end % multiple:
            raise ValueError(f"offs[{e}]={end} is not a multiple of {multiple} (blockwise token tiles "
                             f"must not straddle two experts: pad every group to {multiple})")
        bounds.append((start, end))
        start = end
    return bounds


def _expand_blocks(sb_e: torch.Tensor, n: int) -> torch.Tensor:
    """[N/128, K/128] block scales -> [N, K/128] (each block row repeated over its 128 rows)."""
    return sb_e.repeat_interleave(BLOCK, dim=0)[:n]


def _promoted_sum(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """sum over 128-chunks c of (a_c @ b_c^T) * (sa[:, c] x sb[:, c]), in FP32, chunk order.
    a [M, C], b [N, C] FP8; sa [M, C/128], sb [N, C/128] FP32."""
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for c in range(a.shape[1] // BLOCK):
        cols = slice(c * BLOCK, (c + 1) * BLOCK)
        partial = a[:, cols].float() @ b[:, cols].float().t()
        acc = acc + partial * (sa[:, c, None] * sb[None, :, c])
    return acc


def experts_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    """out [T, N]: rows of group e = (a_e @ b[e]^T) * (sa * sb[e]); sb [E] or [1]."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    sb = b_scale_inv.reshape(-1).float().expand(b.shape[0])
    for e, (start, end) in enumerate(group_bounds(offs, a.shape[0])):
        if end > start:
            out[start:end] = (a[start:end].float() @ b[e].float().t()) * (a_scale_inv.reshape(()).float() * sb[e])
    return out.to(out_dtype)


def experts_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    """out [T, N]; sa [T, K/128] (1x128 tiles of a), sb [E, N/128, K/128] (128x128 blocks of b)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for e, (start, end) in enumerate(group_bounds(offs, a.shape[0])):
        if end > start:
            out[start:end] = _promoted_sum(a[start:end], b[e], a_scale_inv[start:end].float(),
                                           _expand_blocks(b_scale_inv[e].float(), b.shape[1]))
    return out.to(out_dtype)


def tokens_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    """out [E, M, N]: out[e] = (a[:, tokens e] @ b[:, tokens e]^T) * (sa * sb); zeros if no tokens."""
    bounds = group_bounds(offs, a.shape[1])
    out = torch.zeros(len(bounds), a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    scale = a_scale_inv.reshape(()).float() * b_scale_inv.reshape(()).float()
    for e, (start, end) in enumerate(bounds):
        if end > start:
            out[e] = (a[:, start:end].float() @ b[:, start:end].float().t()) * scale
    return out.to(out_dtype)


def tokens_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    """out [E, M, N]; sa [M, T/128], sb [N, T/128] (1x128 tiles along tokens); offs multiples of 128."""
    bounds = group_bounds(offs, a.shape[1], multiple=BLOCK)
    out = torch.zeros(len(bounds), a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for e, (start, end) in enumerate(bounds):
        if end > start:
            tiles = slice(start // BLOCK, end // BLOCK)
            out[e] = _promoted_sum(a[:, start:end], b[:, start:end], a_scale_inv[:, tiles].float(),
                                   b_scale_inv[:, tiles].float())
    return out.to(out_dtype)
