#!/usr/bin/env bash
# Every GPU measurement in one call (~7 min, at most ~11 min, on an H100/H200), random weights at real sizes:
#   1. the patch-info-mining kernels: the kernel tests on the GPU, then accuracy, timings and variants
#      (bench/kernels_gpu.py -> kernels_gpu.json);
#   2. the vision front end, bf16, normal and HD: images/s and memory, official vs ours (bench/encoder.py ->
#      encoder_gpu.json);
#   3. the SDXL UNet denoising step at 1024², bf16 (bench/sdxl_gpu.py -> sdxl_gpu.json);
#   4. SDXL at 1024² through the worker's runner: text-to-image, img2img and inpainting edits with two streamed
#      previews (bench/sdxl_edit_gpu.py -> sdxl_edit_gpu.json).
# Run where python3 has CUDA torch + triton + transformers:  bash bench/gpu_check.sh OUTDIR  (the device tool
# passes $OUT). Then, back here: python -m bench.report --from OUTDIR  (copies the JSON into bench/results/ and
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

# step NAME SECONDS LOG COMMAND...: one part with a deadline; its whole output goes to OUT/LOG, the same less the
# libraries' warning lines to the terminal. A failed part is noted and the next one still runs.
step() {
  local name=$1 seconds=$2 log=$3
  shift 3
  timeout "$seconds" "$@" 2>&1 | tee "$out/$log" | grep -v -E 'Warning:|^WARNING'
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia_smi.txt"
# Correctness first: the CPU suite's kernel tests, now with the compiled kernels on the GPU.
step kernel-tests 120 kernels_gpu_tests.log python3 -m pytest tests/kernels -q -x -p no:cacheprovider
step kernels 200 kernels_gpu.log python3 -m bench.kernels_gpu --out "$out/kernels_gpu.json"
step encoder 150 encoder_gpu.log python3 -m bench.encoder --device cuda --dtype bf16 --json "$out/encoder_gpu.json"
step sdxl 100 sdxl_gpu.log python3 -m bench.sdxl_gpu --json "$out/sdxl_gpu.json"
step sdxl-edit 240 sdxl_edit_gpu.log python3 -m bench.sdxl_edit_gpu --json "$out/sdxl_edit_gpu.json"

echo "gpu_check: $(( $(date +%s) - start )) s; failed: ${failed[*]:-none}" | tee "$out/gpu_check_summary.txt"
[ ${#failed[@]} = 0 ]
