#!/usr/bin/env bash
# The GPU run on a machine with no network: the kernel tests on CUDA (compiled Triton, bf16), the full benchmark sweep,
# then the opt-in strategies of the fused linear loss (scratch, tiles, fused kernels, vocab blocks, chunk budgets,
# gradient filtering on peaked inputs; profiled kernel by kernel) on the issue-3 target shape in processes of their own
# (a fault there cannot take the sweep with it), the Triton d_weight addition's launch configurations against cuBLAS
# (and the scratch strategy with the fastest, where one wins), one chunk's products at chunk sizes from 128 to 2,048
# tokens, the default at a small N and the loss from logits (profiled), vocabularies whose logits rows are not 16-byte
# aligned, with the fused kernels' tile tuner. The tests of what changed or failed last run first (FIRST_TESTS, a pytest -k
# expression over tests/test_fused_linear.py; FIRST_TESTS= for none). Under 10 minutes: first tests not started 60 s
# in and the others not started 90 s later are skipped with that reason, no new shape is started 170 s into the
# sweep, and no later stage starts that could end past 585 s.
#
#   OUT=DIR bash benchmarks/gpu_run.sh          (DIR defaults to runs/gpu)
#   SWEEP_RESUME=benchmarks/results/h200/results.json OUT=DIR bash benchmarks/gpu_run.sh
#                                               (the sweep measures only the shapes that file lacks: --resume)
#   SWEEP_SECONDS=0 OUT=DIR bash benchmarks/gpu_run.sh
#                                               (no sweep: the time goes to the stages after it, in their order,
#                                               what has not been measured on a GPU yet first)
#
# Writes to DIR: log.txt (this script's output: GPU, versions, tests, sweep), results.json, results.md,
# fused_linear.png, linear_logprobs.png, loss_from_logits.png, advantages.png, fused.tgz (the opt-in strategies' results folder) and, when a
# test fails, failures.txt (each failure's traceback, written as it happens).
# Keep results.json, results.md and the plots in benchmarks/results/<gpu>/.
#
# It needs PyTorch, Triton, transformers, matplotlib, tqdm, pytest, pytest-benchmark and hypothesis on the machine
# (pytest-xdist and pytest-timeout are used when present), and the other packages as pure-Python wheels in .whl/ at
# the repository root, which it installs into a folder of its own:
#   trl-1.16.0-py3-none-any.whl
#   liger_kernel-0.8.5-py3-none-any.whl
#   cut_cross_entropy-25.1.1-py3-none-any.whl
#   datasets-5.2.0-py3-none-any.whl, dill-0.4.1-py3-none-any.whl, multiprocess-0.70.19-py312-none-any.whl (trl's)
# Fetch them where there is network (for the machine's Python 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/gpu}"
site="${GPU_RUN_SITE:-/tmp/grpo-bench-site}"
scratch="${TMPDIR:-/tmp}/grpo-gpu-run"
first_tests="${FIRST_TESTS-scratch or borrow or workspace or fp32_sums or cuda_syncs}"  # first (pytest -k); empty: none
first_seconds="${FIRST_SECONDS:-60}"   # first tests not started by then are skipped
test_seconds="${TEST_SECONDS:-90}"     # tests not started by then are skipped
sweep_seconds="${SWEEP_SECONDS:-170}"  # no new shape is started after this; the shape under way finishes
end_seconds="${END_SECONDS:-585}"      # no later stage starts that could run past this
mkdir -p "$out" "$scratch"

versions() {
  python3 - <<'PY'
import importlib.metadata as md
import torch
assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "datasets", "matplotlib",
             "pytest-xdist", "pytest-timeout"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
try:
    import trl.trainer.grpo_trainer  # noqa: F401  (the TRL baselines and tests need it, and it needs datasets)
except Exception as err:
    print(f"trl does not import: {type(err).__name__}: {err}")
PY
}

