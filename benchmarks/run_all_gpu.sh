#!/usr/bin/env bash
# GPU tests, then the benchmarks; logs and JSON land in $OUT (≤ 8 files).
#   bash benchmarks/run_all_gpu.sh [tests|tests-a|tests-b|tests-par] [decode] [gemm] [throughput]
# (default: tests decode gemm throughput). The whole GPU suite (409 tests) did not fit one
# 10-minute device call on the H100 (run 9 of RESULTS.md: 319 tests in 570 s): run `tests-a`
# (attention, engine, fixtures, fp4, fused, gemm, splitk) and `tests-b` (gemv, online,
# quantize, w8a8_gemv) in two calls, then the benchmarks. The halves were sized from run 9's
# partial runs (~7 and ~5.5 minutes estimated). `tests-par` runs the whole suite as six pytest
# processes side by side on the one GPU (the suite is mostly Triton compiles, one CPU core each);
# the engine-building files share one process, so their KV sizing does not race; test files
# not named in a shard run in the last.
# Carry `.whl` (pytest, pluggy, iniconfig, pygments and torchao wheels): installed when present.
set -o pipefail
OUT=${OUT:-benchmarks/results/run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
STAGES=${*:-tests decode gemm throughput}
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: pytest & co., torchao (online tests)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
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
    tests|tests-a|tests-b)
      files=tests/gpu
      [ "$stage" = tests-a ] && files="tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_wna16_mma.py
        tests/gpu/test_gpu_fixtures.py tests/gpu/test_gpu_fp4.py tests/gpu/test_gpu_fused.py
        tests/gpu/test_gpu_gemm.py tests/gpu/test_gpu_splitk.py"
      [ "$stage" = tests-b ] && files="tests/gpu/test_gpu_gemv.py tests/gpu/test_gpu_online.py
        tests/gpu/test_gpu_quantize.py tests/gpu/test_gpu_w8a8_gemv.py"
      timeout ${TESTS_TIMEOUT:-570} $PY -m pytest -q -m gpu $files -p no:cacheprovider -rfE 2>&1 \
        | tee "$OUT/$stage.log" | tail -40 ;;
    tests-par)
      pids=""
      named="test_gpu_engine.py test_gpu_fixtures.py test_gpu_gemm.py test_gpu_fp4.py test_gpu_wna16_mma.py
             test_gpu_gemv.py test_gpu_w8a8_gemv.py test_gpu_splitk.py"
      rest=""  # every other test file (new ones included) goes to the last process
      for f in tests/gpu/test_gpu_*.py; do
        case " $(echo $named) " in *" $(basename "$f") "*) ;; *) rest="$rest $(basename "$f")" ;; esac
      done
      rest=$(echo $rest)
      for shard in "test_gpu_engine.py test_gpu_fixtures.py" "test_gpu_wna16_mma.py" "test_gpu_gemm.py test_gpu_fp4.py" \
                   "test_gpu_gemv.py" "test_gpu_w8a8_gemv.py test_gpu_splitk.py" "$rest"; do
        name=tests-par-$(echo "$shard" | cut -d' ' -f1 | sed 's/test_gpu_//; s/.py//')
        (timeout ${TESTS_TIMEOUT:-570} $PY -m pytest -q -m gpu $(printf 'tests/gpu/%s ' $shard) \
           -p no:cacheprovider -rfE >"$OUT/$name.log" 2>&1) &
        pids="$pids $!"
      done
      for pid in $pids; do wait "$pid"; done
      for log in "$OUT"/tests-par-*.log; do echo "--- $log"; tail -15 "$log"; done ;;
    gemm) timeout ${GEMM_TIMEOUT:-150} $PY benchmarks/bench_gemm.py --out "$OUT" ${GEMM_ARGS:-} 2>&1 | tee "$OUT/gemm.log" \
            | grep -v "^{" ;;
    decode) timeout ${DECODE_TIMEOUT:-240} $PY benchmarks/bench_decode.py --out "$OUT" ${DECODE_ARGS:-} 2>&1 \
              | tee "$OUT/decode.log" ;;
    throughput) timeout ${THROUGHPUT_TIMEOUT:-150} $PY benchmarks/bench_throughput.py --out "$OUT" ${THROUGHPUT_ARGS:-} 2>&1 \
                  | tee "$OUT/throughput.log" | tail -8 ;;
  esac
done
echo "=== done $(date -u +%T)"
