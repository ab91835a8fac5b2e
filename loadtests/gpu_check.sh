#!/usr/bin/env bash
# Every GPU measurement in one call (~5 min, at most ~8 min, on an H100/H200), random weights at real sizes:
#   1. the patch-info-mining kernels (kernels/gpu_check.sh): tests, accuracy, timings, variants;
#   2. the vision front end, bf16, normal and HD (engine/gpu_check.sh): images/s and memory, official vs ours;
#   3. the SDXL UNet denoising step at 1024², bf16 (loadtests/gpu_sdxl.py).
# Run where python3 has CUDA torch + triton + transformers:  bash loadtests/gpu_check.sh OUTDIR  (the device tool
# passes $OUT). Then, back here: python -m loadtests.gpu_report --from OUTDIR  (copies the JSON into benchmarks/ and
# rewrites the GPU sections of BENCHMARKS.md). vLLM is not needed (nor installed) there. Never part of CI.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
start=$(date +%s)
failed=()

# diffusers is pure Python: when the GPU machine's python3 lacks it, borrow the copy of this checkout's .venv
# (carried along) without putting the rest of that site-packages (CPU torch) on the path.
if ! python3 -c "import diffusers" 2>/dev/null; then
  src=$(ls -d .venv/lib/python3*/site-packages/diffusers 2>/dev/null | head -n 1)
  if [ -n "$src" ]; then
    shim=$(mktemp -d) && ln -s "$PWD/$src" "$shim/diffusers" && export PYTHONPATH="$PYTHONPATH:$shim"
  fi
fi

timeout 250 bash kernels/gpu_check.sh "$out" || failed+=(kernels)
timeout 120 bash engine/gpu_check.sh "$out" || failed+=(encoder)
timeout 100 python3 -m loadtests.gpu_sdxl --json "$out/sdxl_gpu.json" 2>&1 | grep -v -i warn | tee "$out/sdxl_gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed+=(sdxl)

echo "gpu_check: $(( $(date +%s) - start )) s; failed: ${failed[*]:-none}" | tee "$out/gpu_check_summary.txt"
[ ${#failed[@]} = 0 ]
