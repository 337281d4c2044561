"""A byte meter: the peak of memory allocated inside a block, beyond what was live when it began.

On CUDA it reads the caching allocator's statistics. On CPU, where PyTorch keeps none, it watches every tensor an op
creates inside the block (a `TorchDispatchMode`) and counts each new storage until it is freed, so the number is exact
for PyTorch allocations. Benchmarks and tests use it; so can users who want to know what a call costs.

    with MemoryMeter() as meter:
        loss = fused_loss(...); loss.backward()
    print(meter.peak_bytes)

`MemoryMeter(detail=True)` also says where the memory live at the peak was allocated (`peak_detail`: bytes per line
of grpo_kernels, or of the caller when the allocation is not ours), from the CUDA allocator's recorded history or the
CPU counter's stacks.
"""

from __future__ import annotations

import inspect
import os
import traceback
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def where(frames: list[tuple[str, int, str]]) -> str:
    """`file:line (function)` of the innermost of `frames` (filename, line, function; innermost first) in
    grpo_kernels, else of the innermost Python frame outside PyTorch; "?" without frames."""
    ours = [f for f in frames if _ours(f[0])]
    outside = [f for f in frames if f[0].endswith(".py") and f"{os.sep}torch{os.sep}" not in os.path.abspath(f[0])]
    pick = (ours or outside or frames or [None])[0]
    if pick is None:
        return "?"
    path = os.path.abspath(pick[0])
    short = os.path.relpath(path, os.path.dirname(_PACKAGE)) if _ours(path) else os.path.basename(path)
    return f"{short}:{pick[1]} ({pick[2]})"


def _ours(path: str) -> bool:
    return os.path.abspath(path).startswith(_PACKAGE + os.sep)


def live_at_peak(events: list[dict]) -> tuple[int, list[tuple[int, str]]]:
    """Replay allocator events (`{"action": "alloc" | "free_completed", "addr", "size", "frames"}` in order; other
    actions ignored) and return the peak of bytes allocated and the blocks live at that peak, summed per `where` and
    largest first."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: dict[int, dict] = {}
    for e in events:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
            current += e["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif e.get("action") == "free_completed" and e["addr"] in live:
            current -= live.pop(e["addr"])["size"]
    # where each block live at the peak was allocated, worked out for those blocks only
    places = ((e["size"], where([(f["filename"], f["line"], f["name"]) for f in e.get("frames", [])]))
              for e in at_peak.values())  # fmt: skip
    return peak, _grouped(places)


def _grouped(blocks) -> list[tuple[int, str]]:
    total: Counter[str] = Counter()
    for size, place in blocks:
        total[place] += size
    return [(size, place) for place, size in total.most_common()]


class _StorageCounter(TorchDispatchMode):
    def __init__(self, detail: bool = False) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.detail = detail
        self.places: dict[int, str] = {}
        self.at_peak: dict[int, tuple[int, str]] = {}

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
                    if self.detail:
                        stack = traceback.extract_stack()[-2::-1]  # innermost first, this method left out
                        self.places[key] = where([(f.filename, f.lineno or 0, f.name) for f in stack])
                    if self.current > self.peak:
                        self.peak = self.current
                        if self.detail:
                            self.at_peak = {k: (n, self.places[k]) for k, n in self.live.items()}
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.places.pop(key, None)


class MemoryMeter:
    """Context manager measuring `peak_bytes`: the most memory allocated at once inside the block on top of what was
    allocated when it began, and `end_bytes`: what the block left allocated (e.g. gradients).

    Args:
        device: "cpu" (a dispatch-mode counter; backward passes are seen when they run on this thread, as CPU autograd
            does) or a CUDA device (the allocator's peak statistics, which also see the autograd threads).
        detail: also fill `peak_detail`, the memory live at the peak by where it was allocated (slower: it keeps a
            stack per allocation).
    """

    def __init__(self, device: str | torch.device = "cpu", detail: bool = False) -> None:
        self.device = torch.device(device)
        self.detail = detail
        self.peak_bytes = 0
        self.end_bytes = 0
        self.peak_detail: list[tuple[int, str]] = []  # (bytes, where) live at the peak, with `detail`

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self.detail:  # a history of this block alone (older PyTorch keeps what an earlier one recorded)
                record = torch.cuda.memory._record_memory_history
                fresh = {"clear_history": True} if "clear_history" in inspect.signature(record).parameters else {}
                record(stacks="python", max_entries=1_000_000, device=self.device, **fresh)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter = _StorageCounter(self.detail)
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
            if self.detail:
                snapshot = torch.cuda.memory._snapshot(self.device)
                torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self.peak_detail = live_at_peak(snapshot["device_traces"][index])[1]
        else:
            self._counter.__exit__(*exc)
            self.peak_bytes = self._counter.peak
            self.end_bytes = self._counter.current
            self.peak_detail = _grouped(self._counter.at_peak.values())
