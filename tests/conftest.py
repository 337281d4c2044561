"""Test set-up: Triton's interpreter when there is no GPU, a seed per test, and the `gpu` marker.

`TRITON_INTERPRET` must be set before anything imports triton, so it is decided here, first.
"""

import os
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


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
    settings.register_profile("ci", max_examples=150, **common)
    settings.register_profile("thorough", max_examples=3000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
