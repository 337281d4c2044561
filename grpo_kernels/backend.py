"""Which implementation runs an op: the Triton kernels or the chunked PyTorch path.

`auto` (the default) runs Triton for CUDA tensors, and for CPU tensors when Triton's interpreter is on
(`TRITON_INTERPRET=1`); everything else runs the PyTorch path. `GRPO_KERNELS_BACKEND=torch|triton|auto` or the
`backend(...)` context manager override it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch

BACKENDS = ("auto", "triton", "torch")
_forced: ContextVar[str | None] = ContextVar("grpo_kernels_backend", default=None)
HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with `name` ("auto", "triton" or "torch")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run the Triton kernels."""
    name = _forced.get() or os.environ.get("GRPO_KERNELS_BACKEND") or "auto"  # set but empty: as if unset
    if name not in BACKENDS:
        raise ValueError(f"GRPO_KERNELS_BACKEND must be one of {BACKENDS}; got {name!r}")
    if name == "torch":
        return False
    runnable = HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and _interpreting()))
    if name == "triton" and not runnable:
        raise RuntimeError(
            f"the triton backend was requested for a {t.device.type} tensor, but "
            + ("triton is not installed" if not HAS_TRITON else "Triton runs CPU tensors only with TRITON_INTERPRET=1")
        )
    return runnable
