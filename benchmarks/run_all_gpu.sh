#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks; logs and JSON land in $OUT (≤ 8 files).
#   bash benchmarks/run_all_gpu.sh [tests] [decode] [gemm] [throughput]   (default: all four)
# Carry `.whl` when pytest is missing there (pytest, pluggy, iniconfig, pygments wheels).
set -o pipefail
OUT=${OUT:-benchmarks/results/run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
STAGES=${*:-tests decode gemm throughput}
if ! $PY -c "import pytest" 2>/dev/null && ls .whl/pytest-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/pygments-*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
for stage in $STAGES; do
  echo "=== $stage $(date -u +%T)"
  case $stage in
    tests) timeout ${TESTS_TIMEOUT:-180} $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rfE 2>&1 \
             | tee "$OUT/tests.log" | tail -40 ;;
    gemm) timeout ${GEMM_TIMEOUT:-150} $PY benchmarks/bench_gemm.py --out "$OUT" ${GEMM_ARGS:-} 2>&1 | tee "$OUT/gemm.log" \
            | grep -v "^{" ;;
    decode) timeout ${DECODE_TIMEOUT:-240} $PY benchmarks/bench_decode.py --out "$OUT" ${DECODE_ARGS:-} 2>&1 \
              | tee "$OUT/decode.log" ;;
    throughput) timeout ${THROUGHPUT_TIMEOUT:-150} $PY benchmarks/bench_throughput.py --out "$OUT" ${THROUGHPUT_ARGS:-} 2>&1 \
                  | tee "$OUT/throughput.log" | tail -8 ;;
  esac
done
echo "=== done $(date -u +%T)"
