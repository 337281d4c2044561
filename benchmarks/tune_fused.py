"""`python -m benchmarks.tune_fused`: time the fused linear kernels' tile configurations on a GPU.

The fused kernels of `grpo_kernels/ops/linear.py` (`GRPO_KERNELS_LINEAR=fused`, and `linear_logprobs`' forward) read
their launch configuration from `TILES`. This tries each candidate below on one shape, the forward kernel and the
backward kernel apart, next to the matrix products they must do (the floor), checks that each candidate computes what
the configuration in use computes, and writes `tune.json` and `tune.md` to `--out`. Put the fastest in `TILES`.
`python -m benchmarks.kernel_resources --tiles` says, without a GPU, what each candidate needs (registers, spills,
shared memory) on each architecture.

On a CPU the kernels run in Triton's interpreter, which has tiles of its own: the command runs (for its test) but
says nothing about speed there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

FWD_CANDIDATES = (
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 8, 3, 128),  # capped at 128 registers: two blocks per SM (133 registers uncapped: one, triton 3.6)
)
BWD_CANDIDATES = (
    (64, 128, 64, 8, 2),
    (128, 128, 64, 8, 2),
    (128, 128, 32, 8, 2),
    (64, 256, 64, 8, 2),
    (128, 256, 64, 8, 2),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 2),
)
# Each K step loads a [BLOCK_N, BLOCK_K] and a [BLOCK_K, BLOCK_V] tile for BLOCK_N * BLOCK_V * BLOCK_K multiply-adds:
# BLOCK_N * BLOCK_V / (BLOCK_N + BLOCK_V) FLOPs per byte of bf16 loaded (43 at 64 x 128, 85 at 128 x 256), which is
# what bounds a tile below cuBLAS when the loads come from L2.
MISMATCH = 1e-2  # largest relative difference from the configuration in use that still counts as the same result


@contextlib.contextmanager
def tiles_in_use(key: tuple, tiles) -> Iterator[None]:
    """`linear.TILES[key] = tiles` inside the block, the entry before it (or its absence) restored after."""
    from grpo_kernels.ops import linear

    missing = object()
    before = linear.TILES.get(key, missing)
    linear.TILES[key] = tiles
    try:
        yield
    finally:
        if before is missing:
            del linear.TILES[key]
        else:
            linear.TILES[key] = before


def _time(fn, device: str, runs: int, warm_up: bool = True) -> list[float]:
    """Milliseconds of `runs` calls, after one warm-up call (compilation) unless `fn` has just run."""
    if warm_up:
        fn()
    out = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median())


def _diff(a: tuple, b: tuple) -> float:
    """The largest difference of any output, relative to that output's largest entry (a bf16 `d_weight` is summed in
    another order by other tiles, so it differs by a few of its ulps)."""
    return max(
        float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
        for x, y in zip(a, b, strict=True)
        if x is not None
    )


def _floor(hidden: torch.Tensor, weight: torch.Tensor, device: str, runs: int) -> dict[str, float]:
    """Milliseconds of the products each kernel must do: the logits (forward); d_hidden and d_weight (backward)."""
    z = hidden.new_empty(hidden.shape[0], weight.shape[0])
    d_h, d_w = torch.empty_like(hidden), torch.empty_like(weight)

    def backward() -> None:
        torch.mm(z, weight, out=d_h)
        torch.mm(z.t(), hidden, out=d_w)

    return {
        "fwd": _median(_time(lambda: torch.mm(hidden, weight.t(), out=z), device, runs)),
        "bwd": _median(_time(backward, device, runs)),
    }


def tune(B: int, T: int, H: int, V: int, dtype: torch.dtype, device: str, runs: int, time_limit: float) -> list[dict]:
    """One row per (kernel, candidate): its tiles, time, fraction of the floor, and difference from the default."""
    from benchmarks.runner import _reason
    from grpo_kernels.ops import linear

    torch.manual_seed(0)
    N = B * T
    hidden = torch.randn(N, H, device=device, dtype=dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5).to(dtype)
    ids = torch.randint(V, (N,), device=device)
    grad_logp = torch.randn(N, device=device)
    head = (1.0, 1.0, None)
    keys = {k: linear.tiles_key(k, dtype, hidden.device) for k in ("fwd", "bwd")}
    in_use = {k: linear.TILES[keys[k]] for k in ("fwd", "bwd")}
    floor = _floor(hidden, weight, device, runs)
    stats = linear.linear_fwd(hidden, weight, None, ids, None, head)

    def fwd():
        return linear.linear_fwd(hidden, weight, None, ids, None, head)

    def bwd():
        return linear.linear_bwd(hidden, weight, None, ids, None, stats[2], stats[1], grad_logp, None, head,
                                 (True, True, False))  # fmt: skip

    rows, start = [], time.monotonic()
    for kernel, candidates, fn in (("fwd", FWD_CANDIDATES, fwd), ("bwd", BWD_CANDIDATES, bwd)):
        reference = fn()
        for cand in candidates:
            tiles = linear.Tiles(*cand)
            row = {
                "kernel": kernel, "tiles": dataclasses.asdict(tiles), "in_use": tiles == in_use[kernel],
                "floor_ms": floor[kernel], "time_ms": None, "floor_fraction": None, "max_diff": None, "error": None,
            }  # fmt: skip
            rows.append(row)
            if time.monotonic() - start > time_limit:
                row["error"] = "not tried: time limit"
                continue
            try:
                with tiles_in_use(keys[kernel], tiles):
                    row["max_diff"] = _diff(fn(), reference)  # the first call, which compiles: the warm-up
                    row["time_ms"] = _median(_time(fn, device, runs, warm_up=False))
                row["floor_fraction"] = floor[kernel] / row["time_ms"]
            except Exception as err:  # e.g. out of shared memory for this tile
                row["error"] = _reason(err)
                if device == "cuda":
                    torch.cuda.synchronize()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Fused linear kernels: tile configurations on {meta['device']}",
        "",
        f"`{meta['command']}` ({meta['date']}). Shape N = {meta['N']:,} ({meta['B']} x {meta['T']:,}), H = "
        f"{meta['H']:,}, V = {meta['V']:,}, {meta['dtype']}; median of {meta['runs']} runs after a warm-up. Floor: "
        "the matrix products the kernel must do (cuBLAS): one for the forward, two for the backward. Max diff: the "
        "largest difference from the configuration in use, relative to the output's largest entry (above "
        f"{MISMATCH:g}: a wrong result).",
        "",
    ]
    if meta.get("interpreted"):
        lines += ["**Triton's interpreter** ran the kernels with tiles of its own: these times say nothing about "
                  "the configurations.", ""]  # fmt: skip
    for kernel, title in (("fwd", "Forward (log-sum-exp statistics)"), ("bwd", "Backward (d_hidden and d_weight)")):
        mine = [r for r in rows if r["kernel"] == kernel]
        ok = [r["time_ms"] for r in mine if r["time_ms"] is not None and r["max_diff"] <= MISMATCH]
        best = min(ok) if ok else None
        lines += [f"## {title}", "", "| BLOCK_N x BLOCK_V x BLOCK_K, warps, stages | ms | fraction of the floor | "
                  "max diff |", "|---|---|---|---|"]  # fmt: skip
        for r in mine:
            t = r["tiles"]
            name = f"{t['BLOCK_N']} x {t['BLOCK_V']} x {t['BLOCK_K']}, {t['num_warps']}, {t['num_stages']}"
            name += f", at most {t['maxnreg']} registers" if t.get("maxnreg") else ""
            name += " (in use)" if r["in_use"] else ""
            if r["error"]:
                lines.append(f"| {name} | {r['error']} | | |")
                continue
            ms = f"{r['time_ms']:.3g}"
            ms = f"**{ms}**" if r["time_ms"] == best else ms
            wrong = " (wrong)" if r["max_diff"] > MISMATCH else ""
            lines.append(f"| {name} | {ms} | {r['floor_fraction']:.2f} | {r['max_diff']:.2g}{wrong} |")
        lines += ["", f"Floor: {mine[0]['floor_ms']:.3g} ms.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_fused", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8x1024x4096x131072", help="BxTxHxV (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=float("inf"), help="seconds after which no candidate starts")
    p.add_argument("--out", type=Path, default=Path("runs/tune"), help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        B, T, H, V = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"--shape {args.shape!r}: expected BxTxHxV, positive integers (e.g. 8x1024x4096x131072)"
        ) from None
    if min(B, T, H, V) < 1 or args.runs < 1:
        raise SystemExit("--shape needs positive sizes and --runs at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device")
    if device == "cpu":  # before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks.runner import device_name

    rows = tune(B, T, H, V, getattr(torch, args.dtype), device, args.runs, args.time_limit)
    meta = {
        "command": " ".join(["python -m benchmarks.tune_fused", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(device), "B": B, "T": T,
        "N": B * T, "H": H, "V": V, "dtype": args.dtype, "runs": args.runs, "torch": torch.__version__,
        "interpreted": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, meta)
    (args.out / "tune.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
