#!/usr/bin/env bash
# One device call: the new kernels' GPU tests, then launch-config sweeps of the small-M
# (GEMV) and large-M (tiled) quantized GEMMs against bf16 cuBLAS. JSON and logs land in $OUT.
#   bash benchmarks/sweep_kernels.sh
set -o pipefail
OUT=${OUT:-benchmarks/results/sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
  tests/gpu/test_gpu_w8a8_gemv.py tests/gpu/test_gpu_fp4.py tests/gpu/test_gpu_gemm.py \
  -k "w8a8_gemv or fp4 or tiled or knob" \
  2>&1 | tee "$OUT/tests.log" | tail -5
M1="bf16;w4a16;w4a16:gemv,block_k=16;w4a16:gemv,block_k=16,chunk=64,stages=3,unroll=1"
M1+=";w4a16:gemv,block_k=32,chunk=64,stages=2,unroll=1;w4a16:gemv,block_k=16,waves=16"
M1+=";fp8-triton;fp8-triton:gemv;fp8-triton:gemv,bn=8,bk=512;fp8-triton:gemv,bn=32,warps=8"
M1+=";fp8-triton:gemv,waves=8,stages=3;fp8-triton:gemv,bk=128,stages=4;int8;int8:gemv"
M1+=";nvfp4:gemv;nvfp4:gemv,bn=8;nvfp4:gemv,stages=2"
M16="bf16;w4a16;w4a16:tiled;w4a16:tiled,bn=64;fp8-triton;nvfp4:mma"
M256="bf16;w4a16;w4a16:tiled;w4a16:tiled,swap=0;w4a16:tiled,bm=128,bn=256;w4a16:tiled,bm=256"
M256+=";nvfp4:mma;nvfp4:mma,bm=256"
for run in "1 $M1" "16 $M16" "256 $M256"; do
  set -- $run
  timeout ${GEMM_TIMEOUT:-150} python3 benchmarks/bench_gemm.py --ms "$1" --schemes "$2" \
    --out "$OUT/m$1" 2>&1 | grep -v "^{" | tee "$OUT/gemm_m$1.log" | tail -70
done
