#!/usr/bin/env bash
# second GPU call: tiles' aligned vocabulary blocks (before/after) at Qwen's vocabulary, an unaligned vocabulary with
# the default, then the CUDA tests the first call's deadline skipped
set -uo pipefail
out="${OUT:-/tmp/out}"; site=/tmp/grpo-bench-site; s=/tmp/grpo-s; mkdir -p "$out" "$s"
exec > >(tee "$out/log.txt") 2>&1
T0=$SECONDS
fits() { if [ $((SECONDS - T0 + $1)) -gt 400 ]; then echo "skipped $2 at $((SECONDS - T0)) s"; return 1; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET GRPO_KERNELS_BACKEND GRPO_KERNELS_LINEAR
for v in aligned unaligned; do
  echo "== tiles, $v blocks $((SECONDS - T0)) s"
  fits 40 "$v" && timeout 40 python3 - "$s/tiles-qwen-$v" "$v" <<'PY'
import sys
import grpo_kernels.fused_linear as fl
out, v = sys.argv[1], sys.argv[2]
if v == "unaligned":  # the widths before BLOCK_COLUMNS
    fl.block_width = lambda vocab, most, even=False: (lambda m: -(-vocab // -(-vocab // m)) if even else m)(max(1, min(vocab, most)))
from benchmarks.__main__ import main
sys.exit(main(["--device", "cuda", "--no-progress", "--out", out, "--ops", "fused_linear", "--shapes",
               "8x1024x4096x151936", "--providers", "ours-tiles", "floor"]))
PY
done
echo "== default, GPT-2's vocabulary and its padded size $((SECONDS - T0)) s"
fits 45 gpt2 && timeout 45 python3 -m benchmarks --device cuda --no-progress --out $s/gpt2 --ops fused_linear \
  --shapes 8x1024x768x50257 8x1024x768x50304 --providers ours-triton trl floor
echo "== tests $((SECONDS - T0)) s"
xd=(); python3 -c "import xdist" 2>/dev/null && xd=(-n 12)
left=$((400 - (SECONDS - T0) - 20))
export GRPO_KERNELS_TEST_FAILURES="$out/failures.txt" GRPO_KERNELS_TEST_DEADLINE=$(($(date +%s) + left))
setsid timeout --kill-after=10 $((left + 30)) python3 -m pytest tests/test_grpo_loss.py tests/test_memory.py \
  tests/test_compile.py tests/test_edge_cases.py tests/test_validation.py tests/test_benchmarks.py \
  tests/test_advantages.py tests/test_properties.py tests/test_loss_vs_trl.py tests/test_fused_linear.py \
  tests/test_logprobs.py "${xd[@]}" -q -rfE --tb=short -p no:cacheprovider &
pid=$!; wait $pid; echo "tests exit $?"; kill -9 -- -$pid 2>/dev/null
echo "== done $((SECONDS - T0)) s"
tar czf "$out/runs.tgz" -C "$s" .
ls -l "$out"
