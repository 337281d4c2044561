"""`python -m benchmarks.chunk_products`: time the three matrix products of one chunk of the single-pass schedule.

The default fused linear loss forms each chunk's gradients in its forward: the chunk's logits (`[c, H] @ [H, V]`),
`d_hidden` (`[c, V] @ [V, H]`, a small output over a long inner dimension) and its share of `d_weight`
(`[V, c] @ [c, H]`, added to the whole `[V, H]` gradient: read and written once per chunk). Under a small memory
budget the chunks are small (240 tokens in 60 MiB of bf16 logits at V = 131,072), and three products that are fast
for 2,048-token chunks may not be for 240-token ones. This times each product at several chunk sizes, next to
`d_hidden` split over the vocabulary into S products whose partial sums are added in fp32 (`split-S`, with their
error against an fp64 product, as a multiple of the plain product's), and the `d_weight` addition by the Triton kernel
of `grpo_kernels/ops/weight_grad.py` (which loads its tiles of `d_weight` ahead of the products) next to cuBLAS's
`addmm_`, with its error as a multiple of `addmm_`'s. It projects each size onto N tokens: the time of N / c chunks
against the three products at c = N. It writes `chunk_products.json` and `chunk_products.md` to `--out`.

On a CPU it runs (for its test) but says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import tune_fused
from benchmarks.runner import device_name
from grpo_kernels.backend import use_triton
from grpo_kernels.ops.weight_grad import Tiles, add_weight_grad

SPLITS = (2, 4, 8)
# `--add-tiles`: launch configurations of the Triton addition to try next to the one in use (bf16 and fp16 inputs),
# named (block_m x block_n, warps, stages; "p<k>": the persistent kernel with k programs a multiprocessor, which loads
# the next tile of d_weight before the current tile's products; "flat": its loops flattened, so that the compiler may
# pipeline the products' loads across tiles too)
ADD_TILES = {
    "128x128 w8 s3": Tiles(128, 128, 64, 8, 3),
    "128x256 w8 s3": Tiles(128, 256, 64, 8, 3),
    "256x128 w8 s3": Tiles(256, 128, 64, 8, 3),
    "128x64 w4 s4": Tiles(128, 64, 64, 4, 4),
    "64x128 w4 s3": Tiles(64, 128, 64, 4, 3),
    "128x64 w4 s3 p2": Tiles(128, 64, 64, 4, 3, per_sm=2),
    "128x64 w4 s4 p2": Tiles(128, 64, 64, 4, 4, per_sm=2),
    "64x128 w4 s3 p2": Tiles(64, 128, 64, 4, 3, per_sm=2),
    "128x128 w8 s3 p1": Tiles(128, 128, 64, 8, 3, per_sm=1),
    "128x128 w8 s4 p1": Tiles(128, 128, 64, 8, 4, per_sm=1),
    "128x128 w8 s2 p1 flat": Tiles(128, 128, 64, 8, 2, per_sm=1, flatten=True),
    "128x128 w8 s3 p1 flat": Tiles(128, 128, 64, 8, 3, per_sm=1, flatten=True),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _time(fn, device: str, runs: int) -> float:
    """Median milliseconds of `runs` calls after one warm-up call."""
    return statistics.median(tune_fused._time(fn, device, runs))


def split_product(dz: torch.Tensor, weight: torch.Tensor, splits: int, out: torch.Tensor, wide: bool = False):
    """`dz @ weight` (`[c, V] @ [V, H]`) as `splits` products over slices of the vocabulary, batched in one call,
    their partial sums added in fp32 and rounded once into `out`; V must be a multiple of `splits`. `wide`: the
    partial sums come out of the products in fp32 (`out_dtype`, where PyTorch has it), else in `dz`'s dtype."""
    c, V = dz.shape
    a, b = dz.view(c, splits, V // splits).transpose(0, 1), weight.view(splits, V // splits, -1)
    partial = torch.bmm(a, b, out_dtype=torch.float32) if wide else torch.bmm(a, b)  # [S, c, H]
    return out.copy_(partial.sum(0, dtype=torch.float32))


def measure(N: int, H: int, V: int, tokens: list[int], dtype: torch.dtype, device: str, runs: int,
            add_tiles: dict[str, Tiles] | None = None, progress=None) -> list[dict]:  # fmt: skip
    """One row per chunk size: each product's milliseconds and TFLOP/s, the split `d_hidden` products' times and
    errors, the Triton addition's under each of `add_tiles` (time, TFLOP/s and error as a multiple of `addmm_`'s, or
    the error it failed with), and the projection onto N tokens. `progress(rows)`, where given, is called with the
    rows so far after each configuration of `add_tiles` and each row, so that a run cut short keeps what it
    measured."""
    torch.manual_seed(0)
    weight = (torch.randn(V, H, device=device) * H**-0.5).to(dtype)
    d_w = torch.empty_like(weight)
    rows = []
    for c in tokens:
        h = torch.randn(c, H, device=device, dtype=dtype)
        z = torch.empty(c, V, device=device, dtype=dtype)
        dz = (torch.randn(c, V, device=device) * V**-0.5).to(dtype)
        d_h = torch.empty(c, H, device=device, dtype=dtype)
        flops = 2.0 * c * H * V
        ms = {
            "logits": _time(lambda h=h, z=z: torch.mm(h, weight.t(), out=z), device, runs),
            "d_hidden": _time(lambda dz=dz, d_h=d_h: torch.mm(dz, weight, out=d_h), device, runs),
            "d_weight_write": _time(lambda dz=dz, h=h: torch.mm(dz.t(), h, out=d_w), device, runs),
            "d_weight_add": _time(lambda dz=dz, h=h: d_w.addmm_(dz.t(), h), device, runs),
        }
        tried = {}
        if use_triton(dz):  # the Triton addition, and its error against fp64 as a multiple of addmm_'s
            ms["d_weight_add_triton"] = _time(lambda dz=dz, h=h: add_weight_grad(d_w, dz, h), device, runs)
            base = (torch.randn(V, H, device=device) * 0.01).to(dtype)
            want = base.double().addmm_(dz.double().t(), h.double())
            cublas_err = max(float((base.clone().addmm_(dz.t(), h) - want).abs().max()), 1e-300)
            add_error = float((add_weight_grad(base.clone(), dz, h) - want).abs().max()) / cublas_err
            for name, tiles in (add_tiles or {}).items():
                try:
                    err = float((add_weight_grad(base.clone(), dz, h, tiles=tiles) - want).abs().max()) / cublas_err
                    t = _time(lambda dz=dz, h=h, tiles=tiles: add_weight_grad(d_w, dz, h, tiles=tiles), device, runs)
                except Exception as e:  # a configuration the GPU cannot hold (shared memory, registers)
                    tried[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
                    continue
                tried[name] = {"ms": t, "tflops": flops / t / 1e9, "error_vs_addmm": err}
                if progress is not None:
                    progress([*rows, {"tokens": c, "ms": ms, "tflops": {}, "add_tiles": tried, "partial": True}])
            del base, want
        exact = dz.double() @ weight.double()
        plain_err = float((torch.mm(dz, weight) - exact).abs().max())
        splits = {}
        for s in SPLITS:
            for wide in (False, True):
                key = f"{s}{' fp32' if wide else ''}"
                if V % s:
                    splits[key] = {"error": f"V = {V} is not a multiple of {s}"}
                    continue
                try:
                    got = split_product(dz, weight, s, torch.empty_like(d_h), wide)
                except (RuntimeError, TypeError, NotImplementedError) as err:
                    splits[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"}
                    continue
                err = float((got - exact).abs().max())
                t = _time(lambda dz=dz, d_h=d_h, s=s, wide=wide: split_product(dz, weight, s, d_h, wide), device, runs)
                splits[key] = {"ms": t, "tflops": flops / t / 1e9, "error_vs_plain": err / max(plain_err, 1e-300)}
        chunks = -(-N // c)
        rows.append({
            "tokens": c, "chunks": chunks, "ms": ms, "tflops": {k: flops / v / 1e9 for k, v in ms.items()},
            "split_d_hidden": splits, "add_tiles": tried,
            "projected_ms": chunks * (ms["logits"] + ms["d_hidden"] + ms["d_weight_add"]),
        })  # fmt: skip
        if "d_weight_add_triton" in ms:
            rows[-1]["add_triton_error_vs_addmm"] = add_error
            rows[-1]["projected_triton_ms"] = chunks * (ms["logits"] + ms["d_hidden"] + ms["d_weight_add_triton"])
        del h, z, dz, d_h, exact
        if progress is not None:
            progress(rows)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# One chunk's matrix products on {meta['device']}",
        "",
        f"`{meta['command']}` ({meta['date']}). N = {meta['N']:,}, H = {meta['H']:,}, V = {meta['V']:,}, "
        f"{meta['dtype']}; median of {meta['runs']} runs after a warm-up. Per chunk of c tokens: the logits "
        "`[c, H] @ [H, V]`, `d_hidden` `[c, V] @ [V, H]`, `d_weight` `[V, c] @ [c, H]` written, and added to (the "
        "single-pass schedule adds every chunk but the first), by cuBLAS's `addmm_` and by the Triton kernel of "
        "`ops/weight_grad.py` (its error against fp64 as a multiple of `addmm_`'s). Projected: N / c chunks of the "
        "logits, `d_hidden` and the added `d_weight` (cuBLAS; Triton).",
        "",
    ]
    if not meta["on_gpu"]:
        lines += ["**CPU**: these times say nothing about a GPU.", ""]
    lines += ["| c | logits, ms (TFLOP/s) | d_hidden | d_weight written | d_weight added | added by Triton "
              "(error) | projected for N, ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [f"{r['ms'][k]:.3g} ({r['tflops'][k]:.3g})" for k in ("logits", "d_hidden", "d_weight_write",
                                                                       "d_weight_add")]  # fmt: skip
        triton_ms = r["ms"].get("d_weight_add_triton")
        cells.append("n/a" if triton_ms is None else f"{triton_ms:.3g} ({r['tflops']['d_weight_add_triton']:.3g}), "
                     f"{r['add_triton_error_vs_addmm']:.2g}x")  # fmt: skip
        projected = f"{r['projected_ms']:.3g}" + ("" if triton_ms is None else f"; {r['projected_triton_ms']:.3g}")
        lines.append(f"| {r['tokens']:,} | " + " | ".join(cells) + f" | {projected} |")
    keys = list(rows[0]["split_d_hidden"]) if rows else []
    lines += ["", "`d_hidden` as S products over slices of the vocabulary, their partial sums (in the inputs' dtype, "
              "or in fp32: `S fp32`) added in fp32 (ms, TFLOP/s, max error against fp64 as a multiple of the plain "
              "product's):", "", "| c | " + " | ".join(f"split-{k}" for k in keys) + " |",
              "|---|" + "---|" * len(keys)]  # fmt: skip
    for r in rows:
        cells = []
        for k in keys:
            x = r["split_d_hidden"][k]
            ok = "error" not in x
            cells.append(f"{x['ms']:.3g} ({x['tflops']:.3g}), {x['error_vs_plain']:.2g}x" if ok else x["error"])
        lines.append(f"| {r['tokens']:,} | " + " | ".join(cells) + " |")
    tried = list(rows[0].get("add_tiles", {})) if rows else []
    if tried:
        lines += ["", "The Triton addition under other launch configurations (`--add-tiles`; the one in use is "
                  f"{_tiles_name()}): ms (TFLOP/s), max error against fp64 as a multiple of `addmm_`'s:", "",
                  "| c | addmm_ | " + " | ".join(tried) + " |", "|---|---|" + "---|" * len(tried)]  # fmt: skip
        for r in rows:
            cells = [f"{r['ms']['d_weight_add']:.3g} ({r['tflops']['d_weight_add']:.3g})"]
            for k in tried:
                x = r["add_tiles"].get(k, {"error": "not run"})
                ok = "error" not in x
                cells.append(f"{x['ms']:.3g} ({x['tflops']:.3g}), {x['error_vs_addmm']:.2g}x" if ok else x["error"])
            lines.append(f"| {r['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_tiles(rows: list[dict]) -> str | None:
    """The `--add-tiles` configuration with the least time summed over the chunk sizes `rows` measured in full, where
    that is less than `addmm_`'s and its error at most twice `addmm_`'s at every size; None where none is."""
    rows = [r for r in rows if not r.get("partial") and r.get("add_tiles")]
    if not rows:
        return None
    names = [k for k in rows[0]["add_tiles"] if all("ms" in r["add_tiles"].get(k, {}) for r in rows)]
    names = [k for k in names if all(r["add_tiles"][k]["error_vs_addmm"] <= 2 for r in rows)]
    cublas = sum(r["ms"]["d_weight_add"] for r in rows)
    best = min(names, key=lambda k: sum(r["add_tiles"][k]["ms"] for r in rows), default=None)
    return best if best is not None and sum(r["add_tiles"][best]["ms"] for r in rows) < cublas else None


def _tiles_name() -> str:
    from grpo_kernels.ops.weight_grad import TILES

    t = TILES["low"]
    name = f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}" + (f" p{t.per_sm}" if t.per_sm else "")
    return name + (" flat" if t.flatten else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chunk_products", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x4096x131072", help="NxHxV (default: issue 3's target shape)")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 240, 512, 1024, 2048], help="chunk sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--add-tiles", action="store_true", help="also time the Triton d_weight addition under each of ADD_TILES"
    )
    p.add_argument("--out", default="runs/chunk-products")
    args = p.parse_args(argv)
    try:
        N, H, V = (int(x) for x in args.shape.split("x"))
    except ValueError:
        p.error(f"--shape: expected NxHxV (e.g. 8192x4096x131072); got {args.shape!r}")
    if min(N, H, V) < 1 or min(args.tokens) < 1 or args.runs < 1:
        p.error("--shape, --tokens and --runs must be positive")
    add_tiles = ADD_TILES if args.add_tiles else None
    meta = {
        "command": "python -m benchmarks.chunk_products " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "N": N, "H": H, "V": V, "dtype": args.dtype,
        "runs": args.runs, "torch": torch.__version__,
        "device": device_name(args.device), "on_gpu": args.device == "cuda",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:  # the rows so far (the last one partial while its configurations run)
        (out / "chunk_products.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    rows = measure(N, H, V, sorted(set(args.tokens)), DTYPES[args.dtype], args.device, args.runs, add_tiles, save)
    save(rows)
    text = markdown(rows, meta)
    (out / "chunk_products.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
