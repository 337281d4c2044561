"""Launch settings shared by the kernels."""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (`TRITON_INTERPRET=1`), e.g. on a machine without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_block(n: int) -> int:
    """Block width for a kernel that streams rows of length `n`: 4,096 on a GPU, wider in the interpreter, where each
    block costs a round of Python."""
    cap = 1 << 16 if interpreting() else 4096
    return max(16, min(triton.next_power_of_2(n), cap))


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4
