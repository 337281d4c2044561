#!/usr/bin/env bash
# one GPU call: CUDA tests, the target shape (default, tiles, floor; profiled), tiles variants, small N, row kernels
set -uo pipefail
out="${OUT:-/tmp/out}"; site=/tmp/grpo-bench-site; s=/tmp/grpo-s; mkdir -p "$out" "$s"
exec > >(tee "$out/log.txt") 2>&1
T0=$SECONDS
fits() { if [ $((SECONDS - T0 + $1)) -gt 560 ]; then echo "skipped $2 at $((SECONDS - T0)) s"; return 1; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET GRPO_KERNELS_BACKEND GRPO_KERNELS_LINEAR
python3 -c "
import torch, triton, transformers; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, transformers.__version__)
import grpo_kernels.fused_linear as fl; d=torch.device('cuda')
print('sums_in_fp32 bf16', fl.sums_in_fp32(d, torch.bfloat16), 'fp16', fl.sums_in_fp32(d, torch.float16))"
echo "== tests $((SECONDS - T0)) s"
xd=(); python3 -c "import xdist" 2>/dev/null && xd=(-n 8)
export GRPO_KERNELS_TEST_FAILURES="$out/failures.txt" GRPO_KERNELS_TEST_DEADLINE=$(($(date +%s) + 100))
setsid timeout --kill-after=10 125 python3 -m pytest tests/test_logprobs.py tests/test_fused_linear.py \
  tests/test_grpo_loss.py tests/test_memory.py tests/test_compile.py tests/test_edge_cases.py tests/test_validation.py \
  tests/test_benchmarks.py tests/test_advantages.py tests/test_properties.py tests/test_loss_vs_trl.py "${xd[@]}" -q -rfE --tb=short -p no:cacheprovider &
pid=$!; wait $pid; echo "tests exit $?"; kill -9 -- -$pid 2>/dev/null
unset GRPO_KERNELS_TEST_FAILURES GRPO_KERNELS_TEST_DEADLINE
B="python3 -m benchmarks --device cuda --no-progress"
TGT="--ops fused_linear --shapes 8x1024x4096x131072"
echo "== target: default, tiles, floor (profiled) $((SECONDS - T0)) s"
fits 80 target && timeout 80 $B --profile --out $s/target $TGT --providers ours-triton ours-tiles floor
# tiles variants: name, chunk MiB, budget bytes per token per hidden unit (16: 1,024 tokens at 64 MiB), fp32 sums
for v in old-64:64:16:0 new-64:64:16:1 new-64-1536:64:10.667:1 new-56-1792:56:8:1 new-48-1536:48:8:1; do
  IFS=: read -r name mib div fp32 <<< "$v"
  fits 35 "$name" || continue
  echo "== tiles $name $((SECONDS - T0)) s"
  GRPO_KERNELS_CHUNK_MIB=$mib timeout 35 python3 - "$s/tiles-$name" "$div" "$fp32" <<'PY'
import sys
import grpo_kernels.fused_linear as fl
out, div, fp32 = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
def tile_tokens(hidden_size, device, budget=None):
    budget = fl._chunk_bytes(fl._kind(device)) if budget is None else budget
    return max(1, int(budget // (div * max(hidden_size, 1))))
fl.tile_tokens = tile_tokens
if not fp32:
    fl.sums_in_fp32 = lambda device, dtype: False
from benchmarks.__main__ import main
sys.exit(main(["--device", "cuda", "--no-progress", "--out", out, "--ops", "fused_linear", "--shapes",
               "8x1024x4096x131072", "--providers", "ours-tiles"]))
PY
done
echo "== default at 120 MiB $((SECONDS - T0)) s"
fits 35 c120 && GRPO_KERNELS_CHUNK_MIB=120 timeout 35 $B --out $s/triton-120 $TGT --providers ours-triton
echo "== small N profiled $((SECONDS - T0)) s"
fits 50 smalln && timeout 50 $B --profile --out $s/small-n --ops fused_linear --shapes 4x1024x896x151936 --providers ours-triton trl floor
echo "== loss from logits $((SECONDS - T0)) s"
fits 60 lfl && timeout 60 $B --profile --out $s/logits --ops loss_from_logits --shapes 1x1024x131072 16x1024x131072 --providers ours-triton liger trl floor
echo "== log-probs $((SECONDS - T0)) s"
fits 40 lp && timeout 40 $B --out $s/logprobs --ops linear_logprobs --shapes 8x1024x4096x131072 --providers ours-triton trl cce floor
echo "== done $((SECONDS - T0)) s"
tar czf "$out/runs.tgz" -C "$s" .
ls -l "$out"
