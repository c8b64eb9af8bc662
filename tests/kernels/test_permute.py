"""kernels.gather_rows (MoE dispatch of FP8 codes, rows plus transposed copy in one launch) against
the torch fallback, byte for byte: the interpreter on CPU, the compiled kernel on a GPU."""

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


def test_custom_operator_passes_opcheck(device):
    data = random_codes(12, 64, torch.float8_e4m3fn, device)
    index = torch.tensor([3, 0, 11, 3, 5], device=device)
    checks = ("test_faketensor", "test_autograd_registration")  # the schema test does FP8 arithmetic
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, index, 16), test_utils=checks)
    torch.library.opcheck(torch.ops.fp8train.gather_rows.default, (data, index, 0), test_utils=checks)
