#!/usr/bin/env bash
# The unlearning comparison on a GPU, for a short device session (run after gpu_check.sh built the
# extension in place; builds it if not):
#   1. ResNet-18 (width 64) on Fashion-MNIST, one run per forget class in RESNET_CLASSES (default "3"),
#      RESNET_SEEDS seeds (default 1), 13% retain data, the methods in RESNET_METHODS (default all);
#   2. SmallCNN on Fashion-MNIST, forget class 3, 3 seeds, 13% retain data, all ten methods
#      (skipped with CNN_LIMIT_S=0).
# Each run writes $OUT/<name>/ (comparison.json + the two plots) and a log; the JSON and plots are also
# copied flat to $OUT/<name>_comparison.json etc., since a device session may return only top-level files.
# Pool the per-class JSONs afterwards with benchmarks/merge_comparisons.py.
# Needs the four Fashion-MNIST IDX files in $DFMU_DATA (default ./.data; carry it to the machine).
# Env: RESNET_LIMIT_S (default 300, per class), CNN_LIMIT_S (default 200).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DFMU_DATA="${DFMU_DATA:-$PWD/.data}"
export DFMU_CACHE="${DFMU_CACHE:-/tmp/dfmu-cache}"  # the originals are trained once per seed, shared by classes
OUT="${OUT:-/tmp}"
PY="${PYTHON:-python}"
STATUS=0
if ! "$PY" -c "import dfmu_ext, sys; sys.exit(0 if dfmu_ext.build_info()['with_cuda'] else 1)" 2>/dev/null; then
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log"; exit 1; }
fi
run() {  # name, time limit (s), then dfmu compare arguments
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, $(date -u +%T))"
  timeout "$limit" "$PY" -m dfmu_ext compare --dataset fashion-mnist --device cuda --out-dir "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && { STATUS=1; echo "$name: exit $rc"; }
  for f in comparison.json retain_vs_fraction.png time_vs_retain.png; do
    [ -f "$OUT/$name/$f" ] && cp "$OUT/$name/$f" "$OUT/${name}_$f"
  done
  grep -v -E "it/s|batch/s|s/it" "$OUT/$name.log" | tail -n 20
}
for c in ${RESNET_CLASSES:-3}; do
  run "compare_resnet18_c$c" "${RESNET_LIMIT_S:-300}" --model resnet18 --classes "$c" --fractions 0.13 \
    --seeds "${RESNET_SEEDS:-1}" --methods "${RESNET_METHODS:-all}"
done
if [ "${CNN_LIMIT_S:-200}" -gt 0 ]; then
  run compare_cnn "${CNN_LIMIT_S:-200}" --model cnn --classes 3 --fractions 0.13 --seeds 3 --methods all
fi
exit "$STATUS"
