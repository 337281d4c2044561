"""The suite's cases through pytest-benchmark, for those who track regressions with it: `pytest benchmarks/`.

Tiny shapes, every provider and mode of each op, grouped by op and mode so that providers sit side by side (add
`--benchmark-autosave` / `--benchmark-compare` as usual). Providers that cannot run here are skipped with the reason.
Each benchmark also records the peak memory beyond its inputs in `extra_info["peak_mib"]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.providers import OP_MODES, PROVIDERS, Case, Provider, make_inputs
from benchmarks.runner import MIB, peak_bytes, steps


def tiny_case(op: str, device: str) -> Case:
    dtype = "bfloat16" if device == "cuda" else "float32"
    if op in ("fused_linear", "linear_logprobs"):
        return Case(op, 2, 128, 256, 4096, dtype, device)
    if op == "loss_from_logits":
        return Case(op, 2, 128, None, 4096, dtype, device)
    return Case(op, 4096, 1, None, None, "float32", device)


@pytest.mark.parametrize(
    ("provider", "mode"),
    [(p, m) for p in PROVIDERS for m in OP_MODES[p.op]],
    ids=lambda x: x if isinstance(x, str) else f"{x.op}-{x.name}",
)
def test_bench(benchmark, provider: Provider, mode: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason}")
    case = tiny_case(provider.op, device)
    bound = provider.bind(case, make_inputs(case))
    if bound.backward is None and mode != "forward":
        pytest.skip(f"{provider.name} has no backward for {provider.op}")
    setup, run = steps(bound, mode)

    def prepare() -> tuple[tuple, dict]:
        for g in bound.grads:
            g.grad = None
        return (setup() if setup else None,), {}

    def timed(state) -> None:
        run(state)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{provider.op} {mode}"
    benchmark.extra_info["peak_mib"] = peak_bytes(bound, mode, device)[0] / MIB
    benchmark.pedantic(timed, setup=prepare, rounds=5, warmup_rounds=1)
