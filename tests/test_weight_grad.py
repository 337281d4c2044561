"""`ops.weight_grad.add_weight_grad` (a chunk's share of `d_weight`, `out += a.T @ b`) against PyTorch's `addmm_` at
the same dtype and in fp64."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_pytorch_error

from grpo_kernels import reference
from grpo_kernels.ops.weight_grad import Tiles, add_weight_grad

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)]


# the launch configurations under test: the default's, and the persistent kernel's with small tiles (many tiles a
# program, the grid smaller than the tiles), with large ones (fewer tiles than programs), and with its loops flattened
PERSISTENT = {
    "small": Tiles(32, 16, 16, 4, 2, per_sm=2),
    "large": Tiles(128, 64, 32, 4, 3, per_sm=2),
    "flat": Tiles(32, 16, 16, 4, 2, per_sm=2, flatten=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize(
    ("M", "N", "K", "row_pad"),
    [
        (131, 24, 7, 0),
        (200, 129, 65, 0),
        (64, 64, 1, 0),
        (1000, 17, 240, 0),
        (257, 96, 33, 63),
        (1, 40, 5, 0),
        (70, 1, 9, 0),
    ],
)
@pytest.mark.parametrize("tiles", [None, *PERSISTENT], ids=lambda t: t or "default")
def test_matches_addmm(M, N, K, row_pad, accumulate, dtype, tiles, device):
    """Odd extents on every side, an extent of one on each, and `a` as a view of rows padded past M (as a chunk's
    logits are), by the default kernel and the persistent one: the error against fp64 within twice PyTorch's own at
    the same dtype."""
    out0 = torch.randn(M, N).to(dtype)
    a = (torch.randn(K, M + row_pad) * 0.1).to(dtype).to(device)[:, :M]
    b = torch.randn(K, N).to(dtype).to(device)
    got = add_weight_grad(out0.clone().to(device), a, b, accumulate, None if tiles is None else PERSISTENT[tiles])
    same = reference.add_weight_grad(out0.clone().to(device), a, b, accumulate)
    exact = reference.add_weight_grad(out0.double(), a.double().cpu(), b.double().cpu(), accumulate)
    assert got.dtype == dtype
    assert_within_pytorch_error(got, same, exact, name="out")


def test_an_empty_inner_dimension_adds_nothing(device):
    out = torch.randn(5, 3, device=device)
    a, b = torch.empty(0, 5, device=device), torch.empty(0, 3, device=device)
    assert torch.equal(add_weight_grad(out.clone(), a, b), out)
    assert torch.equal(add_weight_grad(out.clone(), a, b, accumulate=False), torch.zeros_like(out))


@pytest.mark.parametrize(
    ("out", "a", "b", "message"),
    [
        ((4, 3), (2, 4), (2, 5), r"out must be \[M, N\] = a.T @ b"),
        ((4, 3), (2, 4), (3, 3), r"out must be \[M, N\] = a.T @ b"),
        ((4, 3), (2, 4, 1), (2, 3), "must be 2-D"),
    ],
)
def test_bad_shapes_fail_clearly(out, a, b, message):
    with pytest.raises(ValueError, match=message):
        add_weight_grad(torch.zeros(out), torch.zeros(a), torch.zeros(b))


def test_bad_dtypes_and_layouts_fail_clearly():
    out, a, b = torch.zeros(4, 3), torch.zeros(2, 4), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must share one of fp16, bf16, fp32"):
        add_weight_grad(out, a.double(), b)
    with pytest.raises(ValueError, match="must share one of fp16, bf16, fp32"):
        add_weight_grad(out.double(), a.double(), b.double())
    with pytest.raises(ValueError, match="a must have contiguous columns"):
        add_weight_grad(out, torch.zeros(4, 2).t(), b)