# The opt-in fused kernels' fp32 d_hidden at large vocabularies was 16 to 211 times PyTorch's error on the H200
# (benchmarks/results/h200/closed-form/); its sums over the vocabulary are now compensated (ops/linear.py). The
# forward's log-probs and log-sum-exp against fp64, and the backward's d_hidden in units in the last place of its
# largest entry, each next to PyTorch's fp32 error.
fused_accuracy() {
  python3 - <<'PY'
import torch
from grpo_kernels.ops.linear import linear_bwd, linear_fwd

dev = "cuda"
for B, T, H, V in ((2, 3, 12, 151_936), (2, 2, 8, 262_144), (4, 64, 256, 151_936)):
    torch.manual_seed(0)
    h, w = torch.randn(B * T, H), torch.randn(V, H) / H**0.5 * 2
    ids, g = torch.randint(0, V, (B * T,)), torch.randn(B * T)
    h, w, ids, g = (x.to(dev) for x in (h, w, ids, g))
    z64 = h.double() @ w.double().t()
    lse64 = z64.logsumexp(-1)
    logp64 = z64.gather(1, ids[:, None])[:, 0] - lse64
    p64 = (z64 - lse64[:, None]).exp()
    dh64 = g.double()[:, None] * (w.double()[ids] - p64 @ w.double())
    z32 = h @ w.t()
    logp32 = z32.log_softmax(-1).gather(1, ids[:, None])[:, 0]
    p32 = z32.softmax(-1)
    dh32 = g[:, None] * (w[ids] - p32 @ w)
    head = (1.0, 1.0, None)
    logp, ent, stats = linear_fwd(h, w, None, ids, None, head)
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    print(f"{B * T}x{H}x{V}: logp error {err(logp, logp64):.2e} (PyTorch fp32 {err(logp32, logp64):.2e}); "
          f"log-sum-exp {err(stats[0] + stats[1], lse64):.2e} (PyTorch {err(z32.logsumexp(-1), lse64):.2e}); "
          f"logits of fp32 PyTorch {err(z32, z64):.2e}")
    dh, _, _ = linear_bwd(h, w, None, ids, None, stats, ent, g, None, head, (True, False, False))
    ulp = dh64.abs().max().item() * 2**-24
    print(f"  d_hidden: error {err(dh, dh64):.2e} = {err(dh, dh64) / ulp:.1f} units in the last place of its largest "
          f"entry (PyTorch fp32 {err(dh32, dh64) / ulp:.1f})")
    # the backward alone: the forward's statistics (row max, log-sum, reciprocal sum) replaced by fp64's, rounded once
    m64 = z64.max(-1).values
    s64 = (z64 - m64[:, None]).exp().sum(-1)
    exact = torch.stack((m64, s64.log(), s64.reciprocal())).float()
    s_ref = (z64 - stats[0].double()[:, None]).exp().sum(-1)  # the sum the kernel's reciprocal stands for
    dh_exact, _, _ = linear_bwd(h, w, None, ids, None, exact, ent, g, None, head, (True, False, False))
    print(f"  with fp64's statistics: {err(dh_exact, dh64) / ulp:.1f}; the forward's reciprocal sum off by "
          f"{(stats[2].double() * s_ref - 1).abs().max().item() / 2**-24:.1f} units, "
          f"its row max by {(stats[0].double() - m64).abs().max().item():.2e}")
PY
}

