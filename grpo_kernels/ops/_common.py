"""Launch settings shared by the kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (`TRITON_INTERPRET=1`), e.g. on a machine without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_block(n: int) -> int:
    """Block width for a kernel that streams rows of length `n`: 4,096 on a GPU, wider in the interpreter, where each
    block costs a round of Python."""
    cap = 1 << 16 if interpreting() else 4096
    return max(16, min(triton.next_power_of_2(n), cap))


def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (SMs), for grids sized to fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


def math_options(dtype: torch.dtype) -> dict:
    """Launch options of a kernel on inputs of `dtype`. fp32 (and fp64) inputs on a GPU get `PRECISE` (libdevice's
    `exp` and round-to-nearest division instead of the hardware approximations) and no fused multiply-adds the code
    does not ask for: the compiler would otherwise fuse `z = x * inv_temperature` into `z - max`, so that the row
    maximum, taken over rounded `z`, no longer cancels its own unrounded product, and a logit gradient is 20 units in
    the last place off (the fused products are more exact, but not the same numbers). The interpreter's numpy math is
    precise either way."""
    if dtype in (torch.float32, torch.float64) and not interpreting():
        return {"PRECISE": True, "enable_fp_fusion": False}
    return {"PRECISE": False}


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    """`e^x`. Triton's own multiplies by log2(e), rounds, and takes the hardware's approximate 2^t: a relative error
    of about |x| units in the last place, which fp32 inputs notice; libdevice's is within 2 units (PRECISE)."""
    if PRECISE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def div(a, b, PRECISE: tl.constexpr):
    """`a / b`, rounded to nearest when PRECISE (Triton's `/` is the hardware's 2-ulp division)."""
    if PRECISE:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """`acc + a @ b` with fp32 accumulation; full fp32 products for fp32 inputs (IEEE; else TF32 for them)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
