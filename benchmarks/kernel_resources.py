"""`python -m benchmarks.kernel_resources`: build every Triton kernel of grpo_kernels for NVIDIA GPUs, without one.

Triton's compiler and NVIDIA's ptxas (both ship in the triton wheel) build each kernel for a target architecture as a
launch on that GPU would: the package's public functions run on small CPU tensors with the GPU launch settings (tiles,
warps, stages) and the GPU's argument specialisation, and each kernel launch is compiled instead of run. For every
kernel variant this reports the registers per thread, the bytes spilled to local memory (ptxas' stack frame) and the
shared memory, and checks that it compiles and fits the architecture's limits: a kernel that does not would fail at
its first launch on that GPU. Nothing is timed.

    python -m benchmarks.kernel_resources [--arch 90 89 80 100 120] [--dtypes bf16 fp32] [--tiles] [--out DIR]

`--tiles` also builds each tile configuration that `benchmarks/tune_fused.py` would time, in bf16 at the fused
linear kernels' target shape, and each of the `d_weight` addition's that `benchmarks/chunk_products.py --add-tiles`
would, so that a configuration that spills or cannot launch is known before a GPU is spent on
it (a candidate that does not fit is reported, not an error: it is skipped where it cannot run). Writes
`resources.json` and `resources.md` to `--out`; exits 1 when a kernel, with the launch settings the package uses, fails
to compile or to fit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and __name__ == "__main__":
    sys.exit("benchmarks.kernel_resources compiles kernels: run it with TRITON_INTERPRET unset (or 0)")

import torch
from tqdm.auto import tqdm


class Arch(NamedTuple):
    name: str  # the parts it stands for
    shared_per_block: int  # bytes of shared memory one block may use
    sms: int
    shared_per_sm: int  # bytes; each resident block also takes 1 KiB of it
    warps_per_sm: int


ARCHS = {  # compute capability -> limits, from NVIDIA's CUDA programming guide
    80: Arch("A100", 166912, 108, 167936, 64),
    86: Arch("RTX 3090 / A10", 101376, 82, 102400, 48),
    89: Arch("RTX 4090 / L40S", 101376, 128, 102400, 48),
    90: Arch("H100 / H200", 232448, 132, 233472, 64),
    100: Arch("B200", 232448, 148, 233472, 64),
    120: Arch("RTX 5090", 101376, 170, 102400, 48),
}
REGISTERS_PER_SM = 65536
BLOCKS_PER_SM = 16  # the fewest resident blocks any of these allows (sm_86); the kernels here use 4 warps or more
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STRATEGIES = ("chunked", "vocab-blocks", "tiles", "scratch", "fused")
# small shapes with every dimension a multiple of 16 ("aligned"), and with none ("odd"): Triton specialises on that
SHAPES = {"aligned": (2, 32, 128, 2048), "odd": (2, 7, 100, 1000)}  # B, T, H, V
TARGET = (8, 1024, 4096, 131072)  # the fused linear kernels' target shape, for --tiles


@dataclasses.dataclass
class Build:
    """One kernel variant built for one architecture."""

    arch: int
    scenario: str
    kernel: str
    dtype: str
    options: str  # the kernel's compile-time arguments
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_bytes: int = 0  # ptxas' stack frame per thread: registers spilled to local memory
    shared_bytes: int = 0
    loop_instructions: int = 0  # SASS instructions in its longest loop (`_loop_instructions`)
    error: str = ""

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        limit = ARCHS[self.arch].shared_per_block
        if self.shared_bytes > limit:
            out.append(f"needs {self.shared_bytes} bytes of shared memory; sm_{self.arch} allows {limit}")
        if self._registers_per_warp * self.num_warps > REGISTERS_PER_SM:
            out.append(f"{self.registers} registers x {self.num_warps * 32} threads exceed one SM's {REGISTERS_PER_SM}")
        return out

    @property
    def _registers_per_warp(self) -> int:
        return -(-self.registers * 32 // 256) * 256  # allocated per warp in units of 256

    @property
    def blocks_per_sm(self) -> int:
        """How many blocks of this kernel one SM holds at once, as its registers, shared memory and warps allow."""
        if self.error or not self.num_warps:
            return 0
        arch = ARCHS[self.arch]
        by_registers = REGISTERS_PER_SM // max(self._registers_per_warp, 1) // self.num_warps
        by_shared = arch.shared_per_sm // (self.shared_bytes + 1024)
        return min(by_registers, by_shared, arch.warps_per_sm // self.num_warps, BLOCKS_PER_SM)


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def available() -> str | None:
    """None when kernels can be built here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not _tool("ptxas").exists() or not _tool("cuobjdump").exists():
        return "this triton has no NVIDIA backend tools (ptxas, cuobjdump)"
    return None


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    fields = dict(part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def _loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the kernel's longest loop, from its head to its back edge (branches inside it that run
    rarely included), from nvdisasm; 0 for a kernel without a loop."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_tool("nvdisasm")), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    labels, longest, count = {}, 0, 0
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            branch = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
            if branch and labels.get(branch.group(1), count + 1) <= count:  # back to a label already passed
                longest = max(longest, count + 1 - labels[branch.group(1)])
            count += 1
    return longest