# test_fused_kernels_fp32_sums_over_large_vocabularies' failing case on the H200 (6.2 units in the last place against
# a bound of 4; 1.1 in Triton's interpreter, with 1 split of the vocabulary or with 264 as on an H200): its inputs,
# and where the error comes from. With the entropy bonus, d_hidden reads the forward's entropy (its error times
# |dL/dentropy| * |sum p w|, about 1 here, reaches d_hidden whole) and its statistics.
fused_entropy_accuracy() {
  python3 - <<'PY'
import sys

import torch

sys.path.insert(0, "tests")
from helpers import LARGE_VOCABULARY_CASES, large_vocabulary_case  # noqa: E402 (the test's own inputs)

from grpo_kernels.ops.linear import linear_bwd, linear_fwd  # noqa: E402

for (N, H, V), entropy in LARGE_VOCABULARY_CASES.values():
    case = large_vocabulary_case((N, H, V), entropy)
    z64, p64, ent64, w, exact = case.z64, case.p64, case.ent64, case.w, case.d_hidden
    ulp = exact.abs().max().item() * 2**-24
    head = (1.0, 1.0, None)
    hc, wc, ic, gc = (x.cuda() for x in (case.h, case.w, case.ids, case.g))
    gec = None if case.g_ent is None else case.g_ent.cuda()
    _, ent, stats = linear_fwd(hc, wc, None, ic, None, head)
    def dh_error(st, en):
        d, _, _ = linear_bwd(hc, wc, None, ic, None, st, en, gc, gec, head, (True, False, False))
        return (d.double().cpu() - exact).abs().max().item() / ulp
    m64 = z64.max(-1).values
    s64 = (z64 - m64[:, None]).exp().sum(-1)
    stats64 = torch.stack((m64, s64.log(), s64.reciprocal())).float().cuda()
    s_ref = (z64 - stats[0].double().cpu()[:, None]).exp().sum(-1)
    ent_ulp = ((ent.double().cpu() - ent64).abs() / (ent64.abs() * 2**-24)).max().item()
    print(f"{N}x{H}x{V} entropy={entropy}: d_hidden {dh_error(stats, ent):.1f} units; with fp64's entropy "
          f"{dh_error(stats, ent64.float().cuda()):.1f}, with fp64's statistics {dh_error(stats64, ent):.1f}, both "
          f"{dh_error(stats64, ent64.float().cuda()):.1f}; the forward's entropy off by {ent_ulp:.1f} units of its "
          f"own, its reciprocal sum by {(stats[2].double().cpu() * s_ref - 1).abs().max().item() / 2**-24:.1f}, "
          f"|sum p w| up to {(p64 @ w.double()).abs().max().item():.2f}")
PY
}

