#!/usr/bin/env bash
# The one prepared run for a lent CUDA machine (issue 16), through the device tool:
#
#   make gpu-wheels                     # here, once: the wheels its image lacks, into .gpu_wheels/
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
#
# On the device (no package registry there): install bitarray and blake3 from the carried
# wheels and this checkout in place, then (1) the CUDA correctness tests against the torch
# reference (the Triton kernels compiled for the GPU, the strategies on CUDA), (2) bench_kernels.py on
# CUDA for CLIP ViT-B/16 shapes (11 tasks) and the 1B case (4 tasks): unify, add_task, decouple,
# decouple_many on every available backend against the released algorithm on the same GPU and
# the GPU's own measured copy bandwidth. Logs and the JSON go to $OUT (what comes back). Each
# step has its own time limit, so a hang in one still returns the others' output.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"
"$PY" -m pip install -q --no-index --find-links .gpu_wheels bitarray blake3 2>&1 | tail -3
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
status=0
timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_triton.py tests/test_strategy_io.py -k "cuda or triton" 2>&1 | tee "$OUT/cuda_tests.log" || status=1
timeout 300 "$PY" benchmarks/bench_kernels.py --device cuda --model both --repeats 3 --json "$OUT/kernels_cuda.json" \
    2>&1 | tee "$OUT/kernels_cuda.log" || status=1
exit $status
