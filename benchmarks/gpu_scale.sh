#!/usr/bin/env bash
# The scale rehearsal on one GPU (benchmarks/scale.py --gpu), from a copy of the tree with
# .wheels/ and .device/ carried beside it (bash benchmarks/gpu_wheels.sh makes both):
#
#   bash benchmarks/gpu_scale.sh            # results in $OUT, else runs/gpu_scale/
#
# The carried wheels (DeepSpeed and what the image lacks) go into a private folder put first
# on PYTHONPATH; the tokenizer and GSM8K come from .device/shared.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-runs/gpu_scale}"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
"$PY" benchmarks/scale.py --gpu --work "${TMPDIR:-/tmp}/dude_gpu_scale" "$@" 2>&1 | tee "$OUT/gpu_scale.log"
rc=${PIPESTATUS[0]}
cp benchmarks/results/gpu_scale.* "$OUT/" 2>/dev/null
exit "$rc"
