"""How the suite measures: times, peak memory, and the sweep that turns cases and providers into result rows.

Time and memory come from separate runs: the CPU byte meter watches every allocation and would slow the timed runs.

- CUDA: `triton.testing.do_bench` (L2 cleared before each run) for forward and forward+backward. A backward alone
  cannot be timed by `do_bench` (it needs a fresh forward each time), so it is timed with CUDA events around the
  backward of each of 5 to 100 runs, the forward outside the events. Memory: the allocator's peak.
- CPU: one warm-up and `repeats` timed runs with `time.perf_counter`. Memory: `MemoryMeter`'s exact count of
  PyTorch's allocations.

Medians and the 20% / 80% quantiles of the runs are reported; memory is the peak allocated beyond the inputs.

With a profile folder, one more run per row goes under `torch.profiler`: where the time goes, kernel by kernel on a
GPU (self device time) or op by op on a CPU (self CPU time), as a table in a file of its own and the top entries in
the row.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import grpo_kernels
from benchmarks.providers import LINEAR_OPS, MODES, OP_MODES, Bound, Case, Provider, make_inputs
from grpo_kernels.memory import MemoryMeter

MIB = 1 << 20
CUDA_MIN_RUNS = 5
PROFILE_TOP = 8  # entries of a profile kept in its row
VERSIONED = ("triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers")


def _reset(grads: Sequence[torch.Tensor]) -> None:
    for g in grads:
        g.grad = None


def steps(bound: Bound, mode: str) -> tuple[Callable[[], Any] | None, Callable[[Any], Any]]:
    """`(setup, run)` for `mode`: `setup` (untimed, may be None) makes what the timed `run` takes."""
    if mode == "forward":
        return None, lambda _: bound.forward()
    if mode == "backward":
        return bound.forward, bound.backward
    return None, lambda _: bound.backward(bound.forward())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(bound: Bound, mode: str, device: str, repeats: int) -> list[float]:
    """Milliseconds of each timed run of `mode` (see the module's docstring for how)."""
    setup, run = steps(bound, mode)

    def once() -> float:
        _reset(bound.grads)
        state = setup() if setup else None
        _sync(device)
        start = time.perf_counter()
        out = run(state)
        _sync(device)
        elapsed = (time.perf_counter() - start) * 1e3
        del out, state
        return elapsed

    once()  # warm-up: compilation, autotuning, first-touch of memory
    if device == "cpu":
        return [once() for _ in range(repeats)]
    estimate = once()
    if setup is None:
        import triton.testing

        rep = max(100.0, min(10 * estimate, 1500.0), CUDA_MIN_RUNS * estimate)
        return triton.testing.do_bench(lambda: run(None), rep=rep, grad_to_none=list(bound.grads), return_mode="all")
    return _time_backward_cuda(bound, setup, run, estimate)


def _time_backward_cuda(bound: Bound, setup: Callable[[], Any], run: Callable[[Any], Any], estimate: float) -> list:
    start = time.perf_counter()
    state = setup()
    torch.cuda.synchronize()
    with_setup = estimate + (time.perf_counter() - start) * 1e3
    del state
    runs = min(100, max(CUDA_MIN_RUNS, int(1000 / max(with_setup, 1e-3))))
    cache = torch.empty(256 * MIB, dtype=torch.int8, device="cuda")  # cleared before each run, as do_bench does
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for begin, end in events:
        _reset(bound.grads)
        state = setup()
        cache.zero_()
        begin.record()
        out = run(state)
        end.record()
        del out, state
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def peak_bytes(bound: Bound, mode: str, device: str, detail: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """Peak bytes allocated by one run of `mode` beyond what was allocated before it (the forward's saved tensors
    for a backward alone) and, with `detail`, where the memory live at the peak was allocated: the largest
    `PROFILE_TOP` places as `{"mib", "where"}` (see `MemoryMeter`)."""
    setup, run = steps(bound, mode)
    _reset(bound.grads)
    state = setup() if setup else None
    with MemoryMeter(device, detail=detail) as meter:
        out = run(state)
    del out, state
    _reset(bound.grads)
    return meter.peak_bytes, [{"mib": n / MIB, "where": w} for n, w in meter.peak_detail[:PROFILE_TOP]]


def busy_span(host: list[tuple[float, float]], device: list[tuple[float, float]]) -> dict[str, float] | None:
    """`{"span_ms", "device_busy_ms"}` of a profiled run from its events' `(start, end)` in microseconds: the span from
    the first host op's start to the last event's end, and the time within it when some device event (a kernel, a copy,
    a fill) ran, overlapping events counted once. None without device events. The span less the busy time is when
    the device waited: for the host to queue work, or for a host read."""
    if not device or not host:
        return None
    start = min(s for s, _ in host)
    end = max(e for _, e in [*host, *device])
    busy, reach = 0.0, start
    for s, e in sorted(device):
        s = max(s, reach)
        if e > s:
            busy += e - s
            reach = e
    return {"span_ms": (end - start) / 1e3, "device_busy_ms": busy / 1e3}


IDLE_STEP_US = 5.0  # idle_sources samples the device's idle time about this often...
IDLE_TOP = 10  # ...and names this many places
_OUR_FRAME = re.compile(r"grpo_kernels/(\S+\(\d+\): \S+)")  # a Python frame of the package, as the profiler names it
_ADDRESS = re.compile(r" (of \S+ object )?at 0x[0-9a-f]+")


def idle_sources(
    host: list[tuple[float, float, str]], device: list[tuple[float, float]], top: int = IDLE_TOP
) -> dict[str, list[dict[str, Any]]]:
    """Where the host was while the device waited, from a profiled run's host events `(start, end, name)` (ops,
    runtime calls and, with the profiler's `with_stack`, Python frames) and device events `(start, end)` in
    microseconds: the idle time between the first host event and the last event, sampled about every `IDLE_STEP_US`.
    `{"frames": [...], "ops": [...]}`: each sample credited to the innermost frame of grpo_kernels then running
    ("(none)" outside the package), and to the innermost event then under way, an op or runtime call ("(Python)" where
    the innermost is a Python frame: the code between ops); each as `{"where", "ms"}`, the largest `top` and the rest as
    one entry. Empty lists without device events."""
    if not device or not host:
        return {"frames": [], "ops": []}
    start = min(s for s, _, _ in host)
    end = max(max(e for _, e, _ in host), max(e for _, e in device))
    idle, reach = [], start
    for s, e in sorted(device):
        if s > reach:
            idle.append((reach, s))
        reach = max(reach, e)
    if end > reach:
        idle.append((reach, end))
    events = sorted(host, key=lambda x: (x[0], -x[1]))  # an enclosing event before those it encloses
    frames: dict[str, float] = {}
    ops: dict[str, float] = {}
    active: list[tuple[float, float, str]] = []
    i = 0
    for a, b in idle:
        n = max(1, math.ceil((b - a) / IDLE_STEP_US))  # n equal pieces, each credited at its middle
        for k in range(n):
            t = a + (k + 0.5) * (b - a) / n
            while i < len(events) and events[i][0] <= t:
                active.append(events[i])
                i += 1
            active = [x for x in active if x[1] > t]
            frame = next((m.group(1) for *_, name in reversed(active) if (m := _OUR_FRAME.search(name))), "(none)")
            leaf = active[-1][2] if active else "(none)"
            leaf = "(Python)" if ".py(" in leaf else _ADDRESS.sub("", leaf)
            frames[frame] = frames.get(frame, 0.0) + (b - a) / n
            ops[leaf] = ops.get(leaf, 0.0) + (b - a) / n

    def ranked(credit: dict[str, float]) -> list[dict[str, Any]]:
        order = sorted(credit.items(), key=lambda kv: kv[1], reverse=True)
        out = [{"where": w, "ms": us / 1e3} for w, us in order[:top]]
        rest = sum(us for _, us in order[top:])
        return out + ([{"where": "(elsewhere)", "ms": rest / 1e3}] if rest else [])

    return {"frames": ranked(frames), "ops": ranked(ops)}


def profile_run(bound: Bound, mode: str, device: str, path: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """One run of `mode` under `torch.profiler`: writes the table of its kernels (CUDA, by self device time, then the
    ops by self CPU time) or ops (CPU, or where the profiler sees no kernels: by self CPU time) to `path`, and returns
    the top `PROFILE_TOP` as `{"name", "ms", "calls", "fraction", "clock"}` (fraction of the run's total self time;
    clock "device" or "cpu"), and on a GPU how long the device was busy in the run's span (`busy_span`; None on a
    CPU)."""
    from torch.profiler import ProfilerActivity, profile

    setup, run = steps(bound, mode)
    _reset(bound.grads)
    state = setup() if setup else None
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, with_stack=device == "cuda") as prof:  # stacks: where the device waited
        out = run(state)
        _sync(device)
    del out, state
    _reset(bound.grads)
    from torch.autograd import DeviceType

    averages = prof.key_averages()  # grouped by name once, for the top entries and the table
    # the kernels themselves: the ops that launch them carry the same device time, which would count it twice
    key = "self_device_time_total"
    events = [
        e for e in averages
        if device == "cuda" and e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        and e.self_device_time_total > 0
    ]  # fmt: skip
    if not events:  # a CPU, or a GPU whose kernels the profiler cannot see (no CUPTI): the host's self time
        key = "self_cpu_time_total"
        events = [e for e in averages if e.self_cpu_time_total > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = averages.table(sort_by=key, row_limit=40, max_name_column_width=100) + "\n"
    if key == "self_device_time_total":  # and where the host's time went (launches, Python-side ops, waits)
        text += "\nBy self CPU time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=25,
                                                        max_name_column_width=100) + "\n"  # fmt: skip
    path.write_text(text)
    timeline = None
    if key == "self_device_time_total":
        host, device_spans = [], []  # host events as (start, end, name), device events as (start, end)
        for e in prof.events():
            if getattr(e, "is_user_annotation", False):
                continue
            if e.device_type == DeviceType.CPU:
                host.append((e.time_range.start, e.time_range.end, e.name))
            elif e.device_type == DeviceType.CUDA:
                device_spans.append((e.time_range.start, e.time_range.end))
        timeline = busy_span([(s, e) for s, e, _ in host], device_spans)
        if timeline is not None:
            timeline["idle"] = idle_sources(host, device_spans)
    top = [
        {
            "name": e.key,
            "ms": getattr(e, key) / 1e3,
            "calls": e.count,
            "fraction": getattr(e, key) / total,
            "clock": "device" if key == "self_device_time_total" else "cpu",
        }
        for e in events[:PROFILE_TOP]
    ]
    return top, timeline


def profile_name(row: dict) -> str:
    """The file name of a row's profile: op, shape, dtype, inputs, provider and mode."""
    shape = "x".join(str(row[k]) for k in ("B", "T", "H", "V") if row[k] is not None)
    name = f"{row['op']}-{shape}-{row['dtype']}-{row['inputs']}-{row['provider']}-{row['mode']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".txt"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the threads PyTorch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str | None]:
    """Versions of Python, PyTorch, this package and each provider's library (None where not installed)."""
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpo_kernels": grpo_kernels.__version__,
    }
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def free_bytes(device: str) -> int:
    """Memory the device can still give: CUDA's free plus the allocator's cached, or the host's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 1 << 62


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _unfit(provider: Provider, case: Case) -> str | None:
    """Why `provider` cannot run `case` here: not installed, another device, or more memory than is free."""
    reason = provider.unavailable(case.device)
    if reason is None and provider.memory is not None:
        need, free = provider.memory(case), free_bytes(case.device)
        if need > 0.9 * free:
            reason = f"needs about {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"
    return reason


def _reason(err: Exception) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:200]


def _row(case: Case, provider: Provider, mode: str, env: dict) -> dict[str, Any]:
    return {
        "op": case.op,
        "provider": provider.name,
        "label": provider.label,
        "role": provider.role,
        "mode": mode,
        "B": case.B,
        "T": case.T,
        "N": case.N,
        "H": case.H,
        "V": case.V,
        "dtype": case.dtype,
        "device_type": case.device,
        "inputs": case.inputs,
        "device": env["device"],
        "time_ms": None,
        "time_p20_ms": None,
        "time_p80_ms": None,
        "time_min_ms": None,
        "time_max_ms": None,
        "repeats": 0,
        "peak_mib": None,
        "grads_mib": case.grad_bytes() / MIB,
        "tflops": None,
        "gb_per_s": None,
        "floor_fraction": None,
        "speedup_vs": {},
        "skipped": None,
        "profile": None,
        "profile_file": None,
        "profile_busy": None,
        "versions": env["versions"],
    }


def measure(
    case: Case, provider: Provider, bound: Bound, mode: str, repeats: int, memory: bool, row: dict,
    profiles: Path | None = None,
) -> None:  # fmt: skip
    """Fill `row` with the times (and peak memory, and with `profiles` a profile written there) of `mode`."""
    times = time_runs(bound, mode, case.device, repeats)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    median = float(q[0])
    row.update(
        time_ms=median, time_p20_ms=float(q[1]), time_p80_ms=float(q[2]), time_min_ms=min(times),
        time_max_ms=max(times), repeats=len(times),
    )  # fmt: skip
    if case.op in LINEAR_OPS:
        row["tflops"] = case.flops(mode) / (median * 1e-3) / 1e12
    else:
        moved = case.copy_bytes() if provider.role == "floor" else case.bytes_moved(mode)
        row["gb_per_s"] = moved / (median * 1e-3) / 1e9
    if memory:
        peak, detail = peak_bytes(bound, mode, case.device, detail=profiles is not None)
        row["peak_mib"] = peak / MIB
        if profiles is not None:
            row["peak_detail"] = detail
    if profiles is not None:  # a profiler that fails costs the row its profile, not its times
        name = profile_name(row)
        try:
            row["profile"], row["profile_busy"] = profile_run(bound, mode, case.device, profiles / name)
            row["profile_file"] = name
        except Exception as err:
            print(f"no profile for {provider.name} ({case.label()}, {mode}): {_reason(err)}")


def _shape_key(row: dict) -> tuple:
    return row["op"], row["B"], row["T"], row["H"], row["V"], row["dtype"], row["device_type"], row.get("inputs")


def derive(rows: list[dict]) -> None:
    """Fill each row's `floor_fraction` (the floor's speed over this row's: 1.0 = as fast as the bare matrix products,
    or a device copy's bandwidth) and `speedup_vs` (each baseline's time over this row's) from the others."""
    shapes: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["time_ms"] is not None:
            shapes.setdefault(_shape_key(r), []).append(r)
    for same in shapes.values():
        for r in same:
            if r["op"] in LINEAR_OPS:
                floor = next((o for o in same if o["role"] == "floor" and o["mode"] == r["mode"]), None)
                r["floor_fraction"] = None if floor is None else floor["time_ms"] / r["time_ms"]
            else:
                floor = next((o for o in same if o["role"] == "floor"), None)
                r["floor_fraction"] = None if floor is None else r["gb_per_s"] / floor["gb_per_s"]
            r["speedup_vs"] = {
                o["provider"]: o["time_ms"] / r["time_ms"]
                for o in same
                if o["role"] == "baseline" and o["mode"] == r["mode"] and o is not r
            }


def _too_slow(rows: list[dict], row: dict, max_run_ms: float) -> str | None:
    """Why `row` is not worth measuring under `max_run_ms`, or None: its provider's time at the largest smaller N of
    the same op, mode, dtype, H, V and inputs, scaled to this N, exceeds the budget."""
    same = [
        r for r in rows
        if r["skipped"] is None and r["N"] < row["N"]
        and all(r[k] == row[k] for k in ("provider", "op", "mode", "dtype", "H", "V", "device_type", "inputs"))
    ]  # fmt: skip
    if not same:
        return None
    last = max(same, key=lambda r: r["N"])
    projected = last["time_ms"] * row["N"] / last["N"]
    if projected <= max_run_ms:
        return None
    return f"projected {projected:,.0f} ms a run ({last['time_ms']:,.0f} ms at N = {last['N']:,}): over --max-run-ms"


def run_sweep(
    cases: Sequence[Case],
    providers: Sequence[Provider],
    modes: Sequence[str] = MODES,
    repeats: int = 3,
    memory: bool = True,
    progress: bool = True,
    on_rows: Callable[[list[dict]], None] | None = None,
    time_limit: float | None = None,
    max_run_ms: float | None = None,
    profiles: Path | None = None,
) -> list[dict]:
    """Measure every provider of each case's op in each of `modes` the op has; one row each.

    A provider that cannot run (not installed, wrong device, would not fit in memory, raised, ran out of memory)
    gets rows with `skipped` set to the reason, printed once per provider and reason; nothing stops the sweep.

    Args:
        cases: the shapes to measure.
        providers: the implementations to measure (those of other ops are ignored).
        modes: among "forward", "backward", "forward+backward".
        repeats: timed runs per row on CPU (CUDA sizes its own).
        memory: also measure peak memory (one more run per row).
        progress: show a progress bar.
        on_rows: called with all rows so far after each provider of each case (e.g. to save them as they come).
        time_limit: seconds after which no new case is started (the cases left get no rows).
        max_run_ms: skip a row (with the reason) whose run would take longer than this, projected linearly in N from
            the same provider's row at the largest smaller N of the same op, mode, dtype, H, V and inputs.
        profiles: a folder: profile one more run of each measured row there (see `profile_run`).
    """
    start = time.monotonic()
    env = {"device": device_name(cases[0].device) if cases else "", "versions": versions()}
    mine = {case: [p for p in providers if p.op == case.op] for case in cases}
    ops_modes = {case: [m for m in modes if m in OP_MODES[case.op]] for case in cases}
    rows: list[dict] = []
    printed: set[tuple[str, str]] = set()
    bar = tqdm(total=sum(len(mine[c]) * len(ops_modes[c]) for c in cases), disable=not progress, unit="row")
    for i, case in enumerate(cases):
        if time_limit is not None and time.monotonic() - start > time_limit:
            left = len(cases) - i
            bar.write(f"time limit of {time_limit:g} s reached: {left} case{'' if left == 1 else 's'} not measured")
            break
        inputs = None
        for provider in mine[case]:
            reason = _unfit(provider, case)
            bound = None
            if reason is None:
                try:
                    inputs = inputs if inputs is not None else make_inputs(case)
                    bound = provider.bind(case, inputs)
                except Exception as err:
                    reason = _reason(err)
            for mode in ops_modes[case]:
                bar.set_postfix_str(f"{case.op} N={case.N} {provider.name} {mode}", refresh=False)
                bar.update()
                if bound is not None and bound.backward is None and mode != "forward":
                    continue
                row = _row(case, provider, mode, env)
                slow = None if reason is not None or max_run_ms is None else _too_slow(rows, row, max_run_ms)
                if slow is not None:
                    row["skipped"] = slow
                    bar.write(f"skipped {provider.name} ({case.label()}, {mode}): {slow}")
                    rows.append(row)
                    continue
                if reason is None:
                    try:
                        measure(case, provider, bound, mode, repeats, memory, row, profiles)
                    except Exception as err:
                        reason = _reason(err)
                    if reason is not None:  # out of the except block, whose traceback holds the failed run's tensors
                        _release(case.device)
                row["skipped"] = reason
                if reason is not None and (provider.name, reason) not in printed:
                    printed.add((provider.name, reason))
                    bar.write(f"skipped {provider.name} ({case.op}): {reason}")
                rows.append(row)
            del bound
            derive(rows)
            if on_rows is not None:
                on_rows(rows)
        del inputs
        _release(case.device)
    bar.close()
    return rows
