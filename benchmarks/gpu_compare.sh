#!/usr/bin/env bash
# The unlearning comparison on a GPU, for a short device session (run after gpu_check.sh built the
# extension in place; builds it if not):
#   1. ResNet-18 (width 64) on Fashion-MNIST, forget class 3, RESNET_SEEDS seeds (default 1), 13%
#      retain data, all ten methods;
#   2. SmallCNN on Fashion-MNIST, forget class 3, 3 seeds, 13% retain data, all ten methods.
# Writes $OUT/compare_cnn/ and $OUT/compare_resnet18/ (comparison.json + the two plots) and logs.
# Needs the four Fashion-MNIST IDX files in $DFMU_DATA (default ./.data; carry it to the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DFMU_DATA="${DFMU_DATA:-$PWD/.data}"
export DFMU_CACHE="${DFMU_CACHE:-/tmp/dfmu-cache}"
OUT="${OUT:-/tmp}"
PY="${PYTHON:-python}"
STATUS=0
if ! "$PY" -c "import dfmu_ext, sys; sys.exit(0 if dfmu_ext.build_info()['with_cuda'] else 1)" 2>/dev/null; then
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log"; exit 1; }
fi
run() {  # name, time limit (s), then dfmu compare arguments
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$PY" -m dfmu_ext compare --dataset fashion-mnist --device cuda --out-dir "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && { STATUS=1; echo "$name: exit $rc"; }
  grep -v -E "it/s|batch/s|s/it" "$OUT/$name.log" | tail -n 20
}
run compare_resnet18 "${RESNET_LIMIT_S:-300}" --model resnet18 --classes 3 --fractions 0.13 \
  --seeds "${RESNET_SEEDS:-1}" --methods all
run compare_cnn "${CNN_LIMIT_S:-200}" --model cnn --classes 3 --fractions 0.13 --seeds 3 --methods all
exit "$STATUS"
