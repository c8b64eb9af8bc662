"""kernels.gather_rows (MoE dispatch of FP8 codes, rows plus transposed copy in one launch) against
the torch fallback, byte for byte: the interpreter on CPU, the compiled kernel on a GPU. The
transposed copy ragged (zeros at the end) or in the padded expert layout (`col_rows`: every
expert's tokens on 128-aligned columns, zeros between), with or without the gather."""

import pytest
import torch

import kernels
import kernels.library  # noqa: F401 (registers torch.ops.fp8train.*)
from kernels import fallback
from kernels.permute import gather_rows as triton_gather_rows


def random_codes(rows: int, cols: int, dtype, device, stride: int | None = None) -> torch.Tensor:
    """Random bytes viewed as FP8 (NaN patterns included: a byte move must not care)."""
    gen = torch.Generator().manual_seed(rows * 131 + cols)
    width = stride or cols
    raw = torch.randint(0, 256, (rows, width), generator=gen, dtype=torch.uint8).to(device)
    return raw[:, :cols].view(dtype)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("n, k, t, cols", [(50, 128, 100, 112), (7, 200, 33, 48), (64, 256, 64, 64),
                                           (9, 130, 20, 0), (5, 64, 0, 16)])
def test_gather_rows_matches_the_fallback_byte_for_byte(device, dtype, n, k, t, cols):
    data = random_codes(n, k, dtype, device)
    index = torch.randint(0, n, (t,), generator=torch.Generator().manual_seed(t)).to(device)
    rows, rows_t = triton_gather_rows(data, index, cols)
    want_rows, want_t = fallback.gather_rows(data, index, cols)
    assert rows.dtype == dtype and torch.equal(rows.view(torch.uint8), want_rows.view(torch.uint8))
    assert rows_t.shape == want_t.shape and torch.equal(rows_t.view(torch.uint8), want_t.view(torch.uint8))
    if cols:
        assert torch.count_nonzero(rows_t.view(torch.uint8)[:, t:]) == 0  # zeros past the gathered rows


def padded_col_rows(sizes: list[int], align: int = 128) -> torch.Tensor:
    """The padded layout's column -> row map (grouped_layout.padded_groups' row_of), by hand."""
    cols, start = [], 0
    for size in sizes:
        cols += list(range(start, start + size)) + [-1] * (-size % align)
        start += size
    bound = -(-(sum(sizes) + len(sizes) * (align - 1)) // align) * align
    return torch.tensor(cols + [-1] * (bound - len(cols)), dtype=torch.int64)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("sizes", [[0, 3, 130, 1], [128, 0]])
def test_padded_token_major_copy_matches_the_fallback(device, gather, sizes):
    t = sum(sizes)
    data = random_codes(t + 5, 96, torch.float8_e5m2, device)
    index = torch.randperm(t + 5, generator=torch.Generator().manual_seed(t))[:t].to(device) if gather else None
    col_rows = padded_col_rows(sizes).to(device)
    rows, rows_t = kernels.gather_rows(data if gather else data[:t], index, col_rows.shape[0], col_rows)
    want_rows, want_t = fallback.gather_rows(data if gather else data[:t], index, col_rows.shape[0], col_rows)
    assert torch.equal(rows_t.view(torch.uint8), want_t.view(torch.uint8))
    assert torch.equal(rows.view(torch.uint8), want_rows.view(torch.uint8))
    source = (data.view(torch.uint8)[index] if gather else data.view(torch.uint8)[:t]).cpu()
    real = col_rows.cpu() >= 0
    assert torch.equal(want_t.view(torch.uint8).cpu()[:, real], source[col_rows.cpu()[real]].t())
    assert torch.count_nonzero(want_t.view(torch.uint8).cpu()[:, ~real]) == 0  # zero tokens in the gaps
    assert rows.shape == ((t, 96) if gather else (0,))


def test_strided_source_rows(device):
    data = random_codes(40, 96, torch.float8_e4m3fn, device, stride=160)  # row stride > K
    index = torch.arange(39, -1, -1, device=device)
    rows, rows_t = kernels.gather_rows(data, index, 48)
    assert torch.equal(rows.view(torch.uint8), data.view(torch.uint8).flip(0))
    assert torch.equal(rows_t.view(torch.uint8)[:, :40], data.view(torch.uint8).flip(0).t())


def test_bad_arguments_name_the_fix():
    data = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="int64"):
        kernels.gather_rows(data, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cols=2 must be 0"):
        kernels.gather_rows(data, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="1-byte"):
        kernels.gather_rows(torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="one source row per column"):
        kernels.gather_rows(data, None, 8, torch.zeros(6, dtype=torch.int64))


def test_custom_operator_passes_opcheck(device):
    data = random_codes(12, 64, torch.float8_e4m3fn, device)
    index = torch.tensor([3, 0, 11, 3, 5], device=device)
    checks = ("test_faketensor", "test_autograd_registration")  # the schema test does FP8 arithmetic
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, index, 16), test_utils=checks)
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, index, 0), test_utils=checks)
    col_rows = torch.tensor([1, -1, 0, 4, -1, 2, 3, -1], device=device)
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, index, 8, col_rows), test_utils=checks)
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, None, 8, col_rows), test_utils=checks)