run() {
  echo "== GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || return 1

  echo "== wheels from .whl/"
  ls .whl/*.whl || { echo "no wheels in .whl/: see the comment at the top of $0" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || return 1
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  unset TRITON_INTERPRET GRPO_KERNELS_BACKEND GRPO_KERNELS_LINEAR
  versions || return 1

  # the files that only a GPU can tell about first (compiled Triton, bf16, the CUDA allocator, the benchmark suite on
  # CUDA); the loss math against TRL, the same on any device, last: a deadline skips the tests not yet started
  # the tests of what changed last and of what failed last first ($first_tests, a pytest -k expression over
  # tests/test_fused_linear.py, for $first_seconds), then the files that only a GPU can tell about (compiled Triton,
  # bf16, the CUDA allocator, the benchmark suite on CUDA), the loss math against TRL, the same on any device, last: a
  # deadline skips the tests not yet started
  echo "== tests (CUDA): first '$first_tests', then the kernels, compile, memory, the benchmark suite, the loss against TRL"
  local tests=0 extra=()
  python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)
  python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
  export GRPO_KERNELS_TEST_FAILURES="$out/failures.txt"
  # each in a process group of its own, killed whole at the end: xdist workers left running by the time limit would
  # share the GPU with the benchmarks below
  local group=() pid
  command -v setsid > /dev/null && group=(setsid)
  if [ -n "$first_tests" ]; then
    export GRPO_KERNELS_TEST_DEADLINE=$(($(date +%s) + first_seconds))
    ${group[@]+"${group[@]}"} timeout --kill-after=10 $((first_seconds + 30)) python3 -m pytest tests/test_fused_linear.py \
      -k "$first_tests" "${extra[@]}" -q -rfE --tb=short -p no:cacheprovider &
    pid=$!
    wait "$pid" || tests=$?
    [ ${#group[@]} -gt 0 ] && kill -9 -- -"$pid" 2> /dev/null
  fi
  export GRPO_KERNELS_TEST_DEADLINE=$(($(date +%s) + test_seconds))
  ${group[@]+"${group[@]}"} timeout --kill-after=10 $((test_seconds + 30)) \
    python3 -m pytest tests/test_fused_linear.py tests/test_weight_grad.py tests/test_logprobs.py \
    tests/test_grpo_loss.py tests/test_advantages.py tests/test_compile.py tests/test_memory.py tests/test_benchmarks.py \
    tests/test_edge_cases.py tests/test_validation.py tests/test_properties.py tests/test_loss_vs_trl.py \
    ${first_tests:+-k "not ($first_tests)"} "${extra[@]}" -q -rfE --tb=short -p no:cacheprovider &
  pid=$!
  local rc=0
  wait "$pid" || rc=$?
  [ "$tests" -eq 0 ] && tests=$rc
  [ ${#group[@]} -gt 0 ] && kill -9 -- -"$pid" 2> /dev/null
  unset GRPO_KERNELS_TEST_FAILURES GRPO_KERNELS_TEST_DEADLINE

  echo "== the fused kernels' fp32 log-probs and d_hidden at large vocabularies"
  timeout --kill-after=5 60 bash -c "$(declare -f fused_entropy_accuracy); fused_entropy_accuracy" || true
  timeout --kill-after=5 60 bash -c "$(declare -f fused_accuracy); fused_accuracy" || true

  echo "== benchmark sweep (the opt-in strategies apart, below)"
  local sweep=0 providers resume=()
  if [ "$sweep_seconds" -le 0 ]; then echo "skipped: SWEEP_SECONDS=$sweep_seconds"; fi
  if [ -n "${SWEEP_RESUME:-}" ]; then cp "$SWEEP_RESUME" "$out/results.json" && resume=(--resume); fi
  providers=$(python3 -c "from benchmarks.providers import PROVIDERS as P
print(*sorted({p.name for p in P} - {'ours-fused', 'ours-vocab', 'ours-tiles', 'ours-scratch', 'ours-scratch-tadd',
                                     'ours-scratch-own', 'ours-scratch-adds', 'ours-scratch-after', 'ours-filter',
                                     'ours-compiled'}))")
  # shellcheck disable=SC2086
  [ "$sweep_seconds" -gt 0 ] && { timeout --kill-after=10 $((sweep_seconds + 45)) python3 -m benchmarks --device cuda \
    --out "$out" --no-progress --time-limit "$sweep_seconds" --max-run-ms 1000 ${resume[@]+"${resume[@]}"} \
    --providers $providers || sweep=$?; }
  if [ "$sweep" -ne 0 ] && [ -f "$out/results.json" ]; then
    echo "sweep exited with $sweep: tables and plots from the rows it saved"
    python3 -m benchmarks --report-only --out "$out" || true
  fi

  echo "== the fused linear loss's strategies, budgets and shapes apart, what has not been measured first"
  local fused=0
  rm -rf "$scratch/fused"  # a machine that is reused keeps no earlier run's results
  # each stage starts only when its time limit still fits before the run's end ($end_seconds)
  fits() { if [ $((SECONDS + $1)) -gt "$end_seconds" ]; then echo "skipped $2: the run is at $SECONDS s"; return 1; fi; }
  local B="python3 -m benchmarks --device cuda --no-progress" target="--ops fused_linear --shapes 8x1024x4096x131072"
  # the scratch strategy (the first chunk's 4,096 tokens' logits in d_weight's memory, their fp32 d_hidden sums in
  # d_hidden's, then chunks of 356 down to 220 tokens: 60 MiB of bf16 logits and d_hidden's unwritten rows) at the
  # target shape, profiled; with the first chunk's sums after its logits (3,855 tokens, as timed last run), and
  # without the borrowed rows (240-token chunks), next to tiles: the 64 MiB target's candidates; the Triton d_weight
  # addition's configurations come next (they lost to cuBLAS last run), then the other strategies and the default at
  # the same budget; ours-scratch-adds differs from ours-scratch only where PyTorch's addmm sums bf16 products in
  # fp32, not 2.11
  # shellcheck disable=SC2086
  fits 135 "the scratch strategy" && { timeout --kill-after=5 130 $B --profile --out "$scratch/fused/scratch" \
    $target --providers ours-scratch ours-scratch-after ours-scratch-own ours-tiles floor || fused=$?; }
  # the Triton d_weight addition (ops/weight_grad.py) under other launch configurations, the persistent kernel
  # (the next tile of d_weight loaded ahead of the current one's products) among them, at the scratch strategy's
  # chunk sizes next to cuBLAS's addmm_ (0.905 ms at 240 tokens on the H200, the Triton default's 1.27): the 50 ms
  # on an H100 needs those additions' traffic under their arithmetic
  # (chunk sizes that are multiples of 16: one build of each configuration serves both; chunk_products.json keeps
  # what was measured if the time limit cuts the stage short)
  fits 95 "the d_weight addition's configurations" && { timeout --kill-after=5 90 python3 -m benchmarks.chunk_products \
    --tokens 240 352 --runs 10 --add-tiles --out "$scratch/fused/add-tiles" || fused=$?; }
  # ...and where one of them beats cuBLAS's addmm_ at both sizes (chunk_products.best_tiles), the scratch strategy
  # with its additions by that configuration (ours-scratch-tadd, weight_grad.TILES set to it) next to cuBLAS's
  fits 60 "scratch with the fastest Triton addition" && { timeout --kill-after=5 55 python3 - \
    "$scratch/fused/add-tiles/chunk_products.json" "$scratch/fused/scratch-tadd" <<'PY' || fused=$?; }
import json
import sys

from benchmarks import chunk_products
from grpo_kernels.ops import weight_grad

try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError) as err:
    sys.exit(f"no configurations measured: {err}")
best = chunk_products.best_tiles(rows)
if best is None:
    print("no configuration of the Triton addition beats addmm_: scratch with it not timed")
    sys.exit(0)
print(f"the fastest Triton addition: {best} ({chunk_products.ADD_TILES[best]})")
weight_grad.TILES["low"] = chunk_products.ADD_TILES[best]
from benchmarks.__main__ import main

sys.exit(main(["--device", "cuda", "--no-progress", "--out", sys.argv[2], "--ops", "fused_linear", "--shapes",
               "8x1024x4096x131072", "--providers", "ours-scratch", "ours-scratch-tadd", "floor"]))
PY
  # the other strategies, timed before (after the addition's configurations, which are new): --profile: where each
  # strategy's time goes, kernel by kernel (results.md's last section, profiles/)
  # shellcheck disable=SC2086
  fits 120 "the strategies" && { timeout --kill-after=10 110 $B --profile --out "$scratch/fused/strategies" $target \
    --providers ours-triton ours-tiles ours-fused ours-vocab floor || fused=$?; }
  # the default inside torch.compile (inductor), next to eager: the compiled custom ops' single pass, whose gradients
  # are handed over in place (not yet timed on a GPU; the first call compiles)
  # shellcheck disable=SC2086
  fits 100 "the compiled loss" && { timeout --kill-after=5 95 $B --out "$scratch/fused/compiled" $target \
    --providers ours-compiled ours-triton floor || fused=$?; }
  # the default at 120 MiB of fp32 logits (60 MiB of bf16 logits, 240-token chunks), profiled: under 64 MiB its three
  # products would fit the target if the small chunks' products kept their speed
  # shellcheck disable=SC2086
  fits 55 "the default at 120 MiB" && { GRPO_KERNELS_CHUNK_MIB=120 timeout --kill-after=5 50 $B --profile \
    --out "$scratch/fused/ours-triton-120-mib" $target --providers ours-triton || fused=$?; }
  # the loss from materialised logits (its derivative in closed form, no autograd graph through the loss's small
  # ops): profiled next to Liger's triton_grpo_loss and TRL, at a host-bound and a device-bound N
  # shellcheck disable=SC2086
  fits 50 "loss from logits" && { timeout --kill-after=5 45 $B --profile --out "$scratch/fused/loss-from-logits" \
    --ops loss_from_logits --shapes 1x1024x131072 16x1024x131072 --providers ours-triton liger trl floor \
    || fused=$?; }
  # vocabularies whose rows of logits are not 16-byte aligned: GPT-2's (50,257) next to 50,304, for the default (its
  # chunks' rows padded to 64 elements, its logits and d_weight products over the first 50,240 columns and the last
  # 17 apart), profiled, and TRL; tiles at Qwen's (151,936: blocks of whole multiples of 64 columns)
  # shellcheck disable=SC2086
  fits 50 "unaligned vocabularies" && { timeout --kill-after=5 45 $B --profile --out "$scratch/fused/gpt2-vocab" \
    --ops fused_linear --shapes 8x1024x768x50257 8x1024x768x50304 --providers ours-triton trl floor || fused=$?; }
  # one chunk's three products at chunk sizes from 128 to 2,048 tokens (the single-pass schedule under a small
  # budget), d_hidden's also split over the vocabulary, the d_weight addition by the Triton kernel of
  # ops/weight_grad.py next to cuBLAS's: which product loses its speed in small chunks, and whether loading d_weight's
  # tiles ahead of the products wins it back
  fits 50 "chunk products" && { timeout --kill-after=5 45 python3 -m benchmarks.chunk_products --runs 10 \
    --out "$scratch/fused/chunk-products" || fused=$?; }
  # shellcheck disable=SC2086
  fits 40 "tiles at V = 151,936" && { timeout --kill-after=5 35 $B --out "$scratch/fused/tiles-qwen" \
    --ops fused_linear --shapes 8x1024x4096x151936 --providers ours-tiles floor || fused=$?; }
  # other chunk budgets (MiB of fp32 logits) than the defaults (chunked 1,024, vocab blocks 128, tiles 64): tiles at
  # 128 MiB keep 64 MiB of bf16 logits and 2,048-token chunks (32 MiB of fp32 d_hidden rows) at H = 4,096, at 32 MiB
  # 16 + 8 MiB; the default at 512 MiB 256 MiB (its d_weight product still compute-bound at 1,024-token chunks);
  # vocab blocks at 96 MiB keep 48 MiB
  local run
  for run in ours-tiles:128 ours-tiles:32 ours-triton:512 ours-vocab:96; do
    fits 40 "$run" || continue
    # shellcheck disable=SC2086
    GRPO_KERNELS_CHUNK_MIB=${run#*:} timeout --kill-after=5 35 $B --out "$scratch/fused/${run%:*}-${run#*:}-mib" \
      $target --providers "${run%:*}" || fused=$?
  done
  # gradient filtering on peaked inputs (a trained model's softmax), next to the exact default and the references
  # shellcheck disable=SC2086
  fits 80 "peaked inputs" && { timeout --kill-after=10 70 $B --out "$scratch/fused/peaked" $target --inputs peaked \
    --providers ours-triton ours-filter cce floor || fused=$?; }
  # small N, where the default is bound by the host (the objective's small ops per chunk): profiled next to TRL
  # shellcheck disable=SC2086
  fits 50 "small N" && { timeout --kill-after=5 45 $B --profile --out "$scratch/fused/small-n" --ops fused_linear \
    --shapes 4x1024x896x151936 --providers ours-triton trl floor || fused=$?; }
  # the old/reference log-prob pass with the fused forward kernel (no logits chunk at all) next to the default
  # shellcheck disable=SC2086
  fits 55 "fused log-probs" && { timeout --kill-after=10 45 $B --out "$scratch/fused/logprobs" --ops linear_logprobs \
    --shapes 8x1024x4096x131072 --providers ours-triton ours-fused trl cce floor || fused=$?; }
  # the fused kernels' tile configurations (TILES in grpo_kernels/ops/linear.py), forward and backward
  fits 95 "the tile tuner" && { timeout --kill-after=10 85 python3 -m benchmarks.tune_fused --time-limit 55 \
    --out "$scratch/fused/tune" || fused=$?; }
  [ -d "$scratch/fused" ] && tar czf "$out/fused.tgz" -C "$scratch" fused && cat "$scratch"/fused/*/*.md

  echo "== done: tests exit $tests, sweep exit $sweep, fused exit $fused"
  ls -l "$out"
  [ "$tests" -eq 0 ] && [ "$sweep" -eq 0 ] && [ "$fused" -eq 0 ]
}

run 2>&1 | tee "$out/log.txt"
