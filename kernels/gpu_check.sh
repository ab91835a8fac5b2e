#!/usr/bin/env bash
# The GPU check of the mining kernels, in one go (~3-5 min on an H100/H200). Run on a machine whose python3 has
# CUDA torch + triton:  bash kernels/gpu_check.sh OUTDIR   (the device tool passes $OUT). Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia_smi.txt"
# Correctness first: the CPU test suite's kernel tests, now with the compiled kernel on the GPU.
timeout 120 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider 2>&1 | tail -n 15 | tee "$out/kernels_gpu_tests.log"
timeout 200 python3 -m kernels.gpu_check --out "$out/kernels_gpu.json" 2>&1 | tee "$out/kernels_gpu.log"
