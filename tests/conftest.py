"""Test set-up: Triton's interpreter when there is no GPU, a seed per test, and the `gpu` marker.

`TRITON_INTERPRET` must be set before anything imports triton, so it is decided here, first.
"""

import os
import time
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

# A wall-clock deadline (seconds since the epoch) after which the remaining tests are skipped with that reason, so
# that a time-boxed run (the GPU script) still ends with its summary of failures.
_DEADLINE = float(os.environ.get("GRPO_KERNELS_TEST_DEADLINE", "inf"))


def pytest_runtest_setup(item):
    if not torch.cuda.is_available():
        if item.get_closest_marker("gpu"):
            pytest.skip("needs a CUDA device")
        params = getattr(item, "callspec", None)
        impl = str(params.params.get("impl", "")) if params else ""
        if item.get_closest_marker("bf16") and impl == "triton-fused":
            pytest.skip("Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot): needs a CUDA device")
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
