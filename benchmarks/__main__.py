"""`python -m benchmarks`: measure every op against its baselines and write results.json, results.md and plots."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.providers import INPUTS, MODES, OP_MODES, OPS, PROVIDERS, Case, sweep
from benchmarks.runner import device_name, run_sweep, versions

TIMING = {
    "cuda": "triton.testing.do_bench (L2 cleared before each run) for forward and forward+backward; CUDA events "
    "around the backward alone, its forward untimed. Medians and 20% / 80% quantiles. Memory: the CUDA allocator's "
    "peak, in a run apart.",
    "cpu": "one warm-up, then {repeats} timed runs (time.perf_counter) per row; median, 20% / 80% quantiles, min and "
    "max. Memory: grpo_kernels.memory.MemoryMeter's exact count of PyTorch allocations, in a run apart.",
}


def parse_shape(op: str, text: str, dtype: str, device: str, inputs: str = "random") -> Case:
    """`BxTxHxV` (fused_linear, linear_logprobs), `BxTxV` (loss_from_logits) or `B` (advantages) -> Case."""
    want = {"fused_linear": 4, "linear_logprobs": 4, "loss_from_logits": 3, "advantages": 1}[op]
    try:
        dims = [int(x) for x in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != want or min(dims) < 1:
        form, example = {"loss_from_logits": ("BxTxV", "8x1024x65536"), "advantages": ("B", "65536")}.get(
            op, ("BxTxHxV", "8x1024x512x65536")
        )
        raise SystemExit(f"--shapes {text!r}: {op} shapes are {form}, positive integers (e.g. {example})")
    if op == "fused_linear":
        return Case(op, dims[0], dims[1], dims[2], dims[3], dtype, device, inputs)
    if inputs != "random":
        raise SystemExit(f"--inputs {inputs} is for the fused_linear op only")
    if op == "linear_logprobs":
        return Case(op, dims[0], dims[1], dims[2], dims[3], dtype, device)
    if op == "loss_from_logits":
        return Case(op, dims[0], dims[1], None, dims[2], dtype, device)
    return Case(op, dims[0], 1, None, None, "float32", device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time and peak memory of grpo_kernels' ops next to eager PyTorch, TRL, Liger-Kernel, Cut "
        "Cross-Entropy and the bare matrix products, in forward, backward and forward+backward. Providers that are "
        "not installed, or do not run on the device, are skipped with the reason.",
        epilog="Examples: `python -m benchmarks --quick --out runs/quick` (up to 11 minutes on a 2-core CPU); "
        "`python -m benchmarks --out benchmarks/results/h100` (the full sweep on a GPU); "
        "`python -m benchmarks --ops fused_linear --shapes 8x1024x512x65536 --modes forward+backward`.",
    )
    p.add_argument("--quick", action="store_true", help="a small sweep (fp32, N <= 4,096, V = 32,768)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output folder (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to measure (default: all)")
    names = sorted({pr.name for pr in PROVIDERS})
    p.add_argument("--providers", nargs="+", choices=names, default=names, help="providers (default: all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes (default: all)")
    p.add_argument("--shapes", nargs="+", help="measure these shapes instead of a sweep (needs exactly one --ops)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="dtype of --shapes (default: float32 on CPU, else bfloat16)"
    )
    p.add_argument(
        "--inputs", choices=INPUTS, default="random",
        help="inputs of --shapes: random (unit-scale logits) or peaked (a trained model's peaked softmax, for gradient "
        "filtering; fused_linear only); default: %(default)s",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row on CPU (default: %(default)s)")
    p.add_argument("--time-limit", type=float, help="seconds after which no new shape is started")
    p.add_argument(
        "--max-run-ms", type=float,
        help="skip a provider's larger shapes once its runs there would take longer than this (projected linearly "
        "in N from its last smaller shape), with the reason",
    )  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--profile", action="store_true",
        help="profile one more run of each row with torch.profiler: the top kernels (GPU) or ops (CPU) in "
        "results.md and results.json, the full tables in OUT/profiles/; the memory run also says where the memory "
        "live at its peak was allocated",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true", help="remake results.md and plots from OUT/results.json")
    p.add_argument(
        "--resume", action="store_true",
        help="keep the shapes OUT/results.json already holds for every chosen provider and mode (same device) and "
        "measure the rest: a sweep cut short by --time-limit goes on where it stopped; the file's other rows stay",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_out(args.out)
    if args.report_only:
        for flag, given in (("--quick", args.quick), ("--dtype", args.dtype is not None)):
            if given:
                raise SystemExit(f"{flag} does not apply to --report-only, which remakes the report from results.json")
        meta, rows = _load(args.out / "results.json", "--report-only")
        written = report.write_report(args.out, rows, meta)
        print("\n".join(str(p) for p in written))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1; got {args.repeats}")
    if args.max_run_ms is not None and not args.max_run_ms > 0:
        raise SystemExit(f"--max-run-ms must be a positive number of milliseconds; got {args.max_run_ms}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise SystemExit(f"--time-limit must be a positive number of seconds; got {args.time_limit}")
    if args.shapes:
        if len(args.ops) != 1:
            raise SystemExit("--shapes needs exactly one --ops (shapes are read per op)")
        if args.quick:
            raise SystemExit("--quick is a sweep; --shapes measures the shapes it names instead")
        if args.ops == ["advantages"] and args.dtype not in (None, "float32"):
            raise SystemExit(f"--dtype {args.dtype}: the advantages op's rewards are always float32")
        dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
        cases = [parse_shape(args.ops[0], s, dtype, device, args.inputs) for s in args.shapes]
        name = "custom"
    else:
        if args.inputs != "random":
            raise SystemExit("--inputs applies to --shapes; the sweeps name their own inputs")
        if args.dtype is not None:
            raise SystemExit("--dtype applies to --shapes; the sweeps name their own dtypes")
        name = "quick" if args.quick else "full"
        cases = [c for c in sweep(name, device) if c.op in args.ops]
    providers = [p for p in PROVIDERS if p.name in args.providers]
    todo = cases
    previous: list[dict] = []
    before: dict | None = None  # the meta of the results.json --resume read
    if args.resume:
        if (args.out / "results.json").exists():
            todo, previous, before = _resumed(args.out / "results.json", cases, providers, args.modes, device)
            print(f"--resume: {len(cases) - len(todo)} of {_count(len(cases), 'shape')} already measured")
        else:
            print(f"--resume: no results.json in {args.out}: measuring everything")
    meta = {
        "command": shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "sweep": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "timing": TIMING[device].format(repeats=args.repeats),
        "device": device_name(device),
        "device_type": device,
        "versions": versions(),
        "load_average": [round(os.getloadavg()[0], 2)],  # 1-minute load of the host, at the start and the end
        "cpu_threads": torch.get_num_threads(),
        "earlier": [],  # the runs whose rows --resume kept: their command, date, versions and shapes
        # the package's settings from the environment (a chunk budget, say), which the command line does not show
        "environment": {k: v for k, v in sorted(os.environ.items()) if _package_setting(k)},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def combined(new: list[dict]) -> list[dict]:
        """The earlier rows this run does not measure again and its own; the runs the former come from in meta."""
        kept = _kept(previous, new)
        meta["earlier"] = _earlier(before, kept)
        return kept + new

    def save(new: list[dict]) -> None:  # as rows come, so that an interrupted sweep keeps what it measured
        report.write_json(args.out / "results.json", combined(new), meta)

    new = run_sweep(
        todo, providers, args.modes, args.repeats, not args.no_memory, not args.no_progress, save, args.time_limit,
        args.max_run_ms, args.out / "profiles" if args.profile else None,
    )  # fmt: skip
    rows = combined(new)
    measured = {_case_key(r) for r in new}
    meta["not_measured"] = [
        c.label() for c in todo if _case_key(c) not in measured and _wanted(c, providers, args.modes)
    ]
    meta["load_average"].append(round(os.getloadavg()[0], 2))
    written = report.write_all(args.out, rows, meta)
    shown = [r for r in rows if r["mode"] == report.main_mode(rows, r["op"])]
    print(report.markdown(shown, meta))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _count(n: int, noun: str) -> str:
    """`1 shape`, `2 shapes`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _check_out(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == out else f" ({folder})"
                raise SystemExit(f"--out {out}{where} is a file, not a folder")
            return


def _load(path: Path, flag: str) -> tuple[dict, list[dict]]:
    """`report.load(path)`, or a one-line error naming `flag` where the file is missing or not a results.json."""
    try:
        return report.load(path)
    except FileNotFoundError:
        raise SystemExit(f"{flag}: {path} not found (run the benchmarks first)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(
            f"{flag}: {path} is not a results.json of the benchmarks ({type(err).__name__}: {err})"
        ) from None


def _package_setting(name: str) -> bool:
    """An environment variable of the package (`GRPO_KERNELS_*`), not of its test harness (`GRPO_KERNELS_TEST_*`)."""
    return name.startswith("GRPO_KERNELS_") and not name.startswith("GRPO_KERNELS_TEST_")


def _case_key(x: Case | dict) -> tuple:
    if isinstance(x, dict):
        return x["op"], x["B"], x["T"], x["H"], x["V"], x["dtype"], x.get("inputs", "random")
    return x.op, x.B, x.T, x.H, x.V, x.dtype, x.inputs


def _row_key(row: dict) -> tuple:
    return *_case_key(row), row["provider"], row["mode"]


def _wanted(case: Case, providers: list, modes: list[str]) -> set[tuple[str, str]]:
    """`{(provider, mode)}` a run of `case` gives rows for: each chosen provider of its op, in each chosen mode it
    has."""
    return {
        (p.name, m) for p in providers if p.op == case.op
        for m in modes if m in OP_MODES[case.op] and (m == "forward" or p.has_backward)
    }  # fmt: skip


def _resumed(
    path: Path, cases: list[Case], providers: list, modes: list[str], device: str
) -> tuple[list[Case], list[dict], dict]:
    """`(cases still to measure, the file's rows, the file's meta)`: a case is done when the file has a row of it for
    each chosen provider of its op in each chosen mode that provider has. The rows of the cases measured again are
    replaced as their new rows come (`_kept`); the others stay."""
    meta, rows = _load(path, "--resume")
    if meta.get("device") != device_name(device):
        raise SystemExit(f"--resume: {path} was measured on {meta.get('device')!r}, not on {device_name(device)!r}")
    seen: dict[tuple, set[tuple[str, str]]] = {}
    for r in rows:
        seen.setdefault(_case_key(r), set()).add((r["provider"], r["mode"]))
    todo = [c for c in cases if not _wanted(c, providers, modes) <= seen.get(_case_key(c), set())]
    return todo, rows, meta


def _kept(previous: list[dict], new: list[dict]) -> list[dict]:
    """The rows of `previous` whose case, provider and mode have no row in `new`."""
    replaced = {_row_key(r) for r in new}
    return [r for r in previous if _row_key(r) not in replaced]


def _earlier(meta: dict | None, kept: list[dict]) -> list[dict]:
    """The runs `kept` come from: those the file read by --resume had kept, then its own (its command, date, versions
    and the number of shapes with rows kept); none when nothing is kept."""
    if meta is None or not kept:
        return []
    own = {k: meta.get(k) for k in ("command", "date", "versions")}
    return [*meta.get("earlier", []), {**own, "shapes_kept": len({_case_key(r) for r in kept})}]


if __name__ == "__main__":
    sys.exit(main())