class _FakeDriver:
    """What Triton's JIT asks of the active driver before it compiles: the target, a device and a stream. The device
    is the architecture, so that the JIT's caches (one per device) keep each architecture's builds apart."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def building(arch: int, seen: dict, scenario: Callable[[], str]) -> Iterator[None]:
    """Inside the block, grpo_kernels' Triton launches on CPU tensors compile for sm_`arch` and do not run; each new
    variant is added to `seen` (keyed by its specialisation) as a `Build`. Outputs of the launches are left
    uninitialised."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from grpo_kernels.ops import _common, linear

    backend_module = sys.modules["grpo_kernels.backend"]
    run = JITFunction.run

    def build(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        try:
            k = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # a kernel that does not compile is a result, not a crash
            text = f"{type(err).__name__}: {' '.join(str(err).split())[-300:]}"
            seen.setdefault((arch, name, text), Build(arch, scenario(), name, "", "", error=text))
            return None
        names = self.arg_names
        const = {names[i[0]]: v for i, v in k.src.constants.items() if i[0] in self.constexprs}
        ptrs = sorted({t.lstrip("*") for n, t in k.src.signature.items() if n in ("hidden_ptr", "logits_ptr", "x_ptr")})
        maxnreg = getattr(k.metadata, "maxnreg", None)
        fusion = getattr(k.metadata, "enable_fp_fusion", True)
        key = (arch, name, json.dumps(k.src.signature), repr(sorted(k.src.constants.items())), repr(k.src.attrs),
               k.metadata.num_warps, k.metadata.num_stages, maxnreg, fusion)  # fmt: skip
        if key not in seen:
            regs, stack = _resources(k.asm["cubin"])
            options = " ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in const.items())
            options += f" maxnreg={maxnreg}" if maxnreg else ""
            options += "" if fusion else " enable_fp_fusion=0"
            seen[key] = Build(arch, scenario(), name, ",".join(ptrs) or "fp32", options, k.metadata.num_warps,
                              k.metadata.num_stages, regs, stack, k.metadata.shared,
                              _loop_instructions(k.asm["cubin"]))  # fmt: skip
        return None

    saved = (_common.interpreting, linear.interpreting, backend_module._interpreting, torch.cuda.get_device_properties)
    active = driver._active  # None until something asks for a driver
    props = SimpleNamespace(multi_processor_count=ARCHS[arch].sms, name=f"sm_{arch}", major=arch // 10)
    driver.set_active(_FakeDriver(arch))
    JITFunction.run = build
    _common.interpreting = linear.interpreting = lambda: False  # the GPU's launch settings
    backend_module._interpreting = lambda: True  # CPU tensors take the Triton path
    torch.cuda.get_device_properties = lambda *a, **k: props
    try:
        yield
    finally:
        JITFunction.run = run
        driver._active = active
        (_common.interpreting, linear.interpreting, backend_module._interpreting,
         torch.cuda.get_device_properties) = saved  # fmt: skip


def scenarios(dtypes: list[str]) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, call) pairs that between them launch every kernel with each of its compile-time options."""
    from grpo_kernels import (
        GRPOLossConfig,
        fused_linear,
        fused_linear_grpo_loss,
        group_advantages,
        grpo_loss,
        linear_logprobs,
    )

    plain, rich = GRPOLossConfig(), GRPOLossConfig(loss_type="grpo", beta=0.04, temperature=0.7, entropy_coef=0.01)
    for scale in ("group", "batch", "none"):
        yield f"group_advantages scale_rewards={scale}", lambda s=scale: group_advantages(
            torch.randn(16), 4, scale_rewards=s)  # fmt: skip
    # the one-launch objective's variants that the losses above do not reach (its inputs are fp32 whatever the logits)
    objective = {
        "cispo old_logps importance_sampling_ratio beta": (GRPOLossConfig(loss_type="cispo", beta=0.04), "token"),
        "cispo old_logps": (GRPOLossConfig(loss_type="cispo"), None),
        "sapo old_logps importance_sampling_ratio beta": (
            GRPOLossConfig(loss_type="sapo", beta=0.04, use_bias_correction_kl=False), "row"),
        "dapo old_logps delta importance_sampling_ratio beta": (GRPOLossConfig(loss_type="dapo", beta=0.04, delta=1.5),
                                                                "token"),
    }  # fmt: skip
    for name, (config, ratio) in objective.items():

        def objective_loss(config=config, ratio=ratio, B=3, T=8, V=64):
            logits = torch.randn(B, T, V, requires_grad=True)
            lp = -torch.rand(B, T) * 4
            isr = None if ratio is None else torch.rand(B, T if ratio == "token" else 1) + 0.5
            refs = {"ref_logps": lp} if config.beta else {}
            grpo_loss(logits, torch.randint(0, V, (B, T)), torch.randn(B), config=config, old_logps=lp,
                      importance_sampling_ratio=isr, **refs).loss.backward()  # fmt: skip

        yield f"grpo_loss {name}", objective_loss
    from grpo_kernels.ops.weight_grad import Tiles, add_weight_grad

    # a chunk's share of d_weight, added or written (timed against addmm_ by chunk_products), by the kernel in use and,
    # in 16 bits, by the persistent one (one of chunk_products --add-tiles' candidates, all 16-bit)
    persistent = Tiles(128, 64, 64, 4, 3, per_sm=2)
    for dname, tiles in itertools.product(dtypes, (None, persistent)):
        if tiles is not None and dname == "fp32":
            continue
        for (sname, (M, N)), accumulate in itertools.product({"aligned": (1024, 128), "odd": (1000, 100)}.items(),
                                                             (True, False)):  # fmt: skip
            kind = "" if tiles is None else " persistent"

            def add(d=DTYPES[dname], M=M, N=N, acc=accumulate, tiles=tiles):
                add_weight_grad(torch.randn(M, N, dtype=d), torch.randn(30, M, dtype=d), torch.randn(30, N, dtype=d),
                                acc, tiles)  # fmt: skip

            yield f"add_weight_grad{kind} {sname} {dname} accumulate={accumulate}", add
    for dname in dtypes:
        dtype = DTYPES[dname]
        for sname, (B, T, H, V) in SHAPES.items():
            ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
            mask = torch.ones(B, T, dtype=torch.bool)
            mask[0, -2:] = False
            refs = {"ref_logps": torch.zeros(B, T)}

            def logits_loss(config, dtype=dtype, B=B, T=T, V=V, ids=ids, adv=adv, mask=mask, refs=refs):
                logits = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
                grpo_loss(logits, ids, adv, mask, config=config, **refs).loss.backward()

            yield f"grpo_loss {sname} {dname}", lambda f=logits_loss: f(plain)
            yield f"grpo_loss {sname} {dname} entropy_coef temperature", lambda f=logits_loss: f(rich)
            for strategy in STRATEGIES:

                def linear_loss(config, extra, strategy=strategy, dtype=dtype, B=B, T=T, H=H, V=V, ids=ids, adv=adv,
                                mask=mask, refs=refs):  # fmt: skip
                    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
                    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
                    bias = torch.randn(V, dtype=dtype, requires_grad=True) if extra else None
                    # tiles and scratch: a budget that splits the vocabulary into a few blocks (a first, middle and
                    # last; scratch's first chunk takes every token here); they have no gradient filtering
                    blocks = {"tiles": 4 * min(64, B * T), "scratch": 8 * (B * T - 2)}
                    chunk_mib = blocks[strategy] * (V // 3) / 2**20 if strategy in blocks else None
                    eps = 1e-6 if extra and strategy not in blocks else None
                    with fused_linear.schedule(strategy, chunk_mib):
                        out = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, config=config, **refs,
                                                     final_logit_softcapping=30.0 if extra else None,
                                                     grad_filter_eps=eps)  # fmt: skip
                        out.loss.backward()
                        with torch.no_grad():
                            linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=extra)

                name = f"fused_linear_grpo_loss {strategy} {sname} {dname}"
                yield name, lambda f=linear_loss: f(plain, False)
                yield f"{name} bias softcap filter entropy_coef", lambda f=linear_loss: f(rich, True)
    for dname in dtypes:  # the scratch strategy's chunks with part of their logits in d_hidden's rows, as on CUDA

        def borrowing(config, dtype=DTYPES[dname], B=1, T=16, H=100, V=1000):
            hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
            # column-major: no first chunk in d_weight's memory, so that the first chunk borrows (3 tokens, its first
            # 384 columns in d_hidden's rows and the other 616 in the buffer, whose rows are padded to 64 elements as
            # on CUDA), then 2-token chunks in the buffer
            weight = torch.randn(H, V, dtype=dtype).t().requires_grad_()
            ids, mask = torch.randint(0, V, (B, T)), None
            with contextlib.ExitStack() as stack:
                for table, value in ((fused_linear.BORROW_ROWS, True), (fused_linear.ROW_ALIGN, 64),
                                     (fused_linear.MIN_CHUNK_TOKENS, 1)):  # fmt: skip
                    stack.enter_context(_item(table, "cpu", value))
                stack.enter_context(fused_linear.schedule("scratch", 2 * 4 * V / 2**20))
                refs = {"ref_logps": torch.zeros(B, T)} if config.beta else {}
                loss = fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), mask, config=config, **refs).loss
                loss.backward()

        name = f"fused_linear_grpo_loss scratch borrowing d_hidden's rows {dname}"
        yield name, lambda f=borrowing: f(plain)
        yield f"{name} entropy_coef", lambda f=borrowing: f(rich)


@contextlib.contextmanager
def _item(table: dict, key, value) -> Iterator[None]:
    """`table[key] = value` for the block's duration."""
    before = table[key]
    table[key] = value
    try:
        yield
    finally:
        table[key] = before


def row_kernels_at(V: int, dtypes: list[str]) -> Iterator[tuple[str, Callable[[], None]]]:
    """The log-prob row kernels as the chunked schedule launches them on a chunk of logits with `V` columns (their
    blocks are wider than at the small shapes above)."""
    from grpo_kernels.ops import logprobs

    for dname in dtypes:

        def launch(dtype=DTYPES[dname]):
            z, ids, g = torch.empty(4, V, dtype=dtype), torch.zeros(4, dtype=torch.int64), torch.zeros(4)
            _, entropy, stats = logprobs.chunk_stats(z, ids, 1.0, 1.0, None)
            logprobs.chunk_grad(z, ids, stats, entropy, g, None, 1.0, 1.0, None)

        yield f"logprobs rows V={V} {dname}", launch


def tile_candidates() -> Iterator[tuple[str, Callable[[], None]]]:
    """The tuner's tile configurations, each launched once in bf16 at `TARGET` on CPU tensors of that size (nothing
    runs; the backward's launcher allocates its gradients, about 1.2 GiB)."""
    from benchmarks.tune_fused import BWD_CANDIDATES, FWD_CANDIDATES, tiles_in_use
    from grpo_kernels.ops import linear

    B, T, H, V = TARGET
    N = B * T
    hidden = torch.empty(N, H, dtype=torch.bfloat16)
    weight = torch.empty(V, H, dtype=torch.bfloat16)
    ids = torch.zeros(N, dtype=torch.int64)
    head = (1.0, 1.0, None)
    for kernel, candidates in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
        for c in candidates:
            tiles = linear.Tiles(*c)

            def launch(kernel=kernel, tiles=tiles):
                with tiles_in_use(linear.tiles_key(kernel, torch.bfloat16, hidden.device), tiles):
                    if kernel == "fwd":
                        linear.linear_fwd(hidden, weight, None, ids, None, head)
                    else:
                        stats, vec = torch.zeros(3, N), torch.zeros(N)
                        linear.linear_bwd(hidden, weight, None, ids, None, stats, vec, vec, None, head,
                                          (True, True, False))  # fmt: skip

            yield f"tune_fused {kernel} {'x'.join(map(str, c))} (BLOCK_N x V x K, warps, stages[, maxnreg])", launch
    from benchmarks.chunk_products import ADD_TILES
    from grpo_kernels.ops.weight_grad import add_weight_grad

    for name, tiles in ADD_TILES.items():  # the d_weight addition's candidates, at a 240-token chunk

        def add(tiles=tiles):
            out = torch.empty(V, H, dtype=torch.bfloat16)
            add_weight_grad(out, torch.empty(240, V, dtype=torch.bfloat16), hidden[:240], tiles=tiles)

        yield f"chunk_products --add-tiles {name}", add


def collect(archs: list[int], dtypes: list[str], tiles: bool, progress: bool = True) -> list[Build]:
    seen: dict = {}
    cases = list(scenarios(dtypes)) + list(row_kernels_at(TARGET[3], dtypes))
    cases += list(tile_candidates()) if tiles else []
    bar = tqdm(total=len(archs) * len(cases), desc="building kernels", unit="case", disable=not progress,
               file=sys.stderr)  # fmt: skip
    current = [""]
    for arch in archs:
        with building(arch, seen, lambda: current[0]):
            for name, call in cases:
                current[0] = name
                call()
                bar.update(1)
    bar.close()
    return list(seen.values())


def markdown(builds: list[Build], command: str) -> str:
    import triton

    lines = [
        "# Triton kernels built for NVIDIA GPUs (no GPU used)",
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), triton {triton.__version__}, "
        f"torch {torch.__version__}.",
        "",
        "Registers per thread, bytes spilled to local memory per thread (ptxas' stack frame; 0 is what a fast kernel "
        "wants) and shared memory per block, as ptxas reports them, the blocks one SM can hold at once (the "
        "fewest its registers, shared memory and warps allow), and the SASS instructions in the kernel's longest "
        "loop, head to back edge (nvdisasm; branches in it that run rarely included); one row per kernel variant "
        "(the compile-time options and the first scenario that launched it). The row kernels' loop streams BLOCK_V "
        "columns of a row: 16 a thread at BLOCK_V = 4,096 with 8 warps.",
        "",
    ]
    for arch in sorted({b.arch for b in builds}):
        spec = ARCHS[arch]
        lines += [f"## sm_{arch} ({spec.name}; {spec.shared_per_block // 1024} KiB of shared memory per block)", "",
                  "| kernel | dtype | warps | stages | registers | spilled B | shared KiB | blocks/SM | loop SASS "
                  "| options | scenario | problems |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        shown = set()  # variants that differ only in specialisation details this table does not show, shown once
        for b in sorted((b for b in builds if b.arch == arch), key=lambda b: (b.kernel, b.dtype, b.options)):
            key = (b.kernel, b.dtype, b.num_warps, b.num_stages, b.registers, b.spill_bytes, b.shared_bytes, b.options,
                   b.loop_instructions, b.error)  # fmt: skip
            if key in shown:
                continue
            shown.add(key)
            lines.append(
                f"| {b.kernel} | {b.dtype} | {b.num_warps} | {b.num_stages} | {b.registers} | {b.spill_bytes} | "
                f"{b.shared_bytes / 1024:.0f} | {b.blocks_per_sm} | {b.loop_instructions or '-'} | {b.options} | "
                f"{b.scenario} | "
                f"{'; '.join(b.problems)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 89, 80], choices=sorted(ARCHS),
                   help="compute capabilities to build for (default: 90 89 80)")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="input dtypes")
    p.add_argument("--tiles", action="store_true", help="also build the tuner's tile configurations (bf16, target)")
    p.add_argument("--out", type=Path, help="write resources.json and resources.md here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    reason = available()
    if reason:
        print(f"cannot build kernels here: {reason}", file=sys.stderr)
        return 2
    builds = collect(args.arch, args.dtypes, args.tiles, progress=not args.no_progress)
    command = "python -m benchmarks.kernel_resources " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(builds, command.strip())
    print(text)
    if args.out:
        import triton

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "resources.md").write_text(text + "\n")
        rows = [dict(dataclasses.asdict(b), blocks_per_sm=b.blocks_per_sm, problems=b.problems) for b in builds]
        meta = {"triton": triton.__version__, "torch": torch.__version__, "command": command.strip()}
        (args.out / "resources.json").write_text(json.dumps({"meta": meta, "builds": rows}, indent=1) + "\n")
    bad = [b for b in builds if b.problems and not b.scenario.startswith(("tune_fused", "chunk_products"))]
    for b in bad:
        print(f"sm_{b.arch} {b.kernel} {b.dtype} {b.options} ({b.scenario}): {'; '.join(b.problems)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
