#!/usr/bin/env bash
# The GPU checks, in one go: the CUDA tests, then the loop and population benchmarks on the GPU.
# CI has no GPU; run this on a machine with one (hpo installed, pytest, lightning and
# pytorch-ignite for the loop benchmark). Logs go to $OUT (default ./gpu-check).
#
#   bash scripts/gpu_check.sh [tests] [loop] [vectorized] [seeds] [architectures] [pad]     (the first three when none is named)
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests loop vectorized}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, optuna; print('torch', torch.__version__, 'optuna', optuna.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests) timeout 150 python3 -m pytest -q -rs tests/test_cuda.py -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" ;;
    loop) timeout 170 python3 scripts/bench_loop.py --device cuda --model conv --precision bf16-mixed \
            --rounds 3 --repeat 2 2>&1 | tee "$OUT/bench_loop.txt" ;;
    vectorized) timeout 250 python3 scripts/bench_vectorized.py --device cuda --precision bf16-mixed --model mlp conv \
                  --spaces fixed-arch --width 32 --trials 128 --epochs 10 --rounds 1 2>&1 | tee "$OUT/bench_vectorized.txt" ;;
    # Not run by default: the population benchmark at two more seeds (each its own study, its own trials),
    # for a ratio that is not one seed's ...
    seeds) timeout 290 python3 scripts/bench_vectorized.py --device cuda --precision bf16-mixed --model mlp conv \
             --spaces fixed-arch --width 32 --trials 128 --epochs 10 --rounds 1 --seeds 1 2 2>&1 | tee "$OUT/bench_seeds.txt" ;;
    # ... and the written-out backward against autograd's, stacked against alone, per architecture.
    architectures) timeout 250 python3 scripts/bench_vectorized.py --architectures --device cuda --precision bf16-mixed \
                     --widths 8 32 2>&1 | tee "$OUT/bench_architectures.txt" ;;
    # ... and the shipped MLP space (12 architectures) with hidden widths padded or not, side by side.
    pad) timeout 290 python3 scripts/bench_vectorized.py --device cuda --precision bf16-mixed --model mlp \
           --spaces shipped --width 32 --trials 128 --epochs 10 --rounds 1 --pad 1 3 16 2>&1 | tee "$OUT/bench_pad.txt" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  rc=$?
  echo "== $part: exit $rc in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || status=$rc
done
exit $status
