"""A chunk's share of the LM head's weight gradient added to it: `out += a.T @ b` (`[M, N] += [K, M].T @ [K, N]`).

In the single-pass schedule each chunk of c tokens adds `dz.T @ hidden` to the whole `d_weight` (`[V, H]`): a product
over a short inner dimension (c = 240 at a 60 MiB budget) whose output is read and written once per chunk, 2 GiB for a
bf16 131,072 x 4,096 head against 0.26 TFLOP of arithmetic. cuBLAS's `addmm_` did not overlap the two on an H200
(0.92 ms a 240-token chunk, against 0.54 ms when it only writes the product, `benchmarks/chunk_products.py`). Here
each program loads its tile of `out` before the products, so that its latency hides under them, and its tiles are
small enough for two programs a multiprocessor, so that one's loads and stores overlap the other's products. The sum
over the inner dimension is in fp32, added to `out` in fp32 and rounded once, as `addmm_` rounds it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from grpo_kernels.ops import _common
from grpo_kernels.ops._common import dot


@triton.jit
def _tile_origin(tile, M, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The first row and column of `out`'s tile `tile`, as 64-bit offsets (the rest of a tile's are 32-bit offsets
    from them): GROUP_M consecutive row tiles share their turns, so that their columns of `a` stay in L2. A tile past
    the last gets a row past M (the persistent kernel's look-ahead)."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows_in_group = tl.maximum(tl.minimum(tiles_m - first_m, GROUP_M), 1)
    row = (first_m + (tile % per_group) % rows_in_group).to(tl.int64) * BLOCK_M
    col = ((tile % per_group) // rows_in_group).to(tl.int64) * BLOCK_N
    row = tl.where(tile < tiles_m * tiles_n, row, M + 0 * row)
    return row, col


@triton.jit
def _tile_products(a_ptr, b_ptr, row, col, M, N, K, stride_ak, stride_bk, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """`a[:, tile rows].T @ b[:, tile columns]` of the tile at (`row`, `col`), summed over K in fp32."""
    im, in_, ik = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    in_m, in_n = im < M - row, in_ < N - col
    a_ptrs = a_ptr + row + ik[None, :] * stride_ak + im[:, None]  # [BLOCK_M, BLOCK_K]: a tile of a.T
    b_ptrs = b_ptr + col + ik[:, None] * stride_bk + in_[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        in_k = ik < K - k
        a = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = dot(a, b, acc, IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _weight_grad_kernel(
    out_ptr,  # [M, N], rows stride_om apart, columns contiguous
    a_ptr,  # [K, M], rows stride_ak apart, columns contiguous
    b_ptr,  # [K, N], rows stride_bk apart, columns contiguous
    M,
    N,
    K,
    stride_om,
    stride_ak,
    stride_bk,
    ACCUMULATE: tl.constexpr,  # add to `out` (else write it)
    IEEE: tl.constexpr,  # fp32 inputs: full-precision products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row, col = _tile_origin(tl.program_id(0), M, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), BLOCK_M, BLOCK_N, GROUP_M)
    im, in_ = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + row * stride_om + col + im[:, None] * stride_om + in_[None, :]
    live = (im < M - row)[:, None] & (in_ < N - col)[None, :]
    if ACCUMULATE:
        before = tl.load(out_ptrs, mask=live, other=0.0)  # before the products: its latency hides under them
    acc = _tile_products(a_ptr, b_ptr, row, col, M, N, K, stride_ak, stride_bk, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if ACCUMULATE:
        acc += before.to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _weight_grad_persistent_kernel(
    out_ptr,
    a_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_om,
    stride_ak,
    stride_bk,
    PROGRAMS,  # programs in the grid: each takes every PROGRAMS-th tile
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """`_weight_grad_kernel` with a grid of a few programs per multiprocessor, each taking tile after tile. Either it
    loads the next tile of `out` before the current tile's products, so that the loads of `out` stream under the
    arithmetic across tiles, not only within one; or (FLATTEN) its loops are flattened (tl.range's `flatten`), so
    that the compiler's pipelining of the products' loads runs across tiles, each tile's `out` loaded at its start."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    im, in_ = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    rows, cols = im[:, None] * stride_om, in_[None, :]
    row, col = _tile_origin(pid, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
    before = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    if ACCUMULATE and not FLATTEN:  # the first tile's `out`; each turn loads the next one's
        live = (im < M - row)[:, None] & (in_ < N - col)[None, :]
        before = tl.load(out_ptr + row * stride_om + col + rows + cols, mask=live, other=0.0)
    for tile in tl.range(pid, tiles_m * tiles_n, PROGRAMS, flatten=FLATTEN):
        if FLATTEN:
            row, col = _tile_origin(tile, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        live = (im < M - row)[:, None] & (in_ < N - col)[None, :]
        if ACCUMULATE:
            if FLATTEN:
                before = tl.load(out_ptr + row * stride_om + col + rows + cols, mask=live, other=0.0)
            else:
                next_row, next_col = _tile_origin(tile + PROGRAMS, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
                next_live = (im < M - next_row)[:, None] & (in_ < N - next_col)[None, :]
                after = tl.load(out_ptr + next_row * stride_om + next_col + rows + cols, mask=next_live, other=0.0)
        acc = _tile_products(a_ptr, b_ptr, row, col, M, N, K, stride_ak, stride_bk, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        if ACCUMULATE:
            acc += before.to(tl.float32)
        tl.store(out_ptr + row * stride_om + col + rows + cols, acc.to(out_ptr.dtype.element_ty), mask=live)
        if not FLATTEN:
            row, col = _tile_origin(tile + PROGRAMS, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            if ACCUMULATE:
                before = after


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # 0: one program per tile of `out` (`_weight_grad_kernel`); k: k programs per multiprocessor, each taking tile
    # after tile and loading the next one's `out` ahead (`_weight_grad_persistent_kernel`)
    per_sm: int = 0
    flatten: bool = False  # the persistent kernel's loops flattened, for the compiler's pipelining across tiles


# On the H200 these took 1.27 ms for a 240-token chunk against cuBLAS's 0.905 (`benchmarks/results/h200/
# scratch-borrow/chunk-products/`; `chunk_products --add-tiles` tries others). Built with triton 3.9
# (`benchmarks/kernel_resources.py`, aligned extents), 16-bit inputs: 128 x 64 tiles in 4 warps hold their fp32 sums
# and the tile of `out` in 188 registers on sm_90 (254 on sm_89), no spills, 72 KiB of shared memory in three stages:
# two programs a multiprocessor (128 x 128 in 8 warps: 166 registers, 96 KiB, one). fp32 inputs: 64 x 64 tiles, three
# programs.
TILES = {"low": Tiles(128, 64, 64, 4, 3), "fp32": Tiles(64, 64, 32, 4, 3)}
GROUP_M = 8
# The persistent kernel's "multiprocessors" in Triton's interpreter (no GPU): a few, so that programs take turns
INTERPRETER_PROGRAMS = 3


def add_weight_grad(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True,
                    tiles: Tiles | None = None) -> torch.Tensor:  # fmt: skip
    """`out += a.T @ b` (or `out = a.T @ b` without `accumulate`), summed in fp32 and rounded once into `out`.

    Args:
        out: `[M, N]` (a chunk's rows of `d_weight`), columns contiguous.
        a: `[K, M]` (the chunk's logits gradient), columns contiguous.
        b: `[K, N]` (the chunk's hidden rows), columns contiguous.
        accumulate: add to `out`; else `out` is only written.
        tiles: the launch configuration; by default `TILES`' for the dtype (the tuner in
            `benchmarks/chunk_products.py` tries others).

    Returns:
        `out`.
    """
    if a.dim() != 2 or b.dim() != 2 or out.dim() != 2:
        raise ValueError(f"out, a and b must be 2-D; got {out.dim()}, {a.dim()} and {b.dim()} dimensions")
    (K, M), N = a.shape, b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"out must be [M, N] = a.T @ b: a is {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"out {tuple(out.shape)}")  # fmt: skip
    if not (a.dtype == b.dtype == out.dtype) or out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out, a and b must share one of fp16, bf16, fp32; got {out.dtype}, {a.dtype}, {b.dtype}")
    if not (a.device == b.device == out.device):
        raise ValueError(f"out, a and b must be on one device; got {out.device}, {a.device}, {b.device}")
    for name, t in (("out", out), ("a", a), ("b", b)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous columns (stride 1); got strides {t.stride()}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out if accumulate else out.zero_()
    tiles = TILES["fp32" if out.dtype == torch.float32 else "low"] if tiles is None else tiles
    count = triton.cdiv(M, tiles.block_m) * triton.cdiv(N, tiles.block_n)
    options = dict(ACCUMULATE=accumulate, IEEE=out.dtype == torch.float32, BLOCK_M=tiles.block_m,
                   BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=GROUP_M, num_warps=tiles.num_warps,
                   num_stages=tiles.num_stages)  # fmt: skip
    args = (out, a, b, M, N, K, out.stride(0), a.stride(0), b.stride(0))
    if tiles.per_sm:
        sms = INTERPRETER_PROGRAMS if _common.interpreting() else _common.multiprocessors(out.device)
        programs = min(count, tiles.per_sm * sms)
        _weight_grad_persistent_kernel[(programs,)](*args, programs, FLATTEN=tiles.flatten, **options)
    else:
        _weight_grad_kernel[(count,)](*args, **options)
    return out
