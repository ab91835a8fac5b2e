#!/usr/bin/env bash
# GPU check of the vision front end (~1 min on an H100/H200): images/s and peak memory, official path vs ours,
# bf16, random weights at the real sizes. Run where python3 has CUDA torch + triton + transformers:
#   bash engine/gpu_check.sh OUTDIR        (the device tool passes $OUT). Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 150 python3 -m engine.bench_encoder --device cuda --dtype bf16 --json "$out/encoder_gpu.json" 2>&1 \
  | grep -v -i warn | tee "$out/encoder_gpu.log"
