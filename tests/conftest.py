"""Test set-up: Triton's interpreter when there is no GPU (with its bfloat16 made exact), a seed per test, and the
`gpu` marker.

`TRITON_INTERPRET` must be set before anything imports triton, so it is decided here, first.
"""

import os
import time
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest


def _interpreter_bfloat16() -> None:
    """Triton's interpreter keeps bfloat16 values as their raw 16 bits (numpy has no bfloat16): its `tl.dot`
    multiplies those bits as integers, and its float32 -> bfloat16 cast truncates where a GPU rounds to nearest even.
    Make both do what the GPU does (products of bfloat16 values summed in float32; round to nearest even), so that
    the bfloat16 kernels run, and are tested, on a CPU too."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_grpo_kernels_bf16", False):
        return
    dot, cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32, copy=True))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl, builder._grpo_kernels_bf16 = create_dot, cast_impl, True


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_bfloat16()

# A wall-clock deadline (seconds since the epoch) after which the remaining tests are skipped with that reason, so
# that a time-boxed run (the GPU script) still ends with its summary of failures.
_DEADLINE = float(os.environ.get("GRPO_KERNELS_TEST_DEADLINE", "inf"))


def pytest_runtest_setup(item):
    if not torch.cuda.is_available() and item.get_closest_marker("gpu"):
        pytest.skip("needs a CUDA device")
    if time.time() > _DEADLINE:
        pytest.skip("GRPO_KERNELS_TEST_DEADLINE passed")


def pytest_runtest_logreport(report):
    """With GRPO_KERNELS_TEST_FAILURES=FILE, each failure's id and traceback are appended to FILE as it happens, so
    that a run cut short by a time limit still says what failed."""
    path = os.environ.get("GRPO_KERNELS_TEST_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (from its id), so that a failure reproduces alone and in the full run."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> str:
    """The device the Triton kernels run on: cuda when present, else cpu (interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _hypothesis_profiles() -> None:
    """`ci` (the default): a few hundred examples per op; `--hypothesis-profile=thorough`: thousands."""
    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True}
    settings.register_profile("ci", max_examples=300, **common)
    settings.register_profile("thorough", max_examples=3000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
