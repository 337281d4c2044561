"""Gradients formed ahead of the backward, multiplied in place by the incoming gradient: `x <- x * s`.

The single-pass fused linear loss forms its gradients in the forward, and its backward only scales them by the loss's
incoming gradient `s`, a 0-dim tensor on the device. The kernel reads `s` where it runs, so the host never waits for
it, and when `s` is 1 (a plain `loss.backward()`) its loop over the tensor's blocks is empty: no bytes move, where a
multiply would read and write all of `d_weight` (2 GiB for a bf16 131,072 x 4,096 head), and the launch has a few
programs per multiprocessor, each taking blocks a grid apart, not one per block. Otherwise each element is multiplied
in the wider of its dtype and `s`'s (fp32 for 16-bit gradients) and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops._common import interpreting, multiprocessors, num_warps_for, row_block


@triton.jit
def _scale_kernel(
    x_ptr,  # [n], contiguous, scaled in place
    scale_ptr,  # [] the multiplier
    n,
    BLOCK: tl.constexpr,
):
    s = tl.load(scale_ptr)
    end = tl.where(s != 1.0, n, 0).to(tl.int64)  # a multiplier of 1 reads and writes nothing
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, end, step):  # blocks a grid apart
        offs = start + tl.arange(0, BLOCK)
        live = offs < n
        x = tl.load(x_ptr + offs, mask=live)
        tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=live)


def _programs(device: torch.device) -> int:
    """Programs per launch: a few per multiprocessor on a GPU, each taking blocks a grid apart, so that a multiplier
    of 1 costs one short launch however large the tensor; one in the interpreter."""
    if interpreting() or device.type != "cuda":
        return 1
    return 4 * multiprocessors(device)


def scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """Multiply each of `tensors` in place by the 0-dim `scale` (on their device), in one launch per tensor.

    Args:
        tensors: contiguous floating-point tensors on `scale`'s device.
        scale: a 0-dim floating-point tensor.
    """
    if scale.dim() != 0 or not scale.is_floating_point():
        raise ValueError(f"scale must be a 0-dim floating-point tensor; got shape {tuple(scale.shape)}, {scale.dtype}")
    for i, x in enumerate(tensors):  # all checked before any is scaled
        if x.device != scale.device or not x.is_floating_point() or not x.is_contiguous():
            raise ValueError(
                f"tensors[{i}] must be a contiguous floating-point tensor on {scale.device}; got {x.dtype} on "
                f"{x.device}, contiguous={x.is_contiguous()}"
            )
    for x in tensors:
        n = x.numel()
        if n == 0:
            continue
        block = row_block(n)
        grid = min(triton.cdiv(n, block), _programs(x.device))
        _scale_kernel[(grid,)](x, scale, n, BLOCK=block, num_warps=num_warps_for(block))
