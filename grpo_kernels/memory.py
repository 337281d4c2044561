"""A byte meter: the peak of memory allocated inside a block, beyond what was live when it began.

On CUDA it reads the caching allocator's statistics. On CPU, where PyTorch keeps none, it watches every tensor an op
creates inside the block (a `TorchDispatchMode`) and counts each new storage until it is freed, so the number is exact
for PyTorch allocations. Benchmarks and tests use it; so can users who want to know what a call costs.

    with MemoryMeter() as meter:
        loss = fused_loss(...); loss.backward()
    print(meter.peak_bytes)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an argument's storage: not an allocation
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.live and key not in given:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class MemoryMeter:
    """Context manager measuring `peak_bytes`: the most memory allocated at once inside the block on top of what was
    allocated when it began, and `end_bytes`: what the block left allocated (e.g. gradients).

    Args:
        device: "cpu" (a dispatch-mode counter; backward passes are seen when they run on this thread, as CPU autograd
            does) or a CUDA device (the allocator's peak statistics, which also see the autograd threads).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
        else:
            self._counter.__exit__(*exc)
            self.peak_bytes = self._counter.peak
            self.end_bytes = self._counter.current
